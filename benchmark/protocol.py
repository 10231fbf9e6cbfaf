"""Protocols, tasks, single-task references and Δm: frozen data, declared once (stdlib only).

A protocol fixes everything that can move a number: tasks and their primary metrics, image size,
schedule, optimiser, loss weights. Methods never override it; a change is a new version.

Changelog
---------
pascal-context v1: the MTLoRA (CVPR 2024) protocol as the official code runs it (see
    docs/protocol.md): Swin-T, 448x448, batch 32, 300 epochs, AdamW with peak LR
    5e-4 * 32 / 512, 20 warm-up epochs, per-iteration cosine, loss weights 1/2/5/10.
nyud v1: the NYUDv2 multi-task setting of the MTLoRA code family (docs/protocol.md, NYUDv2 section): semseg (40
    classes), depth and normals, Swin-T at 448x448 with the PASCAL optimisation, loss weights 1/1/10, train
    augmentation flip plus a zoom drawn from {1.0, 1.2, 1.5} without rotation. Edge detection is left out (its
    official evaluation needs an external boundary-matching toolbox).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskSpec:
    """One task of one protocol. ``kind`` names the task kind (``benchmark.tasks.TASK_KINDS``) that owns its loss,
    post-processing, meter, label semantics and interpolation; this record holds only the protocol's numbers."""

    name: str  # "semseg"
    kind: str  # task kind: "semseg", "parts", "saliency", "normals", "depth"
    metric: str  # primary metric used for Δm, e.g. "mIoU"
    higher_is_better: bool  # the direction lives here and nowhere else
    out_channels: int  # network outputs for this task
    loss_weight: float  # weight in the multi-task loss
    percent: bool  # primary metric is a fraction reported x100 in tables and Δm
    label: str  # column title in tables
    # closed range of the primary metric in result units (IoU fractions in [0, 1], angles in [0, 180] degrees):
    # a result outside it is refused by the leaderboard, never tabled. None: the task declares no bound.
    bounds: tuple[float, float] | None = None


SEMSEG = TaskSpec("semseg", "semseg", "mIoU", True, 21, 1.0, True, "SemSeg mIoU", (0.0, 1.0))
HUMAN_PARTS = TaskSpec("human_parts", "parts", "mIoU", True, 7, 2.0, True, "Parts mIoU", (0.0, 1.0))
SAL = TaskSpec("sal", "saliency", "mIoU", True, 1, 5.0, True, "Sal mIoU", (0.0, 1.0))
NORMALS = TaskSpec("normals", "normals", "mean", False, 3, 10.0, False, "Normals mean°", (0.0, 180.0))
# PASCAL-Context's tasks (kept for the callers that predate protocols as data; new code reads protocol.tasks)
TASKS: dict[str, TaskSpec] = {t.name: t for t in (SEMSEG, HUMAN_PARTS, SAL, NORMALS)}

NYUD_SEMSEG = TaskSpec("semseg", "semseg", "mIoU", True, 40, 1.0, True, "SemSeg mIoU", (0.0, 1.0))
NYUD_DEPTH = TaskSpec("depth", "depth", "rmse", False, 1, 1.0, False, "Depth rmse", (0.0, float("inf")))
NYUD_NORMALS = TaskSpec("normals", "normals", "mean", False, 3, 10.0, False, "Normals mean°", (0.0, 180.0))


@dataclass(frozen=True)
class Protocol:
    name: str
    version: int  # bump on ANY change that can move numbers
    backbone: str  # key of benchmark.model.SWIN_VARIANTS
    image_size: int
    tasks: tuple[TaskSpec, ...]
    epochs: int
    batch_size: int
    reference: str  # key of REFERENCES: the single-task row Δm is measured against (the default of several)
    dataset: str = "pascal_mt"  # the data source: key of the dataset registry (file layout, label files)
    # optimisation, as the official code runs it (docs/protocol.md 2.4)
    base_lr: float = 5e-4
    warmup_lr: float = 5e-7
    min_lr: float = 5e-6
    lr_reference_batch: int = 512  # lr = base_lr * batch * world / 512
    warmup_epochs: int = 20
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0
    drop_path_rate: float = 0.2
    amp: bool = True  # on CUDA only
    eval_interval: int = 5  # epochs
    decoder_channels: tuple[int, ...] = (18, 36, 72, 144)
    head_channels: int = 1080
    train_split: str = "train"
    val_split: str = "val"
    # train augmentation (docs/protocol.md 2.2)
    flip_prob: float = 0.5
    rotation: tuple[float, float] = (-20.0, 20.0)  # uniform range in degrees; (0.0, 0.0): no rotation
    scale: tuple[float, float] = (0.75, 1.25)  # uniform zoom range ...
    scale_choices: tuple[float, ...] | None = None  # ... or, when set, a zoom drawn from these with equal odds
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"task {name!r} is not part of protocol {self.name} v{self.version}; tasks: {self.task_names}")

    def peak_lr(self, total_batch: int) -> float:
        return self.base_lr * total_batch / self.lr_reference_batch

    @property
    def id(self) -> str:
        return f"{self.name}.v{self.version}"


