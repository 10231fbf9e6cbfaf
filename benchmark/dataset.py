"""Multi-task data, the generic core: errors, split files, image reading, the dataset base class, collate, the
dataset check report, and the registry of data sources keyed by ``Protocol.dataset``.

Each data source (file layout, label files) is one module registered in ``DATASETS``:

- ``pascal_mt``: ``benchmark.pascal_data`` (PASCAL-Context multi-task, class ``PascalMT``);
- ``nyud_mt``: ``benchmark.nyud_data`` (NYUDv2 multi-task, class ``NYUDMT``).

A data-source module provides ``DATASET`` (a :class:`MultiTaskDataset` subclass built as
``DATASET(root, split, tasks, transform, **options)``), ``LAYOUT`` (the folder it expects, in words), ``OBTAIN``
(how a user gets the real data, in words),
``check_label(root, task, image_id, shape)`` and ``image_path(root, image_id)`` (for :func:`check_dataset`),
``read_split(root, split)`` and ``SPLIT_FILE``, and ``make_synthetic(out, n_train, n_val, seed, protocol, **options)``
(``benchmark-data synth``). Callers go through :func:`open_dataset`, :func:`check_dataset`, :func:`dataset_ready`
and ``benchmark.synth.make_synthetic_dataset`` with the protocol; the modules are imported on first use.

Adding a data source: its module plus one ``DATASETS.add`` line below.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from benchmark.registry import Registry

if TYPE_CHECKING:
    from benchmark.protocol import Protocol

SPLITS = ("train", "val")
IGNORE = 255


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message names the file and what was expected."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, problem: str = "invalid") -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.problem = problem  # short category for reports: missing, unreadable, size, range, structure, ...


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A required folder or file does not exist."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        DatasetError.__init__(self, message, path, "missing")


# ---------------------------------------------------------------------------------------------------------------
# Class tables (package data)


@cache
def db_info(name: str) -> dict[str, Any]:
    """A class table shipped in ``benchmark/db_info`` (context_classes.json, nyu_classes.json, pascal_part.json)."""
    return json.loads(resources.files("benchmark.db_info").joinpath(name).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# File readers shared by the data sources: each returns NumPy arrays or raises DatasetError naming the file


def read_id_list(path: Path) -> list[str]:
    """Ids of a split file (one id per line) in file order; duplicates and blank names are errors."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: split file not found (expected one image id per line)", path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first id
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the split file ({e})", path, "unreadable") from e
    ids: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise DatasetError(
                f"{path}:{lineno}: id {name!r} is listed twice (first on line {seen[name]}); expected unique ids",
                path,
                "duplicate",
            )
        if "/" in name or "\\" in name or name.startswith("."):
            raise DatasetError(f"{path}:{lineno}: {name!r} is not an image id (expected e.g. 2008_000002)", path)
        seen[name] = lineno
        ids.append(name)
    if not ids:
        raise DatasetError(f"{path}: split file lists no ids (expected one image id per line)", path, "empty")
    return ids


# Largest image read, in pixels: PASCAL and NYUD images are at most 640 x 480 and the protocols work at 448 x 448; a header
# claiming more (a decompression bomb, or a photo far larger than the protocol needs) is refused before decoding.
MAX_IMAGE_PIXELS = 4096 * 4096


def _too_large(path: Path, what: str, size: tuple[int, int] | None) -> DatasetError:
    dims = f"{size[0]}x{size[1]} pixels" if size else "more pixels than Pillow allows"
    return DatasetError(
        f"{path}: image of {dims} is above the limit of {MAX_IMAGE_PIXELS:,} pixels (4096x4096; a decompression "
        f"bomb, or far larger than the protocol needs); expected {what}",
        path,
        "too_large",
    )


