"""Multi-node training shown on one machine: two torchrun node processes (``--nnodes=2 --nproc_per_node=1``,
c10d rendezvous on 127.0.0.1, gloo on the CPU) train a tiny demo.

Each node runs in its own working directory with a relative ``train.out``, so the two ranks have separate run
dirs as on two workstations (only the data and the manifests are at the same absolute paths). A quarter of
the training images are broken: each one must be skipped by exactly one rank (the ranks' rows are disjoint
and cover the split), rank 0's ``skipped.csv`` must hold both ranks' rows although rank 1 never wrote into
rank 0's run dir (merged through torch.distributed), and exactly one report is written.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pillsnap_dali.config import load_config
from pillsnap_dali.data.build import ensure_manifests
from pillsnap_dali.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.synth.classes=4", "data.synth.images_per_class=12", "data.synth.combos=0", "data.synth.size=64x80",
        "preprocess.img_size=64", "train.epochs=1", "train.batch_size=4", "loader.backend=pil", "loader.workers=0",
        "train.torch_threads=1", "train.tensorboard=false", "train.max_skipped=0.5", "model.name=resnet18"]
SKIP_LINE = re.compile(r"\[rank(\d)\] WARNING \S+: skipped train row (\d+) ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(cwd: Path, port: int, manifest: Path, sets: list[str], env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=pillsnap-test",
           "-m", "pillsnap_dali.train", "--stage", "demo", "--manifest", str(manifest)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return outs


def _skipped_rows(csv_path: Path) -> list[int]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return [int(r["row"]) for r in csv.DictReader(fh) if r["split"] == "train"]


@pytest.mark.slow
def test_two_nodes_over_loopback_train_disjoint_rows_with_one_skip_log_and_one_report(tmp_path):
    artifacts = tmp_path / "shared" / "artifacts"  # the data: the same absolute paths on both "machines"
    sets = TINY + [f"data.artifacts={artifacts}"]
    manifest = ensure_manifests(load_config("demo", sets=sets)) / "manifest_train.csv"
    train = read_manifest(manifest)
    broken = set(range(0, len(train), 4))
    for i in broken:
        Path(train.paths[i]).write_bytes(b"not an image at all")
    nodes = [tmp_path / "node_a", tmp_path / "node_b"]
    for d in nodes:
        d.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    procs = [_node(d, port, manifest, sets, env) for d in nodes]
    outs = _wait(procs, timeout=420)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]

    # the ranks: each broken row skipped by exactly one of them, both ranks read some
    by_rank: dict[int, list[int]] = {0: [], 1: []}
    for out in outs:
        for rank, row in SKIP_LINE.findall(out):
            by_rank[int(rank)].append(int(row))
    assert by_rank[0] and by_rank[1], by_rank
    assert not set(by_rank[0]) & set(by_rank[1])
    assert sorted(by_rank[0] + by_rank[1]) == sorted(broken)

    # one report, in rank 0's run dir; c10d rendezvous decides which node is rank 0
    reports = [d / "runs" / "demo" / "report.md" for d in nodes if (d / "runs" / "demo" / "report.md").exists()]
    assert len(reports) == 1, reports
    run0 = reports[0].parent
    other = next(d for d in nodes if d != run0.parent.parent) / "runs" / "demo"
    assert sorted(_skipped_rows(run0 / "skipped.csv")) == sorted(broken)  # both ranks', each row once
    assert not (run0 / "skipped.rank1.csv").exists()  # rank 1 never wrote into rank 0's run dir ...
    assert sorted(_skipped_rows(other / "skipped.rank1.csv")) == sorted(by_rank[1])  # ... but into its own
    assert not (other / "report.md").exists() and not (other / "checkpoints").exists()
    assert f"Skipped files (not decodable, logged in `skipped.csv`): {len(broken)}" in reports[0].read_text()
    assert "- ranks: 2" in reports[0].read_text()


def _check_worker(rank: int, store: str, cases: dict, results: str) -> None:
    import torch.distributed as dist

    from pillsnap_dali.errors import InputError
    from pillsnap_dali.training import multinode
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    out = {}
    for name, files in cases.items():  # one process group, every case in turn (a collective each)
        try:
            multinode.check_same_inputs([Path(files[rank])])
            out[name] = "ok"
        except Exception as e:  # the test reads each rank's outcome
            out[name] = f"{type(e).__name__}: {e}"
    try:  # rank 1 failed its own input checks (say, no --resume checkpoint on its machine)
        multinode.agree_inputs(InputError("--resume: /runs/x/last.pt does not exist") if rank == 1 else None)
        out["agree"] = "ok"
    except Exception as e:
        out["agree"] = f"{type(e).__name__}: {e}"
    dist.destroy_process_group()
    Path(results, f"rank{rank}.json").write_text(json.dumps(out), encoding="utf-8")


def test_a_rank_with_other_manifests_or_a_failed_check_stops_every_rank_with_one_error(tmp_path):
    import torch.multiprocessing as mp

    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for m in machines:
        m.mkdir()
    text = "path,code\n/data/a.png,K-000001\n"
    cases = {}
    for name, second in (("same", text), ("other", text + "/data/b.png,K-000002\n"), ("missing", None)):
        first, copy = (m / f"{name}_manifest.csv" for m in machines)
        first.write_text(text, encoding="utf-8")
        if second is not None:
            copy.write_text(second, encoding="utf-8")
        cases[name] = [str(first), str(copy)]
    mp.spawn(_check_worker, args=(str(tmp_path / "store"), cases, str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1))
    assert r1.pop("agree") == "InputError: --resume: /runs/x/last.pt does not exist"  # its own error, and
    assert r0.pop("agree") == (f"RankInputError: rank 1 (on {socket.gethostname()}) could not start: "  # rank 0's
                               "--resume: /runs/x/last.pt does not exist")
    assert r0 == r1  # every rank stops (or goes on) alike, with the same message
    assert r0["same"] == "ok"
    for name, says in (("other", "reads another"), ("missing", "has no")):
        assert r0[name].startswith(f"ManifestError: rank 1 (on {socket.gethostname()}) {says} {cases[name][1]}")
        assert "same absolute paths" in r0[name] and "docs/multinode.md" in r0[name]


def test_a_new_run_sets_aside_a_rank_skip_log_of_an_earlier_run(tmp_path):
    from pillsnap_dali.training.multinode import set_aside_stale_log

    log = tmp_path / "skipped.rank1.csv"
    log.write_text("row,split,path,reason,backend,epoch\n3,train,/x.png,broken,pil,0\n", encoding="utf-8")
    assert set_aside_stale_log(tmp_path, 0) is None and log.exists()  # rank 0's run dir is rank 0's business
    old = set_aside_stale_log(tmp_path, 1)
    assert not log.exists() and old.exists() and old.read_text().endswith("broken,pil,0\n")
    assert not list(tmp_path.glob("skipped.rank*.csv"))  # the report no longer counts it
    assert set_aside_stale_log(tmp_path, 1) is None
