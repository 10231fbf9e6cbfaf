"""Task kinds: everything that depends on what a task *is*, declared once.

A protocol (``benchmark.protocol``, stdlib only) lists its tasks as ``TaskSpec`` records: a name, the name of a
task kind, and the protocol's numbers (outputs, loss weight, primary metric and its direction, bounds). The kind
named there owns the rest, and no module outside this one names a task:

- data side: how the label is interpolated when resized or warped, what a horizontal flip and a zoom do to it
  (normals negate x, depth is divided by the zoom), which pixels become ignore (255) after the resize, and the
  label's tensor layout;
- compute side: the loss, the official post-processing of the network output, and the meter.

Reading the label *files* is the protocol's dataset module's job (the same kind is stored differently by
different datasets); what the loaded array means is the kind's.

Adding a task kind: a subclass here plus one line in ``TASK_KINDS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Generator, Tensor

from benchmark.losses import balanced_bce, cross_entropy_ignore, depth_l1, normals_l1
from benchmark.metrics import (
    DepthMeter,
    Meter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    argmax_labels,
    normals_255,
    saliency_255,
)
from benchmark.protocol import TaskSpec
from benchmark.registry import Registry

IGNORE = 255  # the ignore value of every label map
# The official renormalisation of the normals adds the float64 machine epsilon to the norm (np.finfo(np.float).eps).
NORMALS_EPS = float(np.finfo(np.float64).eps)


def label_tensor(arr: np.ndarray, label_dtype: torch.dtype) -> torch.Tensor:
    """[H, W] or [H, W, C] array -> contiguous [C, H, W] tensor in ``label_dtype``."""
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(label_dtype)


def _stack(channels: Sequence[np.ndarray]) -> np.ndarray:
    return channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)


def normals_norm(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Per pixel of the normals' channels (x, y, z, ...): the official sqrt(x**2 + y**2 + z**2) + eps.

    The squares and the root are taken in the channels' dtype; the epsilon is a float64 scalar, so the sum (and the
    division by it) is float64 whatever that dtype (NumPy >= 2 promotes a float32 array plus a float64 scalar): for
    float32 normals (NYUD's .npy files) the official code divides in float64 and stores the quotient back into the
    float32 array. For float64 normals (PASCAL) these are the same operations in the same order as ever."""
    norm = channels[0] ** 2
    norm += channels[1] ** 2
    norm += channels[2] ** 2
    np.sqrt(norm, out=norm)
    if norm.dtype != np.float64:
        norm = norm.astype(np.float64)
    norm += NORMALS_EPS
    return norm


