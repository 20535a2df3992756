"""``--pretrained imagenet``: timm's published weights from a local file (timm's pretrained_cfg_overlay), from
a Hugging Face cache with HF_HUB_OFFLINE=1, and a one-line error when neither has them. Real timm, real
training CLI in a subprocess (the HF settings are read when huggingface_hub is imported); no network."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pillsnap_dali.config import load_config
from pillsnap_dali.training import pretrained
from pillsnap_dali.training.checkpoint import load_checkpoint

MODEL = "test_efficientnet"  # published as timm/test_efficientnet.r160_in1k
TINY = ["--model", MODEL, "--img-size", "32", "--batch-size", "16", "--epochs", "1", "--set", "loader.threads=1",
        "--set", "loader.workers=1", "--set", "train.warmup_epochs=0", "--set", "train.max_skipped=0.1"]
REPO = Path(__file__).resolve().parents[1]


def _published_weights(path: Path) -> dict:
    """A stand-in for the hub's model.safetensors: the 1000-class model's state dict, seeded."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    sd = {k: v.contiguous() for k, v in timm.create_model(MODEL, num_classes=1000).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return sd


def test_imagenet_weights_from_a_local_file_go_through_timm(tmp_path):
    published = _published_weights(tmp_path / "model.safetensors")
    cfg = load_config("demo", sets=[f"model.name={MODEL}", "model.pretrained=imagenet",
                                    f"model.pretrained_file={tmp_path / 'model.safetensors'}"])
    model = pretrained.create_model(cfg, num_classes=6)
    own = model.state_dict()
    assert torch.equal(own["conv_stem.weight"], published["conv_stem.weight"])
    body = [k for k in published if not k.startswith("classifier.")]
    assert len(body) > 20 and all(torch.equal(own[k], published[k]) for k in body)
    assert own["classifier.weight"].shape[0] == 6  # the stage's head, not ImageNet's 1000 classes
    origin = pretrained.weights_origin(model, cfg)
    assert origin == {"kind": "imagenet", "source": "file", "file": str((tmp_path / "model.safetensors").resolve()),
                      "hub_id": "timm/test_efficientnet.r160_in1k",
                      "sha256": hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()}
    random_cfg = load_config("demo", sets=[f"model.name={MODEL}"])
    assert pretrained.weights_origin(pretrained.create_model(random_cfg, 6), random_cfg) == {"kind": "random"}


def test_a_missing_or_foreign_pretrained_file_is_a_clear_error(tmp_path):
    cfg = load_config("demo", sets=[f"model.name={MODEL}", "model.pretrained=imagenet",
                                    f"model.pretrained_file={tmp_path / 'absent.safetensors'}"])
    with pytest.raises(pretrained.PretrainedError, match="absent.safetensors does not exist"):
        pretrained.create_model(cfg, 6)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(3)}, bad)
    cfg = load_config("demo", sets=[f"model.name={MODEL}", "model.pretrained=imagenet", f"model.pretrained_file={bad}"])
    with pytest.raises(pretrained.PretrainedError, match="cannot be loaded as the ImageNet weights"):
        pretrained.create_model(cfg, 6)


def _train(manifests, run_root, hf_home, *extra):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-m", "pillsnap_dali.train", "--manifest", str(manifests / "manifest_train.csv"),
           "--out", str(run_root), "--name", "r", "--pretrained", "imagenet", *TINY, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_imagenet_offline_reads_the_hf_cache_and_fails_in_one_line_without_it(manifests, tmp_path):
    res = _train(manifests, tmp_path / "runs0", tmp_path / "empty_hf")
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ImageNet weights of test_efficientnet (timm/test_efficientnet.r160_in1k) are "
                           "not in the Hugging Face cache and HF_HUB_OFFLINE is set")
    assert "pretrained=True" in last and "model.pretrained_file" in last and "Traceback" not in res.stderr
    # the same weights placed in the cache as huggingface_hub lays it out: read from there, nothing downloaded
    snap = tmp_path / "hf/hub/models--timm--test_efficientnet.r160_in1k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs/main").write_text("0" * 40)
    _published_weights(snap / "snapshots" / ("0" * 40) / "model.safetensors")
    res = _train(manifests, tmp_path / "runs1", tmp_path / "hf")
    assert res.returncode == 0, res.stderr[-2000:]
    origin = load_checkpoint(tmp_path / "runs1/r/checkpoints/last.pt")["weights_origin"]
    assert origin["kind"] == "imagenet" and origin["source"] == "hf-cache"
    assert origin["file"].endswith("snapshots/" + "0" * 40 + "/model.safetensors")
