"""`fastsample sample` as a script; the code is fastsample.commands.sample (see its --help)."""
from fastsample.commands.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