def zero_length(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Mask of the zero-length vectors, given their channels (a [C, H, W] array, view or list of planes)."""
    sq = channels[0] ** 2
    sq += channels[1] ** 2
    sq += channels[2] ** 2
    # The official test is sqrt(sq) == 0; a sum of squares is never negative, so that is sq == 0.
    return sq == 0


class TaskKind:
    """Base class of the task kinds; one instance per kind, shared by every protocol that uses it."""

    name: ClassVar[str]

    # ---------------------------------------------------------------------------------------------------------
    # data side (transforms, dataset, synthetic data)
    # A label reaches the transforms as a NumPy array [H, W] (maps) or [H, W, C] (vectors); the image is not a
    # task and is handled by the transforms themselves (cubic, uint8 cast, normalisation).

    # OpenCV interpolation of this label in every resize and warp (the official FLAGVALS): maps nearest,
    # continuous vector fields cubic.
    interpolation: ClassVar[int] = cv2.INTER_NEAREST

    def flip(self, arr: np.ndarray) -> np.ndarray:
        """Mirror left-right (a new array)."""
        return cv2.flip(arr, 1)

    def before_warp(self, arr: np.ndarray, angle: float) -> np.ndarray:
        """What the label's *values* undergo when the image rotates by ``angle`` degrees (before the warp)."""
        return arr

    def after_warp(self, arr: np.ndarray, scale: float) -> np.ndarray:
        """What the label's *values* undergo when the image is zoomed by ``scale`` (after the warp)."""
        return arr

    def warp(self, arr: np.ndarray, angle: float, scale: float) -> np.ndarray:
        """Rotate by ``angle`` degrees and zoom by ``scale`` about the centre, same size, constant-0 border."""
        h, w = arr.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        warped = cv2.warpAffine(self.before_warp(arr, angle), matrix, (w, h), flags=self.interpolation)
        return self.after_warp(warped, scale)

    def resize(self, arr: np.ndarray, size: int) -> np.ndarray:
        """Resize to (size, size), aspect ratio not kept."""
        return cv2.resize(arr, (size, size), interpolation=self.interpolation)

    def resize_channels(self, arr: np.ndarray, size: int) -> list[np.ndarray]:
        """``resize`` as the list of its channels, for ``finish`` (before any renormalisation). One call per
        channel: for float64 and one-channel maps the same values as one call on [H, W, C], and faster."""
        planes = list(cv2.split(arr)) if arr.ndim == 3 else [arr]
        return [cv2.resize(c, (size, size), interpolation=self.interpolation) for c in planes]

    def ignore_regions(self, arr: np.ndarray) -> np.ndarray:
        """After the resize: the pixels that carry no label become 255 (a new array where anything changes)."""
        return arr

    def finish(self, channels: list[np.ndarray], label_dtype: torch.dtype) -> torch.Tensor:
        """The resized channels ([S, S] each, as ``cv2.split`` gives them) -> the label tensor [C, S, S], with the
        ignore regions (and any renormalisation) applied: what ``resize`` + ``ignore_regions`` + ``tensor`` give."""
        return self.tensor(self.ignore_regions(_stack(channels)), label_dtype)

    def tensor(self, arr: np.ndarray, label_dtype: torch.dtype) -> torch.Tensor:
        """Label array after the ignore regions -> [C, S, S] tensor."""
        return label_tensor(arr, label_dtype)

    # ---------------------------------------------------------------------------------------------------------
    # compute side (loss, post-processing, meter)
    # The implementations live in benchmark.losses / benchmark.metrics; a kind only points at them (those modules
    # reach the kinds through a function-level import, so there is no import cycle).

    # metrics besides the primary one that the golden reference runs pin (benchmark.reference_runs)
    checked_metrics: ClassVar[tuple[str, ...]] = ()
    # the meter's results are functions of exact integer counts (reproducible bit for bit; parity checks them exactly)
    exact_counts: ClassVar[bool] = False

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """This kind's training loss of one task: NCHW prediction, its label batch at the same resolution."""
        raise NotImplementedError(f"task kind {self.name!r} declares no loss")

    def postprocess(self, logits: Tensor) -> Tensor:
        """The official ``get_output``: what the official meter receives, from NCHW network outputs."""
        raise NotImplementedError(f"task kind {self.name!r} declares no post-processing")

    def meter(self, spec: TaskSpec) -> Meter:
        """A fresh meter (``benchmark.metrics.Meter``) for ``spec``."""
        raise NotImplementedError(f"task kind {self.name!r} declares no meter")

    def random_target(self, spec: TaskSpec, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
        """A valid synthetic label batch [batch, C, H, W] (float32, with some ignore pixels) for perf and tests."""
        raise NotImplementedError(f"task kind {self.name!r} declares no synthetic targets")


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _class_labels(classes: int, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
    """Class indices in [0, classes) as float32 [B, 1, H, W], about 5 % of the pixels 255 (ignore)."""
    shape = (batch, 1, *_hw(size))
    y = torch.randint(0, classes, shape, generator=generator).float()
    return y.masked_fill(torch.rand(shape, generator=generator) < 0.05, 255.0)


class _ClassMapKind(TaskKind):
    """Dense classification (one label map, classes 0..C-1, 255 = ignore): semantic segmentation, human parts."""

    exact_counts = True

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return cross_entropy_ignore(pred, target)

    def postprocess(self, logits: Tensor) -> Tensor:
        return argmax_labels(logits)

    def meter(self, spec: TaskSpec) -> Meter:
        return SegmentationMeter(spec.name, spec.out_channels)

    def random_target(self, spec: TaskSpec, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
        return _class_labels(spec.out_channels, batch, size, generator)


class SemsegKind(_ClassMapKind):
    name = "semseg"

    # -- data side

    # -- compute side
    # (loss, post-processing, meter and synthetic labels: _ClassMapKind's)


class PartsKind(_ClassMapKind):
    name = "parts"

    # -- data side
    def ignore_regions(self, arr: np.ndarray) -> np.ndarray:
        """A parts map without any part (no person in the image) becomes all 255."""
        return arr if arr.any() else np.full_like(arr, IGNORE)

    # -- compute side
    # (loss, post-processing, meter and synthetic labels: _ClassMapKind's)


class SaliencyKind(TaskKind):
    name = "saliency"

    # -- data side

    # -- compute side
    checked_metrics = ("maxF",)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return balanced_bce(pred, target)

    def postprocess(self, logits: Tensor) -> Tensor:
        return saliency_255(logits)

    def meter(self, spec: TaskSpec) -> Meter:
        return SaliencyMeter(spec.name)

    def random_target(self, spec: TaskSpec, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
        return (torch.rand(batch, 1, *_hw(size), generator=generator) > 0.5).float()


class NormalsKind(TaskKind):
    name = "normals"

    # -- data side
    # Unit vectors [H, W, 3], channel 0 horizontal; a zero vector is invalid.
    interpolation = cv2.INTER_CUBIC

    def flip(self, arr: np.ndarray) -> np.ndarray:
        out = cv2.flip(arr, 1)
        out[..., 0] *= -1.0  # the horizontal component changes sign
        return out

    def before_warp(self, arr: np.ndarray, angle: float) -> np.ndarray:
        """In-plane rotation of the vectors, (x, y) -> (x cos a + y sin a, y cos a - x sin a), into a new array.

        No rotation (``angle == 0``, a protocol without rotation) leaves the vectors as they are. The official code
        still runs its rotation formula then (atan2 / sin / cos in the array's dtype), which moves float32 normals
        by rounding only (the NYUD fixture records it: about one float32 ulp at 1)."""
        if angle == 0:
            return arr
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

    def _cubic(self, arr: np.ndarray, size: int) -> np.ndarray:
        """[H, W, 3] -> [S, S, 3]: one cubic OpenCV call on the three channels, as the official code makes it, in the
        label's dtype (float64 for PASCAL's PNG normals; the file's dtype for NYUD's, float32 in practice).

        OpenCV may run a float32 cubic resize in Intel IPP or in its own SIMD code, depending on the build and the
        CPU, and the paths round differently (about one float32 ulp at some pixels). The parity checks therefore
        compare float32 normals within a per-pixel bound derived from that rounding
        (``benchmark.parity_data.normals_resize_tolerance``) rather than bit for bit."""
        return cv2.resize(arr, (size, size), interpolation=self.interpolation)

    def resize(self, arr: np.ndarray, size: int) -> np.ndarray:
        """Cubic resize, then renormalised to unit length in the label's dtype (``normals_norm``)."""
        arr = self._cubic(arr, size)
        return (arr / normals_norm(arr.transpose(2, 0, 1))[..., None]).astype(arr.dtype, copy=False)

    def resize_channels(self, arr: np.ndarray, size: int) -> list[np.ndarray]:
        if arr.dtype == np.float64:
            return super().resize_channels(arr, size)
        return list(cv2.split(self._cubic(arr, size)))

    def ignore_regions(self, arr: np.ndarray) -> np.ndarray:
        """Vectors of length exactly 0 after the resize and renormalisation -> 255 in all three channels."""
        out = arr.copy()
        np.copyto(out, IGNORE, where=zero_length(arr.transpose(2, 0, 1))[..., None])
        return out

    def finish(self, channels: list[np.ndarray], label_dtype: torch.dtype) -> torch.Tensor:
        # renormalised straight into the [C, S, S] layout of the tensor; the same operations as resize() +
        # ignore_regions() + tensor()
        norm = normals_norm(channels)
        size = channels[0].shape
        normals = np.empty((len(channels), *size), channels[0].dtype)
        if normals.dtype == norm.dtype:
            for c, channel in enumerate(channels):
                np.divide(channel, norm, out=normals[c])
        else:  # the quotient in float64, stored into the label's dtype (as the official code does)
            for c, channel in enumerate(channels):
                normals[c] = channel / norm
        np.copyto(normals, IGNORE, where=zero_length(normals))  # much faster than normals[:, mask] = 255
        return torch.from_numpy(normals).to(label_dtype)

    # -- compute side

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return normals_l1(pred, target)

    def postprocess(self, logits: Tensor) -> Tensor:
        return normals_255(logits)

    def meter(self, spec: TaskSpec) -> Meter:
        return NormalsMeter(spec.name)

    def random_target(self, spec: TaskSpec, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
        """Unit vectors, about 10 % of the pixels 255 in all three channels (ignore)."""
        h, w = _hw(size)
        normals = F.normalize(torch.randn(batch, 3, h, w, generator=generator), dim=1)
        invalid = (torch.rand(batch, 1, h, w, generator=generator) < 0.1).expand_as(normals)
        return normals.masked_fill(invalid, 255.0)


class DepthKind(TaskKind):
    name = "depth"

    # -- data side
    # Metres [H, W], 0 = missing. Nearest everywhere, so a missing pixel never blends into its neighbours.

    def after_warp(self, arr: np.ndarray, scale: float) -> np.ndarray:
        """A zoom by ``scale`` brings the scene closer: depth divided by the scale (the official ScaleNRotate), in
        the label's dtype."""
        return arr / scale

    def ignore_regions(self, arr: np.ndarray) -> np.ndarray:
        """Missing depth (0) -> 255."""
        return np.where(arr == 0, np.asarray(IGNORE, arr.dtype), arr)

    # -- compute side

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return depth_l1(pred, target)

    def postprocess(self, logits: Tensor) -> Tensor:
        return logits  # official get_output: identity (no activation, no clamp)

    def meter(self, spec: TaskSpec) -> Meter:
        return DepthMeter(spec.name)

    def random_target(self, spec: TaskSpec, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
        """Depths in metres in [0.5, 10), about 10 % of the pixels 255 (missing)."""
        shape = (batch, 1, *_hw(size))
        depth = 0.5 + 9.5 * torch.rand(shape, generator=generator)
        return depth.masked_fill(torch.rand(shape, generator=generator) < 0.1, 255.0)


TASK_KINDS: Registry[TaskKind] = Registry("task kind")
for _kind in (SemsegKind(), PartsKind(), SaliencyKind(), NormalsKind(), DepthKind()):
    TASK_KINDS.add(_kind.name, _kind)


def kind_of(task: TaskSpec) -> TaskKind:
    """The task kind that owns ``task``'s loss, meter and label semantics."""
    return TASK_KINDS.get(task.kind)
