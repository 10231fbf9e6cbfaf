"""Train and val transforms of the PASCAL-Context multi-task protocol (docs/protocol.md 2.2, 2.3).

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

Implementation
--------------
``MultiTaskTransform.__call__`` applies the same steps as the step functions below, one entry at a time, with
fewer copies and passes: the normals are rotated straight into a new array, the resize works on one channel at a
time, the normals are renormalised straight into the [C, S, S] layout of their tensor, and the image normalisation
(uint8 -> float32 ``/ 255``, ``- mean``, ``/ std``) is a lookup table of the 256 possible values built with the
same float32 torch operations. The arithmetic is unchanged (the same OpenCV calls with the same flags on float64
data, the same NumPy operations in the same order), so the tensors are bitwise those of the plain step-by-step
implementation that ``tests/test_transforms_fast.py`` keeps as its reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

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


# ---------------------------------------------------------------------------------------------------------------
# One entry at a time ([H, W, C] or [H, W] arrays); shared by the step functions and MultiTaskTransform


def _flip_entry(key: str, arr: np.ndarray) -> np.ndarray:
    out = cv2.flip(arr, 1)
    if key == "normals":
        out[..., 0] *= -1.0
    return out


def _rotate_normal_vectors(arr: np.ndarray, angle: float) -> np.ndarray:
    """(x, y) -> (x cos a + y sin a, y cos a - x sin a) into a new array; the other channels are copied."""
    a = np.deg2rad(angle)
    cos, sin = np.cos(a), np.sin(a)
    x, y = arr[..., 0], arr[..., 1]
    new_x = x * cos
    new_x += y * sin
    new_y = y * cos
    new_y -= x * sin
    out = np.empty(arr.shape, arr.dtype)
    out[..., 0], out[..., 1], out[..., 2:] = new_x, new_y, arr[..., 2:]
    return out


def _scale_rotate_entry(key: str, arr: np.ndarray, angle: float, scale: float) -> np.ndarray:
    h, w = arr.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    if key == "normals":
        arr = _rotate_normal_vectors(arr, angle)
    return cv2.warpAffine(arr, matrix, (w, h), flags=INTERPOLATION[key])


def _normals_norm(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Per pixel of the normals' channels (x, y, z, ...): the official sqrt(x**2 + y**2 + z**2) + eps, with the same
    operations in the same order."""
    norm = channels[0] ** 2
    norm += channels[1] ** 2
    norm += channels[2] ** 2
    np.sqrt(norm, out=norm)
    norm += _NORMALS_EPS
    return norm


