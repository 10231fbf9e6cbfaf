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

from typing import ClassVar

from benchmark.protocol import TaskSpec
from benchmark.registry import Registry


class TaskKind:
    """Base class of the task kinds; one instance per kind, shared by every protocol that uses it."""

    name: ClassVar[str]

    # ---------------------------------------------------------------------------------------------------------
    # data side (transforms, dataset, synthetic data)

    # ---------------------------------------------------------------------------------------------------------
    # compute side (loss, post-processing, meter)


class SemsegKind(TaskKind):
    name = "semseg"

    # -- data side

    # -- compute side


class PartsKind(TaskKind):
    name = "parts"

    # -- data side

    # -- compute side


class SaliencyKind(TaskKind):
    name = "saliency"

    # -- data side

    # -- compute side


class NormalsKind(TaskKind):
    name = "normals"

    # -- data side

    # -- compute side


class DepthKind(TaskKind):
    name = "depth"

    # -- data side

    # -- compute side


TASK_KINDS: Registry[TaskKind] = Registry("task kind")
for _kind in (SemsegKind(), PartsKind(), SaliencyKind(), NormalsKind(), DepthKind()):
    TASK_KINDS.add(_kind.name, _kind)


def kind_of(task: TaskSpec) -> TaskKind:
    """The task kind that owns ``task``'s loss, meter and label semantics."""
    return TASK_KINDS.get(task.kind)
