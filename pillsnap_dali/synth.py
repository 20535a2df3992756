"""``python -m pillsnap_dali.synth``: the synthetic AI Hub tree CLI (the code lives in ``pillsnap_dali.data.synth``)."""
from pillsnap_dali.data.synth import main

if __name__ == "__main__":
    raise SystemExit(main())
