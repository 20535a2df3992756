"""``python -m pillsnap_dali.train``: the command lives in ``pillsnap_dali.commands.train``."""
from pillsnap_dali.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
