"""`fastsample teleport-stats` as a script; the code is fastsample.commands.teleport_stats (see its --help)."""
from fastsample.commands.teleport_stats import main

if __name__ == "__main__":
    raise SystemExit(main())
