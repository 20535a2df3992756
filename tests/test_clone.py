"""The suite on a machine that has only the clone: no ``shared/`` beside it and no ``PILLSNAP_REAL_IMAGES``.

The repo's files (as git lists them: tracked and not ignored) are copied into a temporary folder with no
``shared/`` above it, and pytest runs there: every test module must be collected (none may need the shared
corpus to import) and the tests of the odd-image corpus pass on the generated corpus alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


def test_a_clone_without_shared_tests_on_the_generated_corpus(tmp_path):
    clone = tmp_path / "elsewhere" / "pillsnap_dali"
    for f in _repo_files():
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, clone / f)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k != "PILLSNAP_REAL_IMAGES"}
    env["PYTHONPATH"] = str(clone)  # the copy's package, not the installed one
    picked = "odd_images or open_rgb_gives or header_reasons or exif_and_xmp"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", picked],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " error" not in tail and "passed" in tail, tail
    assert int(tail.rsplit(" passed", 1)[0].split()[-1]) >= 4, tail


def test_no_machine_path_in_the_repo_and_the_data_format_doc_is_there():
    """Nothing names one machine's folders (a workspace, a home dir); docs/aihub_format.md, which the code
    and config cite, exists and describes every defect the scanner counts."""
    import re

    from pillsnap_dali.data.scan import DEFECTS
    machine = re.compile(r"(?<![\w.])/(?:work|home/\w+|Users/\w+|root)/|\b[A-Z]:\\\\")
    hits = []
    for f in _repo_files():
        if f.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".txt")) or f.startswith(".ci/"):
            text = (REPO / f).read_text(encoding="utf-8", errors="replace")
            hits += [f"{f}: {m.group(0)}" for m in machine.finditer(text)]
    assert not hits, hits
    doc = (REPO / "docs" / "aihub_format.md").read_text(encoding="utf-8")
    assert [d for d in DEFECTS if f"`{d}`" not in doc] == []
    assert "docs/aihub_format.md" in (REPO / "pillsnap_dali" / "data" / "scan.py").read_text(encoding="utf-8")
