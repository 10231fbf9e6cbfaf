"""Train and val transforms of the PASCAL-Context multi-task protocol (protocol.md 2.2, 2.3).

A raw sample is a dict of NumPy arrays as ``benchmark.dataset.PascalMT.load_raw`` returns them: ``image`` float64
[H, W, 3] (0..255), ``semseg``/``human_parts``/``sal`` uint8 [H, W], ``normals`` float64 [H, W, 3] (unit vectors,
0 where invalid). A transform turns it into tensors: ``image`` float32 [3, S, S] (ImageNet-normalised), labels
[C, S, S] in ``label_dtype`` (float32 by default; float64 is what the official loader gives and what the parity
check uses; every label value is exact in float32 except the normals, which differ by float32 rounding only).

Order (train): horizontal flip (p=0.5, normal x negated) -> scale 0.75-1.25 and rotation +-20 degrees about the
centre with a constant-0 border (0 is *background* for semseg/parts, a zero i.e. ignored normal) -> resize to
(S, S) without keeping the aspect ratio (normals renormalised) -> ignore regions -> tensors -> normalisation.
Val is the same without the first two steps. All resampling is OpenCV's, as in the official code: image and
normals cubic, semseg/human_parts/sal nearest.

uint8 cast of the image
-----------------------
After the cubic resize the image has values slightly outside [0, 255] near sharp edges. The official code casts
with ``astype(np.uint8)``: C truncation toward zero, and on x86-64 values below -1 or from 256 on *wrap* modulo 256
(-3.7 -> 253, 257.2 -> 1), so a dark pixel next to a bright edge becomes almost white. ``uint8_cast`` selects:

- ``"wrap"``: the official behaviour, reproduced explicitly (``trunc(x) mod 256``) so it does not depend on the
  platform's undefined float->uint8 conversion. Use it for parity with official numbers.
- ``"clamp"`` (default): clip to [0, 255], then truncate toward zero. It equals ``"wrap"`` everywhere except at
  the wrapped pixels, where it gives the saturated value instead of a wrapped one. Truncation (not rounding) is
  kept on purpose: rounding would move about half of all pixels by one step relative to the official pipeline,
  while clamping only changes the few pixels that the official cast corrupts.

Randomness
----------
A train transform holds a base ``seed``; the dataset calls it with ``(epoch, index)`` and every draw comes from
``numpy.random.default_rng([seed, epoch, index])``. A sample's augmentation therefore depends only on those three
numbers, not on the data-loader worker that produced it or on the order of loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UINT8_CASTS = ("clamp", "wrap")
IGNORE = 255

# OpenCV interpolation per entry (the official FLAGVALS): continuous signals cubic, label maps nearest.
INTERPOLATION = {
    "image": cv2.INTER_CUBIC,
    "semseg": cv2.INTER_NEAREST,
    "human_parts": cv2.INTER_NEAREST,
    "sal": cv2.INTER_NEAREST,
    "normals": cv2.INTER_CUBIC,
}
# The official renormalisation adds the float64 machine epsilon to the norm (np.finfo(np.float).eps).
_NORMALS_EPS = float(np.finfo(np.float64).eps)


def _entries(sample: dict[str, np.ndarray]) -> list[str]:
    unknown = sorted(set(sample) - set(INTERPOLATION))
    if unknown:
        raise KeyError(f"transform got unknown sample entries {unknown}; known: {sorted(INTERPOLATION)}")
    return list(sample)


def hflip(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mirror every entry left-right; the normals' x component changes sign."""
    out = {}
    for key in _entries(sample):
        arr = cv2.flip(sample[key], 1)
        if key == "normals":
            arr[..., 0] *= -1.0
        out[key] = arr
    return out


def scale_rotate(sample: dict[str, np.ndarray], angle: float, scale: float) -> dict[str, np.ndarray]:
    """Rotate by ``angle`` degrees (OpenCV sign: counter-clockwise) and scale about the centre, same output size.

    The border is constant 0. Normal vectors are also rotated in the image plane by the same angle, in the
    direction the official code uses: (x, y) -> (x cos a + y sin a, y cos a - x sin a).
    """
    out = {}
    for key in _entries(sample):
        arr = sample[key]
        h, w = arr.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        if key == "normals":
            arr = arr.copy()
            a = np.deg2rad(angle)
            x, y = arr[..., 0].copy(), arr[..., 1].copy()
            arr[..., 0] = x * np.cos(a) + y * np.sin(a)
            arr[..., 1] = y * np.cos(a) - x * np.sin(a)
        out[key] = cv2.warpAffine(arr, matrix, (w, h), flags=INTERPOLATION[key])
    return out


