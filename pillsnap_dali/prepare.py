"""``python -m pillsnap_dali.prepare``: the command lives in ``pillsnap_dali.commands.prepare``."""
from pillsnap_dali.commands.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
