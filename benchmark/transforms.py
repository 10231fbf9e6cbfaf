"""Train and val transforms of a protocol (docs/protocol.md 2.2, 2.3): the same family for every protocol.

A raw sample is a dict of NumPy arrays as a dataset module's ``load_raw`` returns it: ``image`` float64 [H, W, 3]
(0..255) and one entry per task of the protocol, named as the task. What happens to a task's entry is decided by its
task kind (``benchmark.tasks``: interpolation, flip, zoom/rotation, ignore regions, tensor layout); this module
names no task. A transform turns the sample into tensors: ``image`` float32 [3, S, S] (normalised with the
protocol's mean/std), labels [C, S, S] in ``label_dtype`` (float32 by default; float64 is what the official loaders
give and what the parity checks use).

Order (train): horizontal flip (with the protocol's ``flip_prob``) -> zoom about the centre by a scale drawn from
the protocol's ``scale`` range (uniform) or its ``scale_choices`` (equal odds), and a rotation drawn from its
``rotation`` range (``(0, 0)``: none), constant-0 border -> resize to (S, S) without keeping the aspect ratio ->
ignore regions -> tensors -> normalisation. Val is the same without the first two steps. All resampling is
OpenCV's, as in the official code: the image cubic, each label with its kind's interpolation.

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
``numpy.random.default_rng([seed, epoch, index])``: always three uniforms (flip, rotation, scale), whatever the
protocol's ranges, so a sample's augmentation depends only on those three numbers, not on the data-loader worker
that produced it or on the order of loading. ``MultiTaskTransform.apply`` takes the draws as arguments: the parity
checks force them through it (the same code path as a random draw).

Implementation
--------------
``MultiTaskTransform.apply`` applies the same steps as the step functions below, one entry at a time, with fewer
copies and passes: the resize works on one channel at a time, the kind's ``finish`` turns the resized channels into
the tensor (the normals renormalised straight into the [C, S, S] layout), and the image normalisation (uint8 ->
float32 ``/ 255``, ``- mean``, ``/ std``) is a lookup table of the 256 possible values built with the same float32
torch operations. The arithmetic is unchanged (the same OpenCV calls with the same flags, the same NumPy operations
in the same order), so the tensors are bitwise those of the plain step-by-step implementation that
``tests/test_transforms_fast.py`` keeps as its reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import NamedTuple

import cv2
import numpy as np
import torch

from benchmark.protocol import Protocol, TaskSpec
from benchmark.tasks import IGNORE, TaskKind, kind_of, label_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UINT8_CASTS = ("clamp", "wrap")
IMAGE = "image"  # the one entry that is not a task
IMAGE_INTERPOLATION = cv2.INTER_CUBIC

__all__ = [
    "IGNORE", "IMAGENET_MEAN", "IMAGENET_STD", "UINT8_CASTS", "Draw", "MultiTaskTransform", "add_ignore_regions",
    "build_transforms", "cast_uint8", "entry_kinds", "hflip", "resize", "sample_rng", "scale_rotate", "to_tensors",
]  # fmt: skip

TaskList = Protocol | Sequence[TaskSpec]


def entry_kinds(tasks: TaskList) -> dict[str, TaskKind]:
    """{task name: its task kind} for a protocol or a list of its TaskSpecs."""
    specs = tasks.tasks if isinstance(tasks, Protocol) else tuple(tasks)
    return {t.name: kind_of(t) for t in specs}


def _entries(sample: Mapping[str, np.ndarray], kinds: Mapping[str, TaskKind]) -> list[str]:
    unknown = sorted(set(sample) - set(kinds) - {IMAGE})
    if unknown:
        raise KeyError(f"transform got unknown sample entries {unknown}; known: {[IMAGE, *kinds]}")
    return list(sample)


# ---------------------------------------------------------------------------------------------------------------
# One entry at a time ([H, W, C] or [H, W] arrays); shared by the step functions and MultiTaskTransform


def _flip_entry(kind: TaskKind | None, arr: np.ndarray) -> np.ndarray:
    return cv2.flip(arr, 1) if kind is None else kind.flip(arr)


def _warp_entry(kind: TaskKind | None, arr: np.ndarray, angle: float, scale: float) -> np.ndarray:
    if kind is not None:
        return kind.warp(arr, angle, scale)
    h, w = arr.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    return cv2.warpAffine(arr, matrix, (w, h), flags=IMAGE_INTERPOLATION)


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


# ---------------------------------------------------------------------------------------------------------------
# The steps on whole samples


def hflip(sample: Mapping[str, np.ndarray], tasks: TaskList) -> dict[str, np.ndarray]:
    """Mirror every entry left-right, each label as its kind says (the normals' x component changes sign)."""
    kinds = entry_kinds(tasks)
    return {key: _flip_entry(kinds.get(key), sample[key]) for key in _entries(sample, kinds)}


def scale_rotate(
    sample: Mapping[str, np.ndarray], tasks: TaskList, angle: float, scale: float
) -> dict[str, np.ndarray]:
    """Rotate by ``angle`` degrees (OpenCV sign: counter-clockwise) and scale about the centre, same output size.

    The border is constant 0. Each label's values follow its kind: normal vectors rotate in the image plane by the
    same angle, (x, y) -> (x cos a + y sin a, y cos a - x sin a), the official direction; depth is divided by the
    scale.
    """
    kinds = entry_kinds(tasks)
    return {key: _warp_entry(kinds.get(key), sample[key], angle, scale) for key in _entries(sample, kinds)}


def resize(sample: Mapping[str, np.ndarray], tasks: TaskList, size: int) -> dict[str, np.ndarray]:
    """Resize every entry to (size, size), aspect ratio not kept; normals renormalised to unit length."""
    kinds = entry_kinds(tasks)
    out = {}
    for key in _entries(sample, kinds):
        kind = kinds.get(key)
        if kind is None:
            out[key] = cv2.resize(sample[key], (size, size), interpolation=IMAGE_INTERPOLATION)
        else:
            out[key] = kind.resize(sample[key], size)
    return out


def add_ignore_regions(sample: Mapping[str, np.ndarray], tasks: TaskList) -> dict[str, np.ndarray]:
    """Each label's unlabelled pixels -> 255, as its kind says (zero normals, a parts map without parts, depth 0)."""
    kinds = entry_kinds(tasks)
    return {key: sample[key] if key not in kinds else kinds[key].ignore_regions(sample[key]) for key in sample}


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
    sample: Mapping[str, np.ndarray],
    uint8_cast: str = "clamp",
    label_dtype: torch.dtype = torch.float32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict[str, torch.Tensor]:
    """HWC arrays -> CHW tensors; the image goes through the uint8 cast, /255 and mean/std normalisation."""
    out = {}
    for key, arr in sample.items():
        if key == IMAGE:
            # Same float32 arithmetic as torchvision's ToTensor + Normalize (through the lookup table).
            out[key] = _image_tensor(_split(cast_uint8(arr, uint8_cast)), mean, std)
        else:
            out[key] = label_tensor(arr, label_dtype)
    return out


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


class Draw(NamedTuple):
    """The random choices of one train sample."""

    flip: bool
    angle: float  # degrees
    scale: float


NO_DRAW = Draw(False, 0.0, 1.0)


@dataclass(frozen=True)
class MultiTaskTransform:
    """Callable ``(raw sample, epoch, index) -> tensors`` for train (random) or val (deterministic).

    ``tasks`` pairs each task entry with its task kind's name; the augmentation fields are the protocol's
    (``build_transforms`` copies them from it)."""

    image_size: int
    train: bool
    tasks: tuple[tuple[str, str], ...]  # (entry name, task-kind name)
    seed: int = 0
    uint8_cast: str = "clamp"
    label_dtype: torch.dtype = torch.float32
    flip_prob: float = 0.5
    rotation: tuple[float, float] = (0.0, 0.0)
    scale: tuple[float, float] = (1.0, 1.0)
    scale_choices: tuple[float, ...] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    _kinds: dict[str, TaskKind] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from benchmark.tasks import TASK_KINDS

        if self.uint8_cast not in UINT8_CASTS:
            raise ValueError(f"uint8_cast must be one of {UINT8_CASTS}, got {self.uint8_cast!r}")
        if int(self.image_size) < 1:
            raise ValueError(f"image_size must be a positive integer, got {self.image_size!r}")
        if not 0.0 <= float(self.flip_prob) <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob!r}")
        if self.scale_choices is not None and (
            not self.scale_choices or any(not float(c) > 0 for c in self.scale_choices)
        ):
            raise ValueError(f"scale_choices must be positive zooms, got {self.scale_choices!r}")
        if not 0 < float(self.scale[0]) <= float(self.scale[1]):
            raise ValueError(f"scale must be a range (lo, hi) with 0 < lo <= hi, got {self.scale!r}")
        if float(self.rotation[0]) > float(self.rotation[1]):
            raise ValueError(f"rotation must be a range (lo, hi) with lo <= hi, got {self.rotation!r}")
        object.__setattr__(self, "_kinds", {name: TASK_KINDS.get(kind) for name, kind in self.tasks})

    def draw(self, epoch: int, index: int) -> Draw:
        """(flip, angle in degrees, scale) for one sample; always three draws so they stay aligned."""
        rng = sample_rng(self.seed, epoch, index)
        u_flip, u_rot, u_scale = rng.random(3)
        lo, hi = self.rotation
        # rotation (0, 0): no rotation at all (the angle is exactly 0, not a draw from an empty range)
        angle = 0.0 if lo == hi == 0 else lo + (hi - lo) * u_rot
        if self.scale_choices is not None:  # equal odds: the k-th of n choices for u in [k/n, (k+1)/n)
            n = len(self.scale_choices)
            scale = float(self.scale_choices[min(int(u_scale * n), n - 1)])
        else:
            slo, shi = self.scale
            scale = slo + (shi - slo) * u_scale
        return Draw(bool(u_flip < self.flip_prob), angle, scale)

    def __call__(self, sample: Mapping[str, np.ndarray], epoch: int = 0, index: int = 0) -> dict[str, torch.Tensor]:
        return self.apply(sample, self.draw(epoch, index) if self.train else None)

    def apply(self, sample: Mapping[str, np.ndarray], draw: Draw | None) -> dict[str, torch.Tensor]:
        """The transform with the given draws (``None``: the val path, no flip and no warp). Train uses
        ``draw(epoch, index)``; a parity check passes the official run's draws."""
        # hflip -> scale_rotate -> resize -> add_ignore_regions -> to_tensors, one entry at a time
        size = int(self.image_size)
        out = {}
        for key in _entries(sample, self._kinds):
            kind = self._kinds.get(key)
            arr = sample[key]
            if draw is not None:
                if draw.flip:
                    arr = _flip_entry(kind, arr)
                arr = _warp_entry(kind, arr, draw.angle, draw.scale)
            if kind is None:
                # Resized one channel at a time: the same result as resizing the float64 [H, W, 3] at once (each
                # channel is resampled with the same coefficients), and faster. The warp above stays on [H, W, C]:
                # there, one call for three channels is faster than three calls.
                channels = [cv2.resize(c, (size, size), interpolation=IMAGE_INTERPOLATION) for c in _split(arr)]
                out[key] = _image_tensor([cast_uint8(c, self.uint8_cast) for c in channels], self.mean, self.std)
            else:
                out[key] = kind.finish(kind.resize_channels(arr, size), self.label_dtype)
        return out


