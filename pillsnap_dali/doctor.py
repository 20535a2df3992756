"""``python -m pillsnap_dali.doctor``: the command lives in ``pillsnap_dali.commands.doctor``."""
from pillsnap_dali.commands.doctor import main

if __name__ == "__main__":
    raise SystemExit(main())
