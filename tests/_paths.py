"""The optional extra corpus: the shared real-world images (``shared/testdata/real_images``, see its README),
at ``$PILLSNAP_REAL_IMAGES`` or at ``../shared/testdata/real_images`` beside the checkout (as CI lays it).

``REAL_IMAGES`` is None when neither exists: the tests then run on the generated corpus alone
(``tests/corpus.py``). A ``PILLSNAP_REAL_IMAGES`` naming no folder is an error, never a silent fallback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

_ENV = os.environ.get("PILLSNAP_REAL_IMAGES", "")
_BESIDE = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "real_images"

if _ENV and not Path(_ENV).is_dir():
    raise RuntimeError(f"PILLSNAP_REAL_IMAGES={_ENV} is not a folder")
REAL_IMAGES: Optional[Path] = Path(_ENV) if _ENV else (_BESIDE if _BESIDE.is_dir() else None)
