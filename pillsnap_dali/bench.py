"""``python -m pillsnap_dali.bench``: the command lives in ``pillsnap_dali.commands.bench``; the measuring code in
``pillsnap_dali.benchmarks``."""
from pillsnap_dali.commands.bench import main

if __name__ == "__main__":  # guarded: the peer arms start workers from a fork server, which imports __main__
    raise SystemExit(main())
