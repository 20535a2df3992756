"""Every seed of a run comes from ``train.seed`` by one rule: ``derive_seed(base, *keys)``.

The rule: the entropy ``[base, *keys]`` goes through numpy's ``SeedSequence`` (a hash built for exactly
this: nearby inputs give unrelated streams), and a seed is the low ``bits`` bits of its first 64-bit word;
a numpy generator is ``default_rng`` of that same ``SeedSequence`` (``rng(base, *keys)``). The keys say
where in the run a draw belongs, outermost first (epoch, then rank, then anything finer), followed by the
stream's tag when two things are seeded at the same place. A draw depends on nothing else (not the worker,
the batch it lands in, or how often a pipeline was rebuilt), so an interrupted and resumed run draws what an
uninterrupted one drew.

The streams, each used in one place:

=====================  ===========================================  ===================================
stream                 keys                                         used by
=====================  ===========================================  ===================================
epoch shuffle          ``(epoch)``                                  ``loaders.common.shard_order``
weighted sampler       ``(epoch, rank, WEIGHTED)``                  ``loaders.common.weighted_order``
augmentation draws     ``(epoch, AUGMENT)``, rows hashed on top     ``loaders.augment.sample_uniforms``
detection draws        ``(epoch, DETECT_AUGMENT)``, rows on top     ``loaders.augment.draw_detect``
DALI pipeline seed     ``(epoch, rank, pipelines built)``, 31 bits  ``loaders.runner.DaliRunner``
torch RNG of an epoch  ``(epoch, rank, TORCH)``                     ``training.engine.train_one_epoch``
DataLoader generator   ``(epoch, rank, DATALOADER)``                ``loaders.pil_loader``
=====================  ===========================================  ===================================

The model's initial weights are drawn right after ``torch.manual_seed(train.seed)`` (the base itself, before
any stream). The torch RNG is seeded once per epoch (not per step: ``torch.manual_seed`` costs ~0.15 ms of host time);
an epoch interrupted midway is resumed from the RNG state saved with its checkpoint (rank 0's in the
checkpoint, rank r's in its position file), so the steps after the resume draw what they drew before.
"""
from __future__ import annotations

import numpy as np

WEIGHTED = 0x5A
AUGMENT = 0xA6
TORCH = 0x7C
DETECT_AUGMENT = 0xD7
DATALOADER = 0xD1


def seed_sequence(base: int, *keys: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of ``[base, *keys]`` (every value a non-negative integer)."""
    return np.random.SeedSequence([int(base), *(int(k) for k in keys)])


def derive_seed(base: int, *keys: int, bits: int = 64) -> int:
    """The seed of the stream ``keys`` of run seed ``base``: the low ``bits`` bits of the sequence's first
    64-bit word (31 for DALI, whose seed is a signed 32-bit int; 64 for torch and the hashes)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    word = int(seed_sequence(base, *keys).generate_state(1, np.uint64)[0])
    return word & ((1 << bits) - 1)


def rng(base: int, *keys: int) -> np.random.Generator:
    """A numpy generator of the stream ``keys`` (``default_rng`` of the same sequence)."""
    return np.random.default_rng(seed_sequence(base, *keys))
