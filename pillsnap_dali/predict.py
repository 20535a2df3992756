"""``python -m pillsnap_dali.predict``: the command lives in ``pillsnap_dali.commands.predict``."""
from pillsnap_dali.commands.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
