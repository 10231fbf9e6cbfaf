"""PASCAL-Context multi-task data ("PASCAL_MT", docs/protocol.md 1), data source ``pascal_mt``: loader, label
decoding, checks.

Layout read under ``root`` (the real PASCAL_MT folder, the fixture's tiny copy, or ``benchmark-data synth``)::

    JPEGImages/{id}.jpg                   image (Pillow, RGB)
    ImageSets/Context/{split}.txt         one id per line
    semseg/VOC12/{id}.png                 semseg, 0..20 and 255; preferred when it exists ...
    semseg/pascal-context/{id}.png        ... otherwise this one
    human_parts/{id}.mat                  'anno' struct (PASCAL-Part); persons' parts grouped into 6 classes
    pascal-context/trainval/{id}.mat      'LabelMap' (459 Context classes): validity mask of the normals
    normals_distill/{id}.png              RGB, n = 2 * png / 255 - 1
    sal_distill/{id}.png                  grayscale, salient = png / 255 > 0.5

Differences from the official loader, on purpose:

- Only the files of the requested tasks are needed (a semseg-only run needs no normals), but every one of them
  is checked for existence when the dataset is built, so a run fails at construction, not hours later.
- Nothing is ever written into ``root``. The official code writes ``ImageSets/Parts/*.txt`` there (and its
  builder crashes under NumPy 2); here the "which images have a person" index is built without it and cached in
  ``cache_dir`` (``$MTPEFT_CACHE`` or ``~/.cache/mtpeft``), keyed by the names, sizes and mtimes of the parts
  files, so any change to them rebuilds it.
- Bad files raise :class:`DatasetError` naming the file and what was expected. A label whose size differs from
  its image is an error by default (``size_mismatch="error"``); ``"resize"`` resizes it with nearest
  neighbours as the official loader does (the parity check uses that).

Sample format (``PascalMT[i]`` with a transform): ``{"image": float32 [3,S,S], "semseg": [1,S,S],
"human_parts": [1,S,S], "sal": [1,S,S], "normals": [3,S,S], "meta": {"id": str, "size": [H, W]}}`` with only the
requested tasks; :func:`collate` batches them (``meta`` becomes a list of dicts).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import scipy.io

from benchmark.dataset import (
    IGNORE,
    SPLITS,
    DatasetError,
    DatasetNotFoundError,
    MultiTaskDataset,
    _open_image,
    _read_gray_png,
    db_info,
    read_id_list,
    read_image,
    resolve_tasks,
)

if TYPE_CHECKING:
    from benchmark.protocol import Protocol

__all__ = ["IGNORE", "SPLITS", "DatasetError", "DatasetNotFoundError", "db_info", "read_image"]  # re-exported

# The label files this layout holds, by the task names of the protocol that reads it (pascal-context).
TASKS = ("semseg", "human_parts", "sal", "normals")
LAYOUT = "the PASCAL_MT root (JPEGImages/, ImageSets/Context/, semseg/, human_parts/, normals_distill/, ...)"
NUM_SEMSEG_CLASSES = 21
PERSON_CLASS = 15  # PASCAL VOC / PASCAL-Part category id of 'person'
CACHE_ENV = "MTPEFT_CACHE"
SIZE_MISMATCH = ("error", "resize")

# The official 6-part grouping of the PASCAL-Part person parts (docs/protocol.md 1.2); any other part name is 0.
HUMAN_PART_GROUPS: dict[str, int] = {
    **dict.fromkeys(("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
NUM_HUMAN_PARTS = 1 + max(HUMAN_PART_GROUPS.values())

# Relative paths of every file kind; ``{id}`` is filled in.
FILES = {
    "image": "JPEGImages/{id}.jpg",
    "semseg_voc": "semseg/VOC12/{id}.png",
    "semseg_context": "semseg/pascal-context/{id}.png",
    "human_parts": "human_parts/{id}.mat",
    "labelmap": "pascal-context/trainval/{id}.mat",
    "normals": "normals_distill/{id}.png",
    "sal": "sal_distill/{id}.png",
}
SPLIT_FILE = "ImageSets/Context/{split}.txt"
# What each task needs besides the image (semseg: either of its two files).
_TASK_FILES = {"semseg": ("semseg_context",), "human_parts": ("human_parts",), "sal": ("sal",)}
_TASK_FILES["normals"] = ("normals", "labelmap")
_EXPECTED = {
    "image": "an RGB JPEG image",
    "semseg_context": "an 8-bit PNG of class ids 0..20 (255 = ignore)",
    "human_parts": "a MATLAB file with the PASCAL-Part 'anno' struct",
    "labelmap": "a MATLAB file with the PASCAL-Context 'LabelMap'",
    "normals": "an RGB PNG of distilled surface normals",
    "sal": "a grayscale PNG of distilled saliency",
}


# ---------------------------------------------------------------------------------------------------------------
# Class tables (package data)


@cache
def normals_valid_context_ids() -> frozenset[int]:
    """Context class ids whose normals are kept: names also in the NYUD table (not 'unknown'), plus tvmonitor."""
    context, nyu = db_info("context_classes.json"), db_info("nyu_classes.json")
    ids = {context[name] for name in nyu if name in context and name != "unknown"}
    return frozenset(ids | {context["tvmonitor"]})


def default_cache_dir() -> Path:
    """``$MTPEFT_CACHE``, else ``~/.cache/mtpeft``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mtpeft"


