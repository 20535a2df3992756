"""``python -m pillsnap_dali.detect``: the command lives in ``pillsnap_dali.commands.detect``."""
from pillsnap_dali.commands.detect import main

if __name__ == "__main__":
    raise SystemExit(main())
