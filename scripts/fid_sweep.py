"""`fastsample sweep` as a script; the code is fastsample.commands.sweep (see its --help)."""
from fastsample.commands.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