def resize(sample: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Resize every entry to (size, size), aspect ratio not kept; normals renormalised to unit length."""
    out = {}
    for key in _entries(sample):
        arr = cv2.resize(sample[key], (size, size), interpolation=INTERPOLATION[key])
        if key == "normals":
            norm = np.sqrt(arr[..., 0] ** 2 + arr[..., 1] ** 2 + arr[..., 2] ** 2) + _NORMALS_EPS
            arr = arr / norm[..., None]
        out[key] = arr
    return out


def add_ignore_regions(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero normals -> 255 in all three channels; a human_parts map without any part -> all 255."""
    out = dict(sample)
    if "normals" in out:
        arr = out["normals"].copy()
        zero = np.sqrt(arr[..., 0] ** 2 + arr[..., 1] ** 2 + arr[..., 2] ** 2) == 0
        arr[zero] = IGNORE
        out["normals"] = arr
    if "human_parts" in out and not out["human_parts"].any():
        out["human_parts"] = np.full_like(out["human_parts"], IGNORE)
    return out


def cast_uint8(image: np.ndarray, mode: str = "clamp") -> np.ndarray:
    """Float image -> uint8, truncating toward zero; out-of-range values clamp or wrap (module docstring)."""
    if mode == "wrap":
        return (np.trunc(image).astype(np.int64) & 0xFF).astype(np.uint8)
    if mode == "clamp":
        return np.trunc(np.clip(image, 0.0, 255.0)).astype(np.uint8)
    raise ValueError(f"uint8_cast must be one of {UINT8_CASTS}, got {mode!r}")


def to_tensors(
    sample: dict[str, np.ndarray],
    uint8_cast: str = "clamp",
    label_dtype: torch.dtype = torch.float32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, torch.Tensor]:
    """HWC arrays -> CHW tensors; the image goes through the uint8 cast, /255 and mean/std normalisation."""
    out = {}
    for key, arr in sample.items():
        if key == "image":
            img = torch.from_numpy(cast_uint8(arr, uint8_cast).transpose(2, 0, 1).copy()).to(torch.float32) / 255
            # Same float32 arithmetic as torchvision's ToTensor + Normalize.
            m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
            s = torch.tensor(std, dtype=torch.float32)[:, None, None]
            out[key] = (img - m) / s
        else:
            arr = arr[..., None] if arr.ndim == 2 else arr
            out[key] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(label_dtype)
    return out


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


@dataclass(frozen=True)
class MultiTaskTransform:
    """Callable ``(raw sample, epoch, index) -> tensors`` for train (random) or val (deterministic)."""

    image_size: int
    train: bool
    seed: int = 0
    uint8_cast: str = "clamp"
    label_dtype: torch.dtype = torch.float32
    flip_prob: float = 0.5
    rotation: tuple[float, float] = (-20.0, 20.0)
    scale: tuple[float, float] = (0.75, 1.25)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.uint8_cast not in UINT8_CASTS:
            raise ValueError(f"uint8_cast must be one of {UINT8_CASTS}, got {self.uint8_cast!r}")
        if int(self.image_size) < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")

    def draw(self, epoch: int, index: int) -> tuple[bool, float, float]:
        """(flip, angle in degrees, scale) for one sample; always three draws so they stay aligned."""
        rng = sample_rng(self.seed, epoch, index)
        u_flip, u_rot, u_scale = rng.random(3)
        lo, hi = self.rotation
        slo, shi = self.scale
        return bool(u_flip < self.flip_prob), lo + (hi - lo) * u_rot, slo + (shi - slo) * u_scale

    def __call__(self, sample: dict[str, np.ndarray], epoch: int = 0, index: int = 0) -> dict[str, torch.Tensor]:
        if self.train:
            flip, angle, scale = self.draw(epoch, index)
            if flip:
                sample = hflip(sample)
            sample = scale_rotate(sample, angle, scale)
        sample = add_ignore_regions(resize(sample, int(self.image_size)))
        return to_tensors(sample, self.uint8_cast, self.label_dtype, self.mean, self.std)


def build_transforms(
    image_size: int,
    train: bool,
    seed: int = 0,
    uint8_cast: str = "clamp",
    label_dtype: torch.dtype = torch.float32,
) -> MultiTaskTransform:
    """The protocol's train (``train=True``) or val transforms at ``image_size`` x ``image_size``."""
    return MultiTaskTransform(int(image_size), bool(train), int(seed), uint8_cast, label_dtype)