# ---------------------------------------------------------------------------------------------------------------
# File readers: each returns NumPy arrays or raises DatasetError naming the file


def read_semseg(path: Path) -> np.ndarray:
    """Semseg label uint8 [H, W]; values must be 0..20 or 255."""
    arr = _read_gray_png(path, _EXPECTED["semseg_context"])
    bad = (arr >= NUM_SEMSEG_CLASSES) & (arr != IGNORE)
    if bad.any():
        values = sorted(int(v) for v in np.unique(arr[bad]))[:8]
        raise DatasetError(f"{path}: semseg values {values} out of range; expected 0..20 or 255", path, "range")
    return arr


def read_sal(path: Path) -> np.ndarray:
    """Saliency uint8 [H, W] in {0, 1}: png / 255 > 0.5."""
    arr = _read_gray_png(path, _EXPECTED["sal"])
    return (arr.astype(np.float64) / 255.0 > 0.5).astype(np.uint8)


def read_normals_png(path: Path) -> np.ndarray:
    """The distilled normals PNG, uint8 [H, W, 3]."""
    img = _open_image(path, _EXPECTED["normals"])
    if img.mode != "RGB":
        raise DatasetError(f"{path}: PNG mode {img.mode!r}, expected {_EXPECTED['normals']}", path, "structure")
    return np.asarray(img)


def _loadmat(path: Path, key: str, what: str) -> Any:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: file not found (expected {what})", path)
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises many types (ValueError, TypeError, MatReadError, OSError, ...)
        raise DatasetError(
            f"{path}: cannot read MATLAB file ({type(e).__name__}: {e}); expected {what}", path, "unreadable"
        ) from e
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{path}: no key {key!r} (found {keys}); expected {what}", path, "structure")
    return mat[key]


def read_labelmap(path: Path) -> np.ndarray:
    """PASCAL-Context ``LabelMap``: integer [H, W] class ids (0 = unlabeled)."""
    arr = np.asarray(_loadmat(path, "LabelMap", _EXPECTED["labelmap"]))
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DatasetError(
            f"{path}: LabelMap is {arr.dtype} {list(arr.shape)}; expected a 2-D array of integer class ids",
            path,
            "structure",
        )
    if np.issubdtype(arr.dtype, np.floating):  # as the official loader, any numeric dtype holding whole numbers
        bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr > np.iinfo(np.int32).max)
        if bad.any():
            value = arr[bad].flat[0]
            raise DatasetError(
                f"{path}: LabelMap ({arr.dtype}) holds {int(bad.sum())} value(s) that are not whole class ids, "
                f"e.g. {value!r}; expected integer class ids",
                path,
                "structure",
            )
        arr = arr.astype(np.int64)
    return arr