def build_transforms(
    protocol: Protocol,
    train: bool,
    seed: int = 0,
    uint8_cast: str = "clamp",
    label_dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
) -> MultiTaskTransform:
    """The protocol's train (``train=True``) or val transforms at ``image_size`` x ``image_size`` (default: the
    protocol's), with the protocol's tasks and augmentation (flip_prob, rotation, scale / scale_choices, mean, std).
    """
    if not isinstance(protocol, Protocol):
        raise TypeError(
            f"build_transforms takes the protocol (benchmark.protocol.Protocol), got {type(protocol).__name__}; "
            "pass image_size= for another size"
        )
    p = protocol
    return MultiTaskTransform(
        image_size=int(p.image_size if image_size is None else image_size),
        train=bool(train),
        tasks=tuple((t.name, t.kind) for t in p.tasks),
        seed=int(seed),
        uint8_cast=uint8_cast,
        label_dtype=label_dtype,
        flip_prob=float(p.flip_prob),
        rotation=(float(p.rotation[0]), float(p.rotation[1])),
        scale=(float(p.scale[0]), float(p.scale[1])),
        scale_choices=None if p.scale_choices is None else tuple(float(c) for c in p.scale_choices),
        mean=tuple(float(v) for v in p.mean),
        std=tuple(float(v) for v in p.std),
    )
