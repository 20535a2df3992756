"""Training colour jitter + normalization as one per-sample affine on the batch, on the training device.

The DALI training graph stops at uint8 CHW (decode of the crop window, resize, flip), as does the ``pil``
backend's transform, and ``BatchColour`` finishes the batch where it lands, with the jitter factors of the
samples' host-side draws (``AUG_FIELDS``): hue, saturation, brightness and
contrast are all linear in RGB, so together with the ImageNet normalization they are one 3x3 matrix and
one offset per sample, applied to the whole batch by a single ``torch.baddbmm`` (then a clamp to the
normalized [0, 255] range, the dtype and the memory layout). On 2 CPU cores this costs ~0.4 ms per
384 px image where DALI's ``color_twist`` + ``crop_mirror_normalize`` cost ~4.6 ms, and the DALI output
copied out of the pipeline is uint8, a quarter of the float32 bytes. On a GPU it is one small kernel.

Semantics (torchvision's, in its order): hue shift by ``h`` of a turn,
as a rotation of the chroma plane in YIQ: exactly DALI's ``color_twist`` hue (the benchmark arm, tested),
turning the way torchvision's ``adjust_hue`` does (red towards yellow for h > 0) but by less on saturated
colours (torchvision shifts HSV hue: red at h = 0.1 becomes (255, 153, 0) there, (196, 64, 0) here); saturation ``s``:
``s * x + (1 - s) * gray(x)``; brightness ``b``: ``b * x``; contrast ``c``: ``c * x + (1 - c) * mean gray``
of the image; clamped once at the end (torchvision clamps after each step) then normalized.

Imports torch and numpy only.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

# The per-sample augmentation vector every training backend applies (``pipelines.AUG``, made on the host by
# ``pillsnap_dali.loaders.augment.draw_augment``): the crop window relative to the upright image, the flip,
# then the jitter factors (brightness, contrast, saturation around 1; hue in turns).
AUG_FIELDS = ("crop_x", "crop_y", "crop_w", "crop_h", "flip", "brightness", "contrast", "saturation", "hue")
AUG_INDEX = {name: i for i, name in enumerate(AUG_FIELDS)}
JITTER_FIELDS = ("brightness", "contrast", "saturation", "hue")
# the detection training graph's per-sample draws (pipelines.detect.DRAWS): flips 0/1, hue shift in degrees,
# saturation and value gains around 1
DETECT_FIELDS = ("flip_h", "flip_v", "hue", "saturation", "value")
# ITU-R 601 luma weights (PIL's "L" conversion, torchvision's rgb_to_grayscale)
LUMA = np.array([0.299, 0.587, 0.114])
_RGB2YIQ = np.array([[0.299, 0.587, 0.114],
                     [0.596, -0.274, -0.322],
                     [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def hue_saturation_matrices(hue: np.ndarray, saturation: np.ndarray) -> np.ndarray:
    """(n, 3, 3) RGB matrices: hue rotation by ``hue`` turns, then saturation factor ``saturation``."""
    hue, saturation = np.asarray(hue, np.float64), np.asarray(saturation, np.float64)
    n = len(hue)
    theta = -2.0 * math.pi * hue  # the direction of DALI's color_twist and torchvision's adjust_hue (red -> yellow)
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = np.cos(theta), -np.sin(theta)
    rot[:, 2, 1], rot[:, 2, 2] = np.sin(theta), np.cos(theta)
    hue_m = _YIQ2RGB @ rot @ _RGB2YIQ
    gray = np.ones((3, 1)) @ LUMA[None, :]  # x -> gray(x) in every channel
    sat_m = saturation[:, None, None] * np.eye(3) + (1.0 - saturation)[:, None, None] * gray
    return sat_m @ hue_m


class BatchColour:
    """Applies each sample's jitter + the normalization to a uint8 (B, 3, H, W) batch.

    The factors are the samples' augmentation draws (``AUG_FIELDS`` vectors, one row per sample, made on the
    host by ``pillsnap_dali.loaders.augment.draw_augment``): this step draws nothing itself, so the ``dali``
    and ``pil`` backends apply the same jitter to the same rows. ``dtype`` float32/float16, ``layout`` NCHW
    or NHWC (channels_last memory, logical NCHW shape, like every Batch).
    """

    def __init__(self, *, mean: Sequence[float], std: Sequence[float], dtype: str = "float32",
                 layout: str = "NCHW"):
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")
        self.mean, self.std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        self.dtype, self.layout = getattr(torch, dtype), layout
        self._lo, self._hi = (-self.mean / self.std).tolist(), ((1.0 - self.mean) / self.std).tolist()
        self._consts: dict = {}
        self._buf: Optional[torch.Tensor] = None

    def _float_input(self, u8: torch.Tensor) -> torch.Tensor:
        """The uint8 batch as float32 in a buffer kept between batches (it never leaves this object):
        a fresh 28 MB tensor per 16 x 384 px batch costs page faults on every batch on a CPU."""
        buf = self._buf
        if buf is None or buf.shape != u8.shape or buf.device != u8.device:
            buf = self._buf = torch.empty(u8.shape, dtype=torch.float32, device=u8.device)
        return buf.copy_(u8)

    def _device_consts(self, device: torch.device) -> tuple:
        """(luma (3,), scale (1,3,1), shift (1,3,1)) on ``device``, made once per device."""
        if device not in self._consts:
            as_t = lambda a: torch.as_tensor(a, dtype=torch.float32).to(device)  # noqa: E731
            self._consts[device] = (as_t(LUMA), as_t(1.0 / (255.0 * self.std)).view(1, 3, 1),
                                    as_t(-self.mean / self.std).view(1, 3, 1))
        return self._consts[device]

    @staticmethod
    def _to_device(params: np.ndarray, device: torch.device) -> torch.Tensor:
        """Per-batch parameters to the batch's device without a host-device sync: a plain
        ``torch.as_tensor(..., device="cuda")`` waits for the stream (every queued kernel of the last step)."""
        t = torch.from_numpy(params)
        if device.type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)

    def __call__(self, images: torch.Tensor, aug: np.ndarray) -> torch.Tensor:
        """``images`` uint8 (B, 3, H, W); ``aug`` the B samples' draws, (B, len(AUG_FIELDS)) on the host."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchColour takes uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        aug = np.asarray(aug, dtype=np.float64)
        if aug.shape != (images.shape[0], len(AUG_FIELDS)):
            raise ValueError(f"BatchColour needs one draw of {len(AUG_FIELDS)} values per image, got {aug.shape} "
                             f"for {images.shape[0]} images")
        factors = {name: aug[:, AUG_INDEX[name]] for name in JITTER_FIELDS}
        if images.device.type != "cpu" or torch.get_num_threads() == 1:
            return self._apply(images, factors)
        # On the CPU this runs beside DALI's worker threads: torch's own intra-op threads would only
        # oversubscribe the cores (measured: 300 -> 375 img/s on 2 cores with one thread here).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._apply(images, factors)
        finally:
            torch.set_num_threads(threads)

    def _apply(self, images: torch.Tensor, f: dict) -> torch.Tensor:
        b, _, h, w = images.shape
        dev = images.device
        luma, scale, shift = self._device_consts(dev)
        x = self._float_input(images.reshape(b, 3, h * w))
        # colour matrix on 0..255 values: brightness * hue/saturation; contrast blends with the mean gray
        m = hue_saturation_matrices(f["hue"], f["saturation"]) * f["brightness"][:, None, None]
        params = self._to_device(np.concatenate([m.reshape(b, 9), f["contrast"][:, None]], axis=1)
                                 .astype(np.float32), dev)
        m_t, c = params[:, :9].reshape(b, 3, 3), params[:, 9]
        if np.any(f["contrast"] != 1.0):
            # the image's mean gray after hue/saturation/brightness
            mean_gray = luma @ torch.bmm(m_t, x.mean(dim=2, keepdim=True)).squeeze(2).T  # (b,)
            offset = ((1.0 - c) * mean_gray).view(b, 1, 1).expand(b, 3, 1)
        else:
            offset = torch.zeros(b, 3, 1, device=dev)
        m_t = m_t * c.view(b, 1, 1)
        # normalize: y = (x' / 255 - mean) / std, folded into the matrix and the offset
        y = torch.baddbmm(offset * scale + shift, m_t * scale, x)
        for ch in range(3):  # = clamp of x' to [0, 255]; scalar bounds per channel (tensor bounds: 3x slower)
            y[:, ch].clamp_(self._lo[ch], self._hi[ch])
        y = y.view(b, 3, h, w)
        # dtype and memory layout in one copy (float16 channels_last used to copy the batch twice)
        fmt = torch.channels_last if self.layout == "NHWC" else torch.contiguous_format
        return y.to(dtype=self.dtype, memory_format=fmt)
