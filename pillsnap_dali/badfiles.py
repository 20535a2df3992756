"""What happens to a bad image file: the whole policy, in one place to read (light: no torch, no DALI).

**A bad file** is a manifest row whose file cannot give the model an image: missing, empty, unreadable
(permissions), not an image or an unsupported format, a header PIL cannot parse, a size past
``data.max_pixels`` (or PIL's decompression-bomb limit) or beyond ``imageio.MAX_ASPECT``:1, or pixel data
that does not decode (truncated, corrupt). Such a row is **skipped, never padded and never lost**:

1. **Who decides.** Before any decoder sees the bytes, ``imageio`` judges the header (``read_encoded``,
   ``read_encoded_upright``, ``open_rgb``'s size check) and gives the reason string. Then the decoder:
   - ``pil`` backend: ``open_rgb`` decodes; an exception of ``IMAGE_ERRORS`` (the classes a file's bytes
     can cause in PIL) is the file's fault and becomes its skip reason (``image_error_reason``). Any other
     exception (``TypeError``, ``AttributeError``, ``KeyError``, ``IndexError``...) is a bug in our code and
     propagates as a traceback: it is never counted as a bad file. Transforms of an image that decoded are
     outside that net: no file can make them fail.
   - ``dali`` / ``dali-cpu`` / detection: DALI aborts the whole pipeline on one undecodable file. The runner
     (``loaders.runner``) probes the rows in flight one at a time with a batch-1 pipeline of the same graph
     (no retry of a file: one probe decides) and skips the rows that fail alone, with DALI's own message
     (``dali_reason``). A batch that fails while none of its files fails alone is retried (``MAX_RETRIES``),
     never skipped, then ``PipelineFailure``.
2. **Device errors are never the file's fault.** An allocation or CUDA error (``runner.is_device_error``)
   skips nothing: unused memory released, pipeline rebuilt, the batch retried once, then
   ``DeviceMemoryError`` (the run saves ``last.pt`` first).
3. **Where it is logged.** One line per skipped manifest row in the run's skip log (``skiplog.SkipLog``,
   columns ``row, split, path, reason, backend, epoch``): ``<run_dir>/skipped.csv`` on rank 0,
   ``skipped.rank<r>.csv`` on rank r (``skip_log_for``), written the moment the row is met, plus a
   warning in the log. Every loader then leaves that **path** out of later epochs, of the other split and of
   a resumed run (``loaders.common.EpochPlan``: ``yielded + skipped + excluded + dropped == rows``).
4. **The skip limit.** After each epoch's training and each validation, if more than ``train.max_skipped``
   (default 5 %) of a split's rows over all ranks were skipped or excluded, the run stops (exit 1) with one
   line naming the top reasons (``skip_limit_problem``): a run that can read too little of its data (an
   unmounted disk, a wrong data root) is not worth its time. The last good ``last.pt`` stays.

The manifest build's checks (``data.verify``: ``imageio.check_header`` / ``check_full``) use the same
reasons, and write ``quarantine.csv`` instead (nothing is trained on yet). Their ``try`` blocks wrap PIL's
calls alone (``Image.open``, ``.load()``, the EXIF parse), with none of our code inside, so there any
exception a third-party decoder raises on a file is that file's (a verdict, not a crash of the build).
"""
from __future__ import annotations

import collections
import logging
import struct
import zlib
from pathlib import Path

from PIL import Image

from pillsnap_dali.skiplog import SkipLog

_logger = logging.getLogger(__name__)

# what an image file's bytes can make PIL (and our header checks) raise: OSError (missing, unreadable,
# truncated, "broken data stream", UnidentifiedImageError), ValueError (our size checks, PIL's checks of a
# header's values), SyntaxError (PIL's plugins: "not a PNG file", broken chunks), EOFError and struct.error
# (plugins reading a header past the end), zlib.error (a PNG's compressed chunks), DecompressionBombError
IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError, struct.error,
                                                 zlib.error, Image.DecompressionBombError)


def is_image_error(err: BaseException) -> bool:
    """True when ``err`` is one an image file can cause (a skip); False for a bug in our code (propagate)."""
    return isinstance(err, IMAGE_ERRORS)


def image_error_reason(err: BaseException) -> str:
    """The skip log's reason for an image-caused error: its class and message, on one line."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def skip_log_for(run_dir: Path | None, rank: int = 0) -> SkipLog:
    """The run's skip log on this rank (rank 0: ``skipped.csv``, created empty so that a run that skipped
    nothing says so; rank r: ``skipped.rank<r>.csv``); in memory only without a run dir (a dry run)."""
    if run_dir is None:
        return SkipLog(None)
    log = SkipLog(Path(run_dir) / ("skipped.csv" if rank == 0 else f"skipped.rank{rank}.csv"))
    if rank == 0:
        log.ensure_file()
    return log


def top_reasons(entries: list[dict], n: int = 3) -> str:
    """The ``n`` commonest skip reasons with their counts, ``"reason (count); ..."``."""
    counts = collections.Counter(str(e.get("reason", ""))[:80] for e in entries)
    return "; ".join(f"{r} ({c})" for r, c in counts.most_common(n))


def skip_limit_problem(bad: int, rows: int, split: str, limit: float, skip_log: SkipLog) -> str | None:
    """Why a split whose ``bad`` of ``rows`` rows (all ranks) were unusable must stop the run (more than
    ``limit``, ``train.max_skipped``); None when it may go on."""
    share = bad / rows if rows else 0.0
    if share <= limit:
        return None
    return (f"{bad} of the {rows} {split} rows ({share:.0%}) could not be read, more than "
            f"train.max_skipped={limit:.0%}; top reasons: {top_reasons(skip_log.entries)} "
            f"(every file in {skip_log.path or 'the skip log'})")
