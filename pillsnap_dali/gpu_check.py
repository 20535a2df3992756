"""``python -m pillsnap_dali.gpu_check``: the command lives in ``pillsnap_dali.commands.gpu_check``."""
from pillsnap_dali.commands.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