PASCAL_CONTEXT = Protocol(
    name="pascal-context",
    version=1,
    backbone="swin_tiny",
    image_size=448,
    tasks=(SEMSEG, HUMAN_PARTS, SAL, NORMALS),
    epochs=300,
    batch_size=32,
    reference="mtlora-table1-single-task",
)

NYUD = Protocol(
    name="nyud",
    version=1,
    backbone="swin_tiny",
    image_size=448,
    tasks=(NYUD_SEMSEG, NYUD_DEPTH, NYUD_NORMALS),
    epochs=300,
    batch_size=32,
    reference="faar-nyud-single-task",
    dataset="nyud_mt",
    rotation=(0.0, 0.0),
    scale_choices=(1.0, 1.2, 1.5),
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PASCAL_CONTEXT, NYUD)}


def get_protocol(name: str, version: int | None = None) -> Protocol:
    if name not in PROTOCOLS:
        raise KeyError(f"unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
    p = PROTOCOLS[name]
    if version is not None and version != p.version:
        raise ValueError(f"protocol {name!r} version {version} is not supported; this harness implements v{p.version}")
    return p


@dataclass(frozen=True)
class Reference:
    """Single-task reference scores, in table units (mIoU in %, normals in degrees)."""

    name: str
    protocol: str  # protocol name
    backbone: str
    init: str  # pretraining of the backbone, e.g. "imagenet-1k"
    image_size: int
    values: Mapping[str, float] = field(default_factory=dict)
    source: str = ""


REFERENCES: dict[str, Reference] = {
    r.name: r
    for r in (
        Reference(
            name="mtlora-table1-single-task",
            protocol="pascal-context",
            backbone="swin_tiny",
            init="imagenet-1k",
            image_size=448,
            values={"semseg": 67.21, "human_parts": 61.93, "sal": 62.35, "normals": 17.97},
            source="MTLoRA, CVPR 2024, arXiv 2403.20320, Table 1, 'Single Task' row (secondary quotes)",
        ),
        Reference(
            name="faar-nyud-single-task",
            protocol="nyud",
            backbone="swin_tiny",
            init="imagenet-1k",
            image_size=448,
            values={"semseg": 42.65, "depth": 0.60, "normals": 22.83},
            source="FAAR, CVPR 2026, arXiv 2603.20403, Swin-T single-task NYUDv2 row (secondary quote)",
        ),
        Reference(
            name="tadformer-config-nyud-single-task",
            protocol="nyud",
            backbone="swin_tiny",
            init="imagenet-1k",
            image_size=448,
            values={"semseg": 40.65, "depth": 0.6436, "normals": 22.97},
            source="a community TADFormer NYUDv2 configuration, Swin-T single-task references (secondary quote)",
        ),
    )
}


def get_reference(name: str) -> Reference:
    if name not in REFERENCES:
        raise KeyError(f"unknown single-task reference {name!r}; known: {sorted(REFERENCES)}")
    return REFERENCES[name]


def table_value(task: TaskSpec, value: float) -> float:
    """A metric value in table units: fractions become percent where the task says so."""
    return 100.0 * value if task.percent else value


def delta_m(scores: Mapping[str, float], reference: Mapping[str, float], tasks: Sequence[TaskSpec]) -> float:
    """Mean signed relative change vs. the single-task reference, in percent; positive is better.

    ``scores`` and ``reference`` are in the same (table) units. Every task needs both values: a
    missing one is an error, never a silent fallback.
    """
    if not tasks:
        raise ValueError("delta_m needs at least one task")
    terms = []
    for t in tasks:
        if t.name not in reference:
            raise KeyError(f"no single-task reference value for task {t.name!r}")
        if t.name not in scores:
            raise KeyError(f"no score for task {t.name!r}")
        ref = float(reference[t.name])
        if ref == 0:
            raise ValueError(f"single-task reference for {t.name!r} is 0; Δm is undefined")
        sign = 1.0 if t.higher_is_better else -1.0
        terms.append(sign * (float(scores[t.name]) - ref) / ref)
    return 100.0 * sum(terms) / len(terms)