def _scalar(value: Any) -> float:
    # MATLAB scalars load as 1x1 arrays; int() of a 2-D array is what breaks the official code under NumPy 2.
    arr = np.asarray(value)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"expected a numeric scalar, got {arr.dtype} {list(arr.shape)}")
    return float(arr.reshape(-1)[0])


def _string(value: Any) -> str:
    arr = np.asarray(value)
    if arr.dtype.kind != "U" or arr.size != 1:
        raise ValueError(f"expected a string, got {arr.dtype} {list(arr.shape)}")
    return str(arr.reshape(-1)[0])


def _struct_items(value: Any, fields: Sequence[str], what: str) -> list[Any]:
    """Elements of a MATLAB struct array (scipy record array); [] for an empty ([] or 0x0) value."""
    arr = np.asarray(value)
    if arr.size == 0:
        return []
    missing = [f for f in fields if arr.dtype.names is None or f not in arr.dtype.names]
    if missing:
        raise ValueError(f"{what} lacks fields {missing} (has {list(arr.dtype.names or [])})")
    return list(arr.reshape(-1))


@dataclass(frozen=True)
class PartObject:
    class_ind: int  # PASCAL category (15 = person)
    mask: np.ndarray  # uint8/bool [H, W]
    parts: tuple[tuple[str, np.ndarray], ...]  # (part name, mask)


def read_part_objects(path: Path) -> list[PartObject]:
    """The objects of a PASCAL-Part ``anno`` struct (fields imname, objects{class, class_ind, mask, parts})."""
    anno = _loadmat(path, "anno", _EXPECTED["human_parts"])
    try:
        records = _struct_items(anno, ("objects",), "'anno'")
        if len(records) != 1:
            raise ValueError(f"'anno' has {len(records)} elements, expected a 1x1 struct")
        rec = records[0]
        objects = []
        for k, obj in enumerate(_struct_items(rec["objects"], ("class_ind", "mask", "parts"), "'anno.objects'")):
            mask = np.asarray(obj["mask"])
            if mask.ndim != 2:
                raise ValueError(f"object {k}: mask has shape {list(mask.shape)}, expected 2-D")
            parts = []
            for j, part in enumerate(_struct_items(obj["parts"], ("part_name", "mask"), f"object {k} parts")):
                pmask = np.asarray(part["mask"])
                if pmask.shape != mask.shape:
                    raise ValueError(
                        f"object {k} part {j}: mask {list(pmask.shape)} != object mask {list(mask.shape)}"
                    )
                parts.append((_string(part["part_name"]), pmask))
            objects.append(PartObject(int(_scalar(obj["class_ind"])), mask, tuple(parts)))
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise DatasetError(
            f"{path}: unexpected 'anno' structure ({e}); expected {_EXPECTED['human_parts']}", path, "structure"
        ) from e
    return objects


def part_categories(objects: Iterable[PartObject]) -> list[int]:
    """Category of each object, or -1 when its mask is empty (the official parts index)."""
    return [o.class_ind if int(np.count_nonzero(o.mask)) > 0 else -1 for o in objects]


