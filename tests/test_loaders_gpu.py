"""The ``dali`` (GPU) backend: shape, dtype, device, parity with dali-cpu, no host round trip.

Run by scripts/gpu_check.sh on a CUDA machine; skipped without CUDA.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pillsnap_dali.benchmarks.loaders import bench_manifest
from pillsnap_dali.config import load_config
from pillsnap_dali.loaders import build_loader, resolve_backend
from pillsnap_dali.skiplog import SkipLog

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]



@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from pillsnap_dali.benchmarks.loaders import photo_like
    folder = tmp_path_factory.mktemp("gpu_photos")
    paths = []
    for i in range(4):
        paths.append(folder / f"photo_{i}.{'jpg' if i % 2 else 'png'}")
        Image.fromarray(photo_like(976, 1280, np.random.default_rng(i))).save(paths[-1], quality=95)
    return paths


def _cfg(*sets):
    return load_config(stage="demo", sets=["preprocess.img_size=128", "train.batch_size=4", *sets])


def test_auto_picks_dali_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")) == "dali"


@pytest.mark.parametrize("dtype,layout", [("float32", "NCHW"), ("float16", "NHWC")])
def test_gpu_batch_contract(photos, dtype, layout):
    cuda = torch.device("cuda")
    loader = build_loader(bench_manifest(photos), [0, 1, 2, 3], _cfg(f"loader.dtype={dtype}", f"loader.layout={layout}"),
                          train=True, device=cuda, backend="dali")
    assert loader.backend == "dali" and len(loader) == 1
    b = next(iter(loader))
    assert b.images.is_cuda and b.labels.is_cuda and b.rows.is_cuda
    assert b.images.shape == (4, 3, 128, 128) and b.images.dtype == getattr(torch, dtype)
    assert b.labels.tolist() == b.rows.tolist()  # label i was given to row i
    if layout == "NHWC":
        assert b.images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("workers", [0, 2])
def test_pil_backend_on_cuda_yields_cuda_batches_pinned_off_the_loop(photos, workers):
    cuda = torch.device("cuda")
    loader = build_loader(bench_manifest(photos), [0, 1, 2, 3], _cfg("loader.dtype=float16", f"loader.workers={workers}"),
                          train=True, device=cuda, backend="pil")
    dl = loader._data_loader([[0, 1, 2, 3]])
    assert dl.pin_memory  # the DataLoader's thread pins; to_device then copies without pinning again
    raw = next(iter(dl))
    assert raw.images.is_pinned() and raw.rows.is_pinned() and raw.images.dtype == torch.float16
    b = next(iter(loader))
    assert b.images.is_cuda and b.labels.is_cuda and b.rows.is_cuda and b.images.dtype == torch.float16
    assert sorted(b.rows.tolist()) == [0, 1, 2, 3] and b.labels.tolist() == b.rows.tolist()


def test_gpu_eval_matches_dali_cpu(photos):
    """Bound: mean absolute difference of the normalized eval tensors <= 0.03 (the GPU JPEG decoder and
    resampling differ slightly from the CPU ones)."""
    cfg = _cfg()
    gpu = next(iter(build_loader(bench_manifest(photos), [0] * 4, cfg, train=False, device=torch.device("cuda"),
                                 backend="dali"))).images.float().cpu()
    cpu = next(iter(build_loader(bench_manifest(photos), [0] * 4, cfg, train=False, device=torch.device("cpu"),
                                 backend="dali-cpu"))).images
    assert float((gpu - cpu).abs().mean(dim=(1, 2, 3)).max()) <= 0.03


def test_gpu_training_without_jitter_matches_dali_cpu_for_both_colour_modes(photos):
    """Full-image crop, no flip, no jitter: the training batch of ``dali`` (colour step on the GPU tensor)
    and of ``dali-cpu`` agree within the eval bound, with the colour step on the batch and in the graph."""
    plain = ["augment.random_area=[1.0,1.0]", f"augment.random_aspect_ratio=[{976 / 1280},{976 / 1280}]",
             "augment.hflip=0", "augment.brightness=0", "augment.contrast=0", "augment.saturation=0",
             "augment.hue=0"]
    from pillsnap_dali.benchmarks.loaders import colour_in_graph
    for mode in ("batch", "graph"):
        cfg = _cfg(*plain)
        out = {}
        for backend, dev in (("dali", "cuda"), ("dali-cpu", "cpu")):
            loader = build_loader(bench_manifest(photos), [0] * 4, cfg, train=True, device=torch.device(dev),
                                  backend=backend)
            if mode == "graph":
                colour_in_graph(loader)
            b = next(iter(loader))
            out[backend] = b.images.float().cpu()[b.rows.cpu().argsort()]
        assert float((out["dali"] - out["dali-cpu"]).abs().mean(dim=(1, 2, 3)).max()) <= 0.03


@pytest.mark.parametrize("colour", ["batch", "graph"])
def test_no_host_round_trip_between_decode_and_model(photos, colour):
    """The graph's image output lives in GPU memory (mixed decode, GPU ops after it) and the loader copies it
    device-to-device into the CUDA tensor it yields (the batch colour step then runs on that tensor)."""
    import nvidia.dali.backend as dali_backend

    from pillsnap_dali.config import AugmentConfig
    from pillsnap_dali.loaders.augment import draw_augment
    from pipelines import PipelineOptions, TrainSpec, classify_pipeline
    bufs = [np.fromfile(p, dtype=np.uint8) for p in photos]
    rows = np.arange(len(bufs), dtype=np.int64)
    fed = iter([(bufs, rows, draw_augment(AugmentConfig(), 0, 0, rows, [(976, 1280)] * len(bufs)))])
    pipe = classify_pipeline(lambda: next(fed), TrainSpec(img_size=64, colour=colour),
                             PipelineOptions(batch_size=4, device="gpu", device_id=torch.cuda.current_device()))
    images, rows = pipe.run()
    assert isinstance(images.as_tensor(), dali_backend.TensorGPU)
    assert isinstance(rows.as_tensor(), dali_backend.TensorCPU)  # row ids stay on the host, tiny
    from pillsnap_dali.benchmarks.loaders import colour_in_graph
    loader = build_loader(bench_manifest(photos), [0] * 4, _cfg(), train=True, device=torch.device("cuda"),
                          backend="dali")
    if colour == "graph":
        colour_in_graph(loader)
    assert next(iter(loader)).images.is_cuda


def test_gpu_epoch_survives_a_corrupt_file(photos, tmp_path):
    bad = tmp_path / "truncated.png"
    bad.write_bytes(Path(photos[0]).read_bytes()[:5000])
    paths = list(photos) + [bad]
    log = SkipLog(None)
    loader = build_loader(bench_manifest(paths), [0] * 5, _cfg(), train=True, device=torch.device("cuda"),
                          backend="dali", skip_log=log)
    rows = [r for b in loader for r in b.rows.tolist()]
    assert sorted(rows) == [0, 1, 2, 3] and log.rows == {4}


def test_colour_step_and_dali_batches_make_no_host_device_sync(photos):
    """Past the first batch (which makes per-device constants and pinned buffers), neither the batch colour
    step nor the loader's hand-over waits for the GPU: torch's sync debug mode turns any sync into an error."""
    from pillsnap_dali.config import AugmentConfig
    from pillsnap_dali.loaders.augment import draw_augment
    from pipelines import IMAGENET_MEAN, IMAGENET_STD, BatchColour
    colour = BatchColour(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    aug = draw_augment(AugmentConfig(), 0, 0, np.arange(4), [(64, 64)] * 4)
    x = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8, device="cuda")
    colour(x, aug)
    loader = build_loader(bench_manifest(list(photos) * 3), [0] * 12, _cfg(), train=True, device=torch.device("cuda"),
                          backend="dali")
    it = iter(loader)
    next(it)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = colour(x, aug)
        rest = list(it)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.is_cuda and len(rest) == 2 and all(b.images.is_cuda for b in rest)


def test_gpu_monitor_watches_the_cuda_device_it_is_given():
    """NVML found by UUID, so its memory total is that of torch's device (NVML's own order can differ)."""
    from pillsnap_dali.gpumon import GpuMonitor
    dev = torch.cuda.current_device()
    mon = GpuMonitor(dev)
    assert mon.available
    total = mon.sample()["gpu_mem_total_gb"] * 2**30
    assert abs(total - torch.cuda.get_device_properties(dev).total_memory) / total < 0.05


def test_gpu_pipelines_live_across_epochs_with_flat_device_memory(photos):
    """One pipeline per loader for every epoch, and the device's free memory (what NVML sees, DALI's pool
    included) does not shrink from epoch 1 on: the per-epoch rebuilds that leaked are gone."""
    loader = build_loader(bench_manifest(list(photos) * 4), [0] * 16, _cfg(), train=True, device=torch.device("cuda"),
                          backend="dali")
    free = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        assert sum(len(b.rows) for b in loader) == 16
        torch.cuda.synchronize()
        free.append(torch.cuda.mem_get_info()[0])
    assert loader.runner.builds == 1
    assert free[1] - free[-1] < 64 * 2 ** 20, [f // 2 ** 20 for f in free]
