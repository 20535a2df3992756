"""Shared fixtures.

``synth_tree``: one small synthetic AI Hub tree per test session (raw Korean layout with spaces, every
defect injected), built in well under a second. It returns ``pillsnap_dali.synth.SynthSummary``:
``.root`` is the folder to scan, ``.codes`` the 6 K-codes, ``.combos`` the combination folders per part,
``.counts`` the files written per part, ``.defects`` the injected defect counts; ``root/defects.json`` lists
the affected files (relative to ``root``). Tests must not write into it (it is shared): copy it first.

``odd_corpus``: the generated broken and odd images of ``tests/corpus.py``, {name: path}, once per session.
``odd_images``: those files, then the shared real-world images when present (``_paths.REAL_IMAGES``), as
one sorted-per-corpus list of paths (the corpus's one text file included; filter by suffix where needed).
"""
from __future__ import annotations

import pytest

from pillsnap_dali.config import load_config
from pillsnap_dali.data.build import build_manifests
from pillsnap_dali.data.synth import generate

import corpus
from _paths import REAL_IMAGES

SYNTH_TREE = dict(classes=6, images_per_class=8, combos=3, size=(122, 160), defects=True, seed=0, layout="raw")


@pytest.fixture(scope="session")
def synth_tree(tmp_path_factory):
    """6 classes x 8 training singles (+2 validation each), 3 + 1 combinations, 122x160 PNGs, all defects."""
    return generate(tmp_path_factory.mktemp("synth_tree") / "aihub", workers=1, **SYNTH_TREE)


@pytest.fixture(scope="session")
def odd_corpus(tmp_path_factory) -> dict:
    return corpus.build(tmp_path_factory.mktemp("odd_corpus"))


@pytest.fixture(scope="session")
def odd_images(odd_corpus) -> list:
    real = sorted(REAL_IMAGES.iterdir()) if REAL_IMAGES is not None else []
    return sorted(odd_corpus.values()) + real


@pytest.fixture(scope="module")
def manifests(synth_tree, tmp_path_factory):
    """The demo config's manifests of ``synth_tree``, built once per test module (tests may add files beside)."""
    out = tmp_path_factory.mktemp("manifests")
    build_manifests(load_config("demo"), synth_tree.root, out)
    return out
