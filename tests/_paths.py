"""Where the shared real-world test images are: ``$PILLSNAP_REAL_IMAGES``, else ``shared/`` beside the
checkout (as CI lays it), else the workspace copy. Missing images are an error, never a silent skip."""
import os
from pathlib import Path

_CANDIDATES = [os.environ.get("PILLSNAP_REAL_IMAGES", ""),
               Path(__file__).resolve().parents[2] / "shared" / "testdata" / "real_images",
               Path("/work/shared/testdata/real_images")]
REAL_IMAGES = next((Path(c) for c in _CANDIDATES if c and Path(c).is_dir()), None)
if REAL_IMAGES is None:
    raise RuntimeError(f"shared/testdata/real_images not found (tried {_CANDIDATES}); set PILLSNAP_REAL_IMAGES")