def human_parts_map(objects: Sequence[PartObject], shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Paint the part groups of every person that has parts, in file order (later objects win).

    Returns the map (uint8, 0 = background) and the shape of the masks it was painted from (``shape`` when no
    person has parts). As in the official loader, nothing is painted unless some person has a non-empty mask.
    """
    if PERSON_CLASS not in part_categories(objects):
        return np.zeros(shape, np.uint8), shape
    target = None
    for obj in objects:
        if obj.class_ind != PERSON_CLASS or not obj.parts:
            continue
        if target is None:
            target = np.zeros(obj.mask.shape, np.uint8)
        for name, mask in obj.parts:
            if mask.shape != target.shape:
                raise ValueError(f"part mask {list(mask.shape)} differs from the first person's {list(target.shape)}")
            np.copyto(target, HUMAN_PART_GROUPS.get(name, 0), where=mask.astype(bool))  # = target[mask] = group
    if target is None:
        return np.zeros(shape, np.uint8), shape
    return target, target.shape


# ---------------------------------------------------------------------------------------------------------------
# Parts index (cached outside the dataset folder)

_PARTS_INDEX_VERSION = 1


def _parts_index_key(files: Sequence[tuple[str, Path]]) -> str:
    h = hashlib.sha256(f"parts-index-v{_PARTS_INDEX_VERSION}\n".encode())
    for name, path in files:
        st = path.stat()
        h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def parts_index(root: Path, ids: Sequence[str], cache_dir: Path | None = None) -> dict[str, list[int]]:
    """{id: category of each object, -1 for empty masks} for the ids' parts files, cached under ``cache_dir``.

    The cache file name is a hash of the ids and the parts files' sizes and mtimes, so a changed file gives a new
    key and the index is rebuilt. Nothing is written under ``root``.
    """
    root = Path(root)
    files = [(i, root / FILES["human_parts"].format(id=i)) for i in ids]
    for _, path in files:
        if not path.is_file():
            raise DatasetNotFoundError(f"{path}: file not found (expected {_EXPECTED['human_parts']})", path)
    key = _parts_index_key(files)
    cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "parts_index" / f"{key}.json"
    if cache_file.is_file():
        try:
            data = json.loads(cache_file.read_text(encoding="utf-8"))
            if isinstance(data, dict) and list(data) == list(ids):
                return {k: [int(c) for c in v] for k, v in data.items()}
        except (OSError, ValueError):
            pass  # unreadable or foreign: rebuild below
    index = {i: part_categories(read_part_objects(p)) for i, p in files}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(index, f)
        os.replace(tmp, cache_file)
    except OSError as e:  # a read-only cache only costs time
        warnings.warn(f"could not write the parts index cache {cache_file}: {e}", stacklevel=2)
    return index


def _align(
    arr: np.ndarray, shape: tuple[int, int], path: Path, what: str, size_mismatch: str, cubic: bool = False
) -> np.ndarray:
    if arr.shape[:2] == tuple(shape):
        return arr
    if size_mismatch == "resize":
        # The official loader's fallback: resize to the image size, nearest for label maps, cubic for normals.
        return cv2.resize(arr, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC if cubic else cv2.INTER_NEAREST)
    raise DatasetError(
        f"{path}: {what} is {arr.shape[0]}x{arr.shape[1]} but its image is {shape[0]}x{shape[1]} (HxW); "
        "expected the same size",
        path,
        "size",
    )


def semseg_path(root: Path, image_id: str) -> Path:
    """semseg/VOC12/{id}.png when it exists, else semseg/pascal-context/{id}.png (the official preference)."""
    voc = Path(root) / FILES["semseg_voc"].format(id=image_id)
    return voc if voc.is_file() else Path(root) / FILES["semseg_context"].format(id=image_id)


@cache
def _normals_png_table() -> np.ndarray:
    """float64 [256]: 2 * v / 255 - 1 for every uint8 value v of a normals PNG."""
    table = 2.0 * np.arange(256, dtype=np.uint8).astype(np.float64) / 255.0 - 1.0
    table.flags.writeable = False
    return table


@cache
def _normals_valid_table() -> np.ndarray:
    """bool [max id + 1]: is this Context class id normals-valid."""
    ids = sorted(normals_valid_context_ids())
    table = np.zeros(ids[-1] + 1, bool)
    table[ids] = True
    table.flags.writeable = False
    return table


def _normals_valid(labelmap: np.ndarray) -> np.ndarray:
    """np.isin(labelmap, normals_valid_context_ids()), as one table lookup when the ids are in the table's range."""
    table = _normals_valid_table()
    if labelmap.size and labelmap.min() >= 0 and labelmap.max() < len(table):
        return np.take(table, labelmap)
    return np.isin(labelmap, np.fromiter(normals_valid_context_ids(), dtype=np.int64))


def load_label(
    root: Path, task: str, image_id: str, shape: tuple[int, int], size_mismatch: str = "error"
) -> np.ndarray:
    """One task's raw label for ``image_id``, aligned to the image ``shape`` (H, W): semseg, human_parts and sal
    uint8 [H, W]; normals float64 [H, W, 3], zero where the Context class is not normals-valid."""
    root = Path(root)
    if task == "semseg":
        path = semseg_path(root, image_id)
        return _align(read_semseg(path), shape, path, "the semseg label", size_mismatch)
    if task == "human_parts":
        path = root / FILES["human_parts"].format(id=image_id)
        try:
            target, _ = human_parts_map(read_part_objects(path), shape)
        except ValueError as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(f"{path}: {e}; expected equal-sized masks", path, "structure") from e
        return _align(target, shape, path, "the human parts masks", size_mismatch)
    if task == "sal":
        path = root / FILES["sal"].format(id=image_id)
        return _align(read_sal(path), shape, path, "the saliency map", size_mismatch)
    if task == "normals":
        png_path = root / FILES["normals"].format(id=image_id)
        lm_path = root / FILES["labelmap"].format(id=image_id)
        png, labelmap = read_normals_png(png_path), read_labelmap(lm_path)
        if labelmap.shape != png.shape[:2]:
            raise DatasetError(
                f"{lm_path}: LabelMap is {labelmap.shape[0]}x{labelmap.shape[1]} but {png_path.name} is "
                f"{png.shape[0]}x{png.shape[1]}; expected the same size",
                lm_path,
                "size",
            )
        # where(valid, 2 * png / 255 - 1, 0) in float64 as the official loader (its result is what the fixture
        # holds); the 256 possible values come from a table computed with those same float64 operations.
        normals = cv2.LUT(png, _normals_png_table())
        np.copyto(normals, 0.0, where=~_normals_valid(labelmap)[..., None])
        return _align(normals, shape, png_path, "the normals map", size_mismatch, cubic=True)
    raise DatasetError(f"unknown task {task!r}; expected one of {list(TASKS)}", None, "config")


# ---------------------------------------------------------------------------------------------------------------
# The dataset


def read_split(root: Path, split: str) -> list[str]:
    """Ids of ``ImageSets/Context/{split}.txt`` in file order; duplicates and blank names are errors."""
    return read_id_list(Path(root) / SPLIT_FILE.format(split=split))


def image_path(root: Path, image_id: str) -> Path:
    return Path(root) / FILES["image"].format(id=image_id)


class PascalMT(MultiTaskDataset):
    """PASCAL-Context multi-task split (see the module docstring for layout, sample format and differences).

    ``transform`` is typically :func:`benchmark.transforms.build_transforms`; without one, items are the raw
    NumPy arrays of :meth:`load_raw` plus ``meta``. ``drop_images_without_parts`` (default: only when
    human_parts is the sole task, as the official loader does) removes the images without a person.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "val",
        tasks: Iterable[str] = TASKS,
        transform: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        size_mismatch: str = "error",
        drop_images_without_parts: bool | None = None,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root).expanduser()
        self.split = split
        self.tasks = resolve_tasks(tasks, TASKS)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        if size_mismatch not in SIZE_MISMATCH:
            raise DatasetError(f"size_mismatch must be one of {SIZE_MISMATCH}, got {size_mismatch!r}", None, "config")
        self.size_mismatch = size_mismatch
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"{self.root}: dataset folder not found (expected the PASCAL_MT root)", self.root
            )
        self.ids = read_split(self.root, split)
        self._check_files_exist()
        self._has_parts: list[bool] | None = None
        if drop_images_without_parts is None:
            drop_images_without_parts = self.tasks == ("human_parts",)
        if drop_images_without_parts:
            if "human_parts" not in self.tasks:
                raise DatasetError("drop_images_without_parts needs the human_parts task", None, "config")
            keep = self.has_human_parts
            self.ids = [i for i, k in zip(self.ids, keep, strict=True) if k]
            self._has_parts = [True] * len(self.ids)

    # -- construction checks ----------------------------------------------------------------------------------

    def _listing(self, kind: str) -> set[str]:
        folder = (self.root / FILES[kind].format(id="x")).parent
        try:
            return {e.name for e in os.scandir(folder) if e.is_file()}
        except FileNotFoundError:
            return set()

    def _check_files_exist(self) -> None:
        kinds = ["image"] + [k for t in self.tasks for k in _TASK_FILES[t]]
        listings = {k: self._listing(k) for k in kinds}
        voc = self._listing("semseg_voc") if "semseg" in self.tasks else set()
        missing: list[tuple[str, Path]] = []
        for i in self.ids:
            for kind in kinds:
                name = Path(FILES[kind].format(id=i)).name
                if kind == "semseg_context" and name in voc:
                    continue  # the VOC12 label is used instead
                if name not in listings[kind]:
                    missing.append((kind, self.root / FILES[kind].format(id=i)))
        if missing:
            kind, path = missing[0]
            more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
            also = f" or semseg/VOC12/{path.stem}.png" if kind == "semseg_context" else ""
            raise DatasetNotFoundError(
                f"{path}{also}: file not found (expected {_EXPECTED[kind]} for split {self.split!r}, "
                f"tasks {list(self.tasks)}){more}",
                path,
            )

    # -- index ------------------------------------------------------------------------------------------------

    @property
    def has_human_parts(self) -> list[bool]:
        """Per id: does the image have a person with a non-empty mask (cached index, built on first use)."""
        if self._has_parts is None:
            index = parts_index(self.root, self.ids, self.cache_dir)
            self._has_parts = [PERSON_CLASS in index[i] for i in self.ids]
        return self._has_parts

    # -- loading ----------------------------------------------------------------------------------------------

    def load_raw(self, index: int) -> dict[str, np.ndarray]:
        """The arrays before any transform: image float64 [H,W,3], semseg/human_parts/sal uint8 [H,W],
        normals float64 [H,W,3] (zero where invalid)."""
        image_id = self.ids[index]
        image = read_image(image_path(self.root, image_id))
        shape = image.shape[:2]
        sample = {"image": image}
        for task in self.tasks:
            sample[task] = load_label(self.root, task, image_id, shape, self.size_mismatch)
        return sample

    def image_path(self, index: int) -> Path:
        return image_path(self.root, self.ids[index])


DATASET = PascalMT
OBTAIN = "download and check it with `benchmark-data fetch --dest DIR`"


# ---------------------------------------------------------------------------------------------------------------
# Dataset check (benchmark-data check)


def _check_normals_png(path: Path) -> None:
    """A normals PNG that is zero everywhere encodes no normal at all (each pixel would decode to (-1, -1, -1))."""
    if path.is_file() and not read_normals_png(path).any():
        raise DatasetError(
            f"{path}: every pixel is 0, so no pixel holds a normal; expected unit normals encoded as (n + 1) * 255 / 2",
            path,
            "all zero",
        )


def check_label(root: Path, task: str, image_id: str, shape: tuple[int, int]) -> None:
    """Read and validate one task's label files for ``image_id`` (``benchmark.dataset.check_folder``)."""
    if task == "normals":
        _check_normals_png(Path(root) / FILES["normals"].format(id=image_id))
    load_label(root, task, image_id, shape)


def check_dataset(
    root: str | os.PathLike[str], splits: Sequence[str] = SPLITS, tasks: Iterable[str] = TASKS, progress: Any = None
) -> Any:
    """``benchmark.dataset.check_dataset`` for this layout, by task names (the PASCAL-only signature of old)."""
    from benchmark.dataset import check_folder

    return check_folder(sys.modules[__name__], root, splits, resolve_tasks(tasks, TASKS), progress)


def make_synthetic(out: Path, n_train: int, n_val: int, seed: int, protocol: Protocol, **options: Any) -> Path:
    """Generated data in this layout (``benchmark.synth``)."""
    from benchmark.synth import make_pascal_dataset

    return make_pascal_dataset(out, n_train, n_val, seed, **options)