def _zero_length(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Mask of the zero-length vectors, given their channels (a [C, H, W] array, view or list of planes)."""
    sq = channels[0] ** 2
    sq += channels[1] ** 2
    sq += channels[2] ** 2
    # The official test is sqrt(sq) == 0; a sum of squares is never negative, so that is sq == 0.
    return sq == 0


def _parts_or_ignore(arr: np.ndarray) -> np.ndarray:
    """A human_parts map without any part (no person in the image) becomes all 255."""
    return arr if arr.any() else np.full_like(arr, IGNORE)


@cache
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [C, 256]: the normalised value of each uint8 value, per channel.

    Built with exactly the torch operations once applied pixel by pixel (float32 ``/ 255``, then ``(x - mean) / std``,
    each an exactly rounded IEEE operation), so a lookup gives the same bits.
    """
    values = torch.arange(256, dtype=torch.uint8).to(torch.float32).expand(len(mean), 1, 256) / 255
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    table = ((values - m) / s)[:, 0, :].numpy().copy()
    table.flags.writeable = False
    return table


def _image_tensor(channels: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The image's uint8 channels -> float32 [C, H, W], /255 and mean/std normalised."""
    table = _normalisation_table(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if len(channels) != len(table):
        raise ValueError(f"the image has {len(channels)} channels but there are {len(table)} mean/std values")
    out = np.empty((len(channels), *channels[0].shape), np.float32)
    for c, plane in enumerate(channels):
        cv2.LUT(plane, table[c], dst=out[c])
    return torch.from_numpy(out)


def _split(arr: np.ndarray) -> list[np.ndarray]:
    """The channels of an [H, W, C] array as contiguous [H, W] arrays ([arr] for an [H, W] array)."""
    return list(cv2.split(arr)) if arr.ndim == 3 else [arr]


def _label_tensor(arr: np.ndarray, label_dtype: torch.dtype) -> torch.Tensor:
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(label_dtype)


# ---------------------------------------------------------------------------------------------------------------
# The steps on whole samples


def hflip(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mirror every entry left-right; the normals' x component changes sign."""
    return {key: _flip_entry(key, sample[key]) for key in _entries(sample)}


def scale_rotate(sample: dict[str, np.ndarray], angle: float, scale: float) -> dict[str, np.ndarray]:
    """Rotate by ``angle`` degrees (OpenCV sign: counter-clockwise) and scale about the centre, same output size.

    The border is constant 0. Normal vectors are also rotated in the image plane by the same angle, in the
    direction the official code uses: (x, y) -> (x cos a + y sin a, y cos a - x sin a).
    """
    return {key: _scale_rotate_entry(key, sample[key], angle, scale) for key in _entries(sample)}


def resize(sample: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Resize every entry to (size, size), aspect ratio not kept; normals renormalised to unit length."""
    out = {}
    for key in _entries(sample):
        arr = cv2.resize(sample[key], (size, size), interpolation=INTERPOLATION[key])
        out[key] = arr / _normals_norm(arr.transpose(2, 0, 1))[..., None] if key == "normals" else arr
    return out


def add_ignore_regions(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero normals -> 255 in all three channels; a human_parts map without any part -> all 255."""
    out = dict(sample)
    if "normals" in out:
        arr = out["normals"].copy()
        np.copyto(arr, IGNORE, where=_zero_length(arr.transpose(2, 0, 1))[..., None])
        out["normals"] = arr
    if "human_parts" in out:
        out["human_parts"] = _parts_or_ignore(out["human_parts"])
    return out


def cast_uint8(image: np.ndarray, mode: str = "clamp") -> np.ndarray:
    """Float image -> uint8, truncating toward zero; out-of-range values clamp or wrap (module docstring)."""
    # A float -> integer conversion truncates toward zero by itself, so no separate trunc pass is needed; and the
    # int64 -> uint8 conversion keeps the low byte, i.e. it is the modulo 256.
    if mode == "wrap":
        return image.astype(np.int64).astype(np.uint8)
    if mode == "clamp":
        return np.clip(image, 0.0, 255.0).astype(np.uint8)
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
            # Same float32 arithmetic as torchvision's ToTensor + Normalize (through the lookup table).
            out[key] = _image_tensor(_split(cast_uint8(arr, uint8_cast)), mean, std)
        else:
            out[key] = _label_tensor(arr, label_dtype)
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
        # hflip -> scale_rotate -> resize -> add_ignore_regions -> to_tensors, one entry at a time
        size = int(self.image_size)
        flip, angle, scale = self.draw(epoch, index) if self.train else (False, 0.0, 1.0)
        out = {}
        for key in _entries(sample):
            arr = sample[key]
            if flip:
                arr = _flip_entry(key, arr)
            if self.train:
                arr = _scale_rotate_entry(key, arr, angle, scale)
            # Resized one channel at a time: the same result as resizing [H, W, C] at once (each channel is
            # resampled with the same coefficients) and faster for float64 maps. The warp above stays on
            # [H, W, C]: there, one call for three channels is faster than three calls.
            channels = [cv2.resize(c, (size, size), interpolation=INTERPOLATION[key]) for c in _split(arr)]
            if key == "image":
                out[key] = _image_tensor([cast_uint8(c, self.uint8_cast) for c in channels], self.mean, self.std)
            elif key == "normals":
                norm = _normals_norm(channels)
                normals = np.empty((len(channels), size, size), np.result_type(channels[0], norm))
                for c, channel in enumerate(channels):
                    np.divide(channel, norm, out=normals[c])
                np.copyto(normals, IGNORE, where=_zero_length(normals))  # much faster than normals[:, mask] = 255
                out[key] = torch.from_numpy(normals).to(self.label_dtype)
            else:
                arr = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
                out[key] = _label_tensor(_parts_or_ignore(arr) if key == "human_parts" else arr, self.label_dtype)
        return out


def build_transforms(
    image_size: int,
    train: bool,
    seed: int = 0,
    uint8_cast: str = "clamp",
    label_dtype: torch.dtype = torch.float32,
) -> MultiTaskTransform:
    """The protocol's train (``train=True``) or val transforms at ``image_size`` x ``image_size``."""
    return MultiTaskTransform(int(image_size), bool(train), int(seed), uint8_cast, label_dtype)
