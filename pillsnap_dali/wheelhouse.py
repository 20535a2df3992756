"""``python -m pillsnap_dali.wheelhouse``: the command lives in ``pillsnap_dali.commands.wheelhouse``."""
from pillsnap_dali.commands.wheelhouse import main

if __name__ == "__main__":
    raise SystemExit(main())
