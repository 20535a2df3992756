"""``python -m pillsnap_dali.synth``: the command lives in ``pillsnap_dali.commands.synth``."""
from pillsnap_dali.commands.synth import main

if __name__ == "__main__":
    raise SystemExit(main())
