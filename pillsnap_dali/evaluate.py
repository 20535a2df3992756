"""``python -m pillsnap_dali.evaluate``: the command lives in ``pillsnap_dali.commands.evaluate``."""
from pillsnap_dali.commands.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
