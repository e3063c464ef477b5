"""`fastsample bench` as a script; the code is fastsample.commands.bench (see its --help)."""
from fastsample.commands.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
