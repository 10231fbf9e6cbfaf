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

from typing import TYPE_CHECKING, ClassVar

from benchmark.protocol import TaskSpec
from benchmark.registry import Registry

if TYPE_CHECKING:
    from torch import Generator, Tensor

    from benchmark.metrics import Meter


class TaskKind:
    """Base class of the task kinds; one instance per kind, shared by every protocol that uses it."""

    name: ClassVar[str]

    # ---------------------------------------------------------------------------------------------------------
    # data side (transforms, dataset, synthetic data)

    # ---------------------------------------------------------------------------------------------------------
    # compute side (loss, post-processing, meter)
    # The implementations live in benchmark.losses / benchmark.metrics (imported lazily: torch stays out of
    # ``import benchmark.tasks`` until a kind computes something); a kind only points at them.

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
    import torch

    shape = (batch, 1, *_hw(size))
    y = torch.randint(0, classes, shape, generator=generator).float()
    return y.masked_fill(torch.rand(shape, generator=generator) < 0.05, 255.0)


class _ClassMapKind(TaskKind):
    """Dense classification (one label map, classes 0..C-1, 255 = ignore): semantic segmentation, human parts."""

    exact_counts = True

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        from benchmark.losses import cross_entropy_ignore

        return cross_entropy_ignore(pred, target)

    def postprocess(self, logits: Tensor) -> Tensor:
        from benchmark.metrics import argmax_labels

        return argmax_labels(logits)

    def meter(self, spec: TaskSpec) -> Meter:
        from benchmark.metrics import SegmentationMeter

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

    # -- compute side
    # (loss, post-processing, meter and synthetic labels: _ClassMapKind's)


class SaliencyKind(TaskKind):
    name = "saliency"

    # -- data side

    # -- compute side
    checked_metrics = ("maxF",)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        from benchmark.losses import balanced_bce

        return balanced_bce(pred, target)

    def postprocess(self, logits: Tensor) -> Tensor:
        from benchmark.metrics import saliency_255

        return saliency_255(logits)

    def meter(self, spec: TaskSpec) -> Meter:
        from benchmark.metrics import SaliencyMeter

        return SaliencyMeter(spec.name)

    def random_target(self, spec: TaskSpec, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
        import torch

        return (torch.rand(batch, 1, *_hw(size), generator=generator) > 0.5).float()


class NormalsKind(TaskKind):
    name = "normals"

    # -- data side

    # -- compute side

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        from benchmark.losses import normals_l1

        return normals_l1(pred, target)

    def postprocess(self, logits: Tensor) -> Tensor:
        from benchmark.metrics import normals_255

        return normals_255(logits)

    def meter(self, spec: TaskSpec) -> Meter:
        from benchmark.metrics import NormalsMeter

        return NormalsMeter(spec.name)

    def random_target(self, spec: TaskSpec, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
        """Unit vectors, about 10 % of the pixels 255 in all three channels (ignore)."""
        import torch
        import torch.nn.functional as F

        h, w = _hw(size)
        normals = F.normalize(torch.randn(batch, 3, h, w, generator=generator), dim=1)
        invalid = (torch.rand(batch, 1, h, w, generator=generator) < 0.1).expand_as(normals)
        return normals.masked_fill(invalid, 255.0)


class DepthKind(TaskKind):
    name = "depth"

    # -- data side

    # -- compute side

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        from benchmark.losses import depth_l1

        return depth_l1(pred, target)

    def postprocess(self, logits: Tensor) -> Tensor:
        return logits  # official get_output: identity (no activation, no clamp)

    def meter(self, spec: TaskSpec) -> Meter:
        from benchmark.metrics import DepthMeter

        return DepthMeter(spec.name)

    def random_target(self, spec: TaskSpec, batch: int, size: int | tuple[int, int], generator: Generator) -> Tensor:
        """Depths in metres in [0.5, 10), about 10 % of the pixels 255 (missing)."""
        import torch

        shape = (batch, 1, *_hw(size))
        depth = 0.5 + 9.5 * torch.rand(shape, generator=generator)
        return depth.masked_fill(torch.rand(shape, generator=generator) < 0.1, 255.0)


TASK_KINDS: Registry[TaskKind] = Registry("task kind")
for _kind in (SemsegKind(), PartsKind(), SaliencyKind(), NormalsKind(), DepthKind()):
    TASK_KINDS.add(_kind.name, _kind)


def kind_of(task: TaskSpec) -> TaskKind:
    """The task kind that owns ``task``'s loss, meter and label semantics."""
    return TASK_KINDS.get(task.kind)
