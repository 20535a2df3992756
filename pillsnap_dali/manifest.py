"""``python -m pillsnap_dali.manifest``: the command lives in ``pillsnap_dali.commands.manifest``."""
from pillsnap_dali.commands.manifest import main

if __name__ == "__main__":
    raise SystemExit(main())
