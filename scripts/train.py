"""`fastsample train` as a script; the code is fastsample.commands.train (see its --help)."""
from fastsample.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