def _open_image(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: file not found (expected {what})", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own limit
            img_ctx = Image.open(path)
        with img_ctx as img:
            if img.size[0] * img.size[1] > MAX_IMAGE_PIXELS:
                raise _too_large(path, what, img.size)
            img.load()  # decode now, so that a truncated file fails here, naming the file
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise _too_large(path, what, None) from e
    except UnidentifiedImageError as e:
        raise DatasetError(f"{path}: not a readable image file; expected {what}", path, "unreadable") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode ({e}); expected {what}", path, "unreadable") from e
    return img


def read_image(path: Path, what: str = "an RGB JPEG image") -> np.ndarray:
    """The JPEG as float64 [H, W, 3] of its 0..255 values (Pillow decoder, RGB, like the official loaders)."""
    return np.asarray(_open_image(path, what).convert("RGB"), dtype=np.float64)


def _read_gray_png(path: Path, what: str) -> np.ndarray:
    img = _open_image(path, what)
    if img.mode not in ("L", "P"):
        raise DatasetError(f"{path}: PNG mode {img.mode!r}, expected {what} (mode 'L' or 'P')", path, "structure")
    return np.asarray(img)  # for a palette PNG these are the palette indices, i.e. the labels


def resolve_tasks(tasks: Iterable[str], known: Sequence[str]) -> tuple[str, ...]:
    """The requested task names in the data source's canonical order; unknown or repeated names are errors."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise DatasetError(f"unknown task(s) {unknown}; expected a subset of {list(known)}", None, "config")
    if len(set(tasks)) != len(tasks):
        raise DatasetError(f"tasks {list(tasks)} list a task twice", None, "config")
    return tuple(t for t in known if t in tasks)


# ---------------------------------------------------------------------------------------------------------------
# The dataset base class


class MultiTaskDataset(Dataset):
    """A split of a multi-task dataset: ``ids`` in split-file order, ``load_raw(index)`` (the data source's) and
    the protocol's transform.

    Sample format (``ds[i]`` with a transform): ``{"image": float32 [3,S,S], <task>: [C,S,S] for each requested
    task, "meta": {"id": str, "size": [H, W]}}``; without a transform the raw NumPy arrays of ``load_raw`` plus
    ``meta``. :func:`collate` batches them (``meta`` becomes a list of dicts). A transform with an ``apply(sample,
    draw)`` method and a ``draw(epoch, index)`` (``benchmark.transforms.MultiTaskTransform``) is called with the
    epoch set by :meth:`set_epoch` and the sample's index, so its draws depend on (seed, epoch, index) only.
    """

    root: Path
    split: str
    tasks: tuple[str, ...]
    ids: list[str]

    def __init__(self, transform: Any = None) -> None:
        self.transform = transform
        # Shared memory, so that data-loader workers (forked or spawned, persistent or not) see set_epoch().
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of this epoch (train transforms draw from (seed, epoch, index))."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def __len__(self) -> int:
        return len(self.ids)

    def load_raw(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index`` (for messages)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self.ids) <= index < len(self.ids):
            raise IndexError(f"index {index} out of range for {len(self.ids)} images")
        index %= len(self.ids)  # the augmentation seed uses the non-negative index
        raw = self.load_raw(index)
        meta = {"id": self.ids[index], "size": [int(raw["image"].shape[0]), int(raw["image"].shape[1])]}
        if self.transform is None:
            out: dict[str, Any] = raw
        elif hasattr(self.transform, "draw") and hasattr(self.transform, "apply"):
            out = self.transform(raw, epoch=self.epoch, index=index)
        else:
            out = self.transform(raw)
        return {**out, "meta": meta}


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of a list of samples; ``meta`` stays a list of per-sample dicts."""
    if not batch:
        raise ValueError("collate got an empty batch")
    out = default_collate([{k: v for k, v in s.items() if k != "meta"} for s in batch])
    if "meta" in batch[0]:
        out["meta"] = [s["meta"] for s in batch]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Dataset check (benchmark-data check)


@dataclass
class Problem:
    split: str
    task: str  # "image", "split", or a task name
    problem: str  # DatasetError.problem
    names: list[str] = field(default_factory=list)  # ids (or files) affected
    example: str = ""  # the first message in full


@dataclass
class CheckReport:
    root: Path
    counts: dict[str, int] = field(default_factory=dict)  # split -> ids
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.counts)

    def add(self, split: str, task: str, err: DatasetError, name: str) -> None:
        for p in self.problems:
            if (p.split, p.task, p.problem) == (split, task, err.problem):
                p.names.append(name)
                return
        self.problems.append(Problem(split, task, err.problem, [name], str(err)))

    def lines(self, show: int = 5) -> list[str]:
        out = [f"{self.root}: " + ", ".join(f"{s} {n} ids" for s, n in self.counts.items())]
        for p in self.problems:
            names = ", ".join(p.names[:show]) + (", ..." if len(p.names) > show else "")
            out.append(f"  {p.split}/{p.task}: {len(p.names)} {p.problem}: {names}")
            out.append(f"      e.g. {p.example}")
        return out


def check_folder(
    source: ModuleType,
    root: str | os.PathLike[str],
    splits: Sequence[str],
    tasks: Sequence[str],
    progress: Callable[[str], Any] | None = None,
) -> CheckReport:
    """Read every file the given splits and tasks need, through the data source's readers, and report what is
    missing, unreadable or invalid (split files, disjoint splits, images, each task's label)."""
    root = Path(root).expanduser()
    report = CheckReport(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: dataset folder not found (expected {source.LAYOUT})", root)
    seen: dict[str, set[str]] = {}
    for split in splits:
        try:
            ids = source.read_split(root, split)
        except DatasetError as e:
            report.add(split, "split", e, source.SPLIT_FILE.format(split=split))
            continue
        report.counts[split] = len(ids)
        seen[split] = set(ids)
        for other, other_ids in seen.items():
            both = [i for i in ids if i in other_ids] if other != split else []
            if both:
                path = root / source.SPLIT_FILE.format(split=split)
                err = DatasetError(
                    f"{path}: {len(both)} id(s) also listed in {other}, e.g. {both[0]}; expected disjoint splits",
                    path,
                    f"also in {other}",
                )
                for i in both:
                    report.add(split, "split", err, i)
        for n, image_id in enumerate(ids):
            if progress is not None and n and n % 500 == 0:
                progress(f"{split}: {n}/{len(ids)}")
            try:
                shape = read_image(source.image_path(root, image_id)).shape[:2]
            except DatasetError as e:
                report.add(split, "image", e, image_id)
                continue
            for task in tasks:
                try:
                    source.check_label(root, task, image_id, shape)
                except DatasetError as e:
                    report.add(split, task, e, image_id)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Data sources, keyed by Protocol.dataset


@dataclass(frozen=True)
class DataSource:
    """A registered data source: the module that reads its layout, imported on first use."""

    name: str
    module: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


DATASETS: Registry[DataSource] = Registry("dataset")
DATASETS.add("pascal_mt", DataSource("pascal_mt", "benchmark.pascal_data"))
DATASETS.add("nyud_mt", DataSource("nyud_mt", "benchmark.nyud_data"))


def data_source(protocol: Protocol) -> ModuleType:
    """The module of ``protocol.dataset``."""
    return DATASETS.get(protocol.dataset).load()


def open_dataset(
    protocol: Protocol, root: str | os.PathLike[str], split: str, transform: Any = None, **options: Any
) -> MultiTaskDataset:
    """The protocol's dataset for ``split`` under ``root`` with the protocol's tasks (``tasks=`` for a subset);
    ``options`` go to the data source's class (e.g. ``cache_dir``, ``size_mismatch``)."""
    tasks = options.pop("tasks", protocol.task_names)
    return data_source(protocol).DATASET(root, split, tasks, transform, **options)


def check_dataset(
    protocol: Protocol,
    root: str | os.PathLike[str],
    splits: Sequence[str] = SPLITS,
    tasks: Sequence[str] | None = None,
    progress: Callable[[str], Any] | None = None,
) -> CheckReport:
    """Check a folder for the protocol's data source (every file of the splits and tasks read and validated)."""
    source = data_source(protocol)
    names = protocol.task_names if tasks is None else resolve_tasks(tasks, protocol.task_names)
    return check_folder(source, root, splits, names, progress)


def dataset_ready(protocol: Protocol, root: str | os.PathLike[str]) -> bool:
    """Cheap: does ``root`` hold the protocol's train and val splits with every file they list (names only,
    nothing decoded)? ``check_dataset`` reads the files themselves."""
    try:
        for split in (protocol.train_split, protocol.val_split):
            open_dataset(protocol, root, split)
    except (DatasetError, OSError):
        return False
    return True
