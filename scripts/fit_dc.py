"""`fastsample fit-dc` as a script; the code is fastsample.commands.fit_dc (see its --help)."""
from fastsample.commands.fit_dc import main

if __name__ == "__main__":
    raise SystemExit(main())
