"""One rule for every seed (pillsnap_dali/seeds.py): the values the loaders and the DALI runner used before
the rule was written down are kept, so shuffles, draws and pipelines are what they were."""
from __future__ import annotations

import numpy as np
import pytest

from pillsnap_dali import seeds
from pillsnap_dali.seeds import derive_seed


def test_derive_seed_is_deterministic_keyed_and_bounded():
    assert derive_seed(1, 2, 3, bits=31) == derive_seed(1, 2, 3, bits=31) != derive_seed(1, 3, 3, bits=31)
    assert 0 <= derive_seed(7, bits=31) < 2 ** 31 and 0 <= derive_seed(7) < 2 ** 64
    assert derive_seed(7, 1) & (2 ** 31 - 1) == derive_seed(7, 1, bits=31)  # the low bits of one word
    with pytest.raises(ValueError):
        derive_seed(1, bits=65)


def test_the_rule_keeps_the_numbers_each_place_derived_before():
    # the DALI runner's 31-bit seed: SeedSequence's first uint32 modulo 2**31
    assert derive_seed(42, 5, 1, 0, bits=31) == int(np.random.SeedSequence([42, 5, 1, 0]).generate_state(1)[0]
                                                     % 2 ** 31)
    # the augmentation key: the first uint64 word of (seed, epoch, 0xA6)
    assert derive_seed(3, 4, seeds.AUGMENT) == int(np.random.SeedSequence([3, 4, 0xA6]).generate_state(1, np.uint64)[0])
    # the shuffle and the weighted sampler: default_rng of the entropy list
    assert np.array_equal(seeds.rng(5, 1).permutation(50), np.random.default_rng([5, 1]).permutation(50))
    assert np.array_equal(seeds.rng(5, 1, 0, seeds.WEIGHTED).random(4),
                          np.random.default_rng([5, 1, 0, 0x5A]).random(4))
