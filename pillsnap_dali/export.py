"""``python -m pillsnap_dali.export``: the command lives in ``pillsnap_dali.commands.export``."""
from pillsnap_dali.commands.export import main

if __name__ == "__main__":
    raise SystemExit(main())
