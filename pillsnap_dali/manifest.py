"""``python -m pillsnap_dali.manifest``: the manifest build CLI (the code lives in ``pillsnap_dali.data.build``)."""
from pillsnap_dali.data.build import main

if __name__ == "__main__":
    raise SystemExit(main())
