"""`fastsample learn-schedule` as a script; the code is fastsample.commands.learn_schedule (see its --help)."""
from fastsample.commands.learn_schedule import main

if __name__ == "__main__":
    raise SystemExit(main())
