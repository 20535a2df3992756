"""``python -m pillsnap_dali.prepare``: the PNG -> JPEG cache CLI (the code lives in ``pillsnap_dali.data.cache``)."""
from pillsnap_dali.data.cache import main

if __name__ == "__main__":
    raise SystemExit(main())
