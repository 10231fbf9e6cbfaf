"""NYUDv2 multi-task data ("NYUD_MT", docs/protocol.md, NYUDv2 section), data source ``nyud_mt``: loader, label
decoding, checks, generated data.

Layout read under ``root`` (the real NYUD_MT folder, the parity fixture's tiny copy, or ``benchmark-data synth
--protocol nyud``)::

    images/{id}.jpg           image (Pillow, RGB)
    segmentation/{id}.png     8-bit grayscale PNG: 0 = unlabelled, 1..40 = the 40 NYUD classes
    depth/{id}.npy            float [H, W], metres, 0 = missing
    normals/{id}.npy          float [H, W, 3], components in [-1, 1], (0, 0, 0) = invalid
    gt_sets/{split}.txt       one id per line

What the loader returns for one id, as the official ``NYUD_MT`` loader does:

- ids in the split file's order;
- ``image``: float64 [H, W, 3], 0..255;
- ``semseg``: float64 [H, W] (the official dtype, which decides OpenCV's nearest warp), PNG 0 -> 255 (ignore) and v -> v - 1 (classes 0..39). A PNG value above 40 is an error
  (``semseg_out_of_range="error"``, the default): the official decoding turns 255 into 254 and 41..254 into
  40..253, labels of no class that crash the official training loss; ``"keep"`` decodes them as the official code
  does (the parity check uses it);
- ``depth`` and ``normals``: the ``.npy`` arrays in their stored dtype (``np.load(allow_pickle=False)``: a file is
  never unpickled); missing depth and invalid normals are marked by the transforms (depth 0 and zero vectors ->
  255 after the resize);
- a label whose H x W differs from the image's is first resized to the image size with ``cv2.resize`` (nearest
  for semseg and depth, cubic without renormalisation for normals), with a warning naming the file (the official
  loader prints ``RESHAPE``).

The transforms are the protocol's (``benchmark.transforms``, the same family as PASCAL's with the depth kind). The
edge maps of the official NYUD_MT layout (``edge/{id}.npy``) are not read: edge detection is not a task of nyud v1
(its official evaluation needs an external boundary-matching toolbox).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from PIL import Image

from benchmark.dataset import (
    MAX_IMAGE_PIXELS,
    DatasetError,
    DatasetNotFoundError,
    MultiTaskDataset,
    _read_gray_png,
    read_id_list,
    read_image,
    resolve_tasks,
)

if TYPE_CHECKING:
    from benchmark.protocol import Protocol

# The label files this layout holds, by the task names of the protocol that reads it (nyud).
TASKS = ("semseg", "depth", "normals")
LAYOUT = "the NYUD_MT root (images/, segmentation/, depth/, normals/, gt_sets/)"
NUM_SEMSEG_CLASSES = 40
IGNORE = 255
FILES = {
    "image": "images/{id}.jpg",
    "semseg": "segmentation/{id}.png",
    "depth": "depth/{id}.npy",
    "normals": "normals/{id}.npy",
}
SPLIT_FILE = "gt_sets/{split}.txt"
SEMSEG_OUT_OF_RANGE = ("error", "keep")
_EXPECTED = {
    "image": "an RGB JPEG image",
    "semseg": f"an 8-bit grayscale PNG of 0 (unlabelled) and classes 1..{NUM_SEMSEG_CLASSES}",
    "depth": "a .npy float array [H, W] of depths in metres (0 = missing), finite and not negative",
    "normals": "a .npy float array [H, W, 3] of surface normals ((0, 0, 0) = invalid), finite",
}
_NPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def read_split(root: Path, split: str) -> list[str]:
    """Ids of ``gt_sets/{split}.txt`` in file order; duplicates and blank names are errors."""
    return read_id_list(Path(root) / SPLIT_FILE.format(split=split))


def image_path(root: Path, image_id: str) -> Path:
    return Path(root) / FILES["image"].format(id=image_id)


# ---------------------------------------------------------------------------------------------------------------
# File readers: each returns NumPy arrays or raises DatasetError naming the file


def read_semseg(path: Path, out_of_range: str = "error") -> np.ndarray:
    """The segmentation PNG decoded as the official loader does: float64 [H, W], 0 -> 255, v -> v - 1."""
    png = _read_gray_png(path, _EXPECTED["semseg"])
    bad = png > NUM_SEMSEG_CLASSES
    if bad.any() and out_of_range == "error":
        values = sorted(int(v) for v in np.unique(png[bad]))[:8]
        raise DatasetError(
            f"{path}: PNG values {values} above {NUM_SEMSEG_CLASSES} in {int(bad.sum())} pixel(s); expected "
            f"{_EXPECTED['semseg']} (the official decoding v -> v - 1 would turn 255 into 254, a label of no class "
            "that crashes the official training loss)",
            path,
            "range",
        )
    # float64 as the official loader holds it: OpenCV's nearest warp of a uint8 map picks other source pixels
    # than the same warp of a float map, so the dtype is part of the official train transforms
    label = png.astype(np.float64) - 1.0
    label[png == 0] = IGNORE
    return label


def read_npy(path: Path, what: str, channels: int | None) -> np.ndarray:
    """A float32/float64 ``.npy`` array [H, W] (``channels`` None) or [H, W, channels], finite; never unpickled.

    The header is read and checked (dtype, shape, size) before the data, so a file claiming a huge array is refused
    without allocating it."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: file not found (expected {what})", path)
    want = "[H, W]" if channels is None else f"[H, W, {channels}]"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            ndim = 2 if channels is None else 3
            if dtype not in _NPY_DTYPES or len(shape) != ndim or (channels is not None and shape[2] != channels):
                raise DatasetError(
                    f"{path}: array of {dtype} {list(shape)}; expected {what} (float32 or float64 {want})",
                    path,
                    "structure",
                )
            if shape[0] * shape[1] > MAX_IMAGE_PIXELS or 0 in shape:
                raise DatasetError(
                    f"{path}: array of {list(shape)}; expected {what} with 1 to {MAX_IMAGE_PIXELS:,} pixels",
                    path,
                    "size",
                )
        arr = np.load(path, allow_pickle=False)
    except DatasetError:
        raise
    except Exception as e:  # a damaged file raises ValueError, EOFError, OSError, ...; a pickle is refused
        raise DatasetError(
            f"{path}: cannot read the .npy file ({type(e).__name__}: {e}); expected {what}", path, "unreadable"
        ) from e
    if fortran:
        arr = np.ascontiguousarray(arr)
    if not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise DatasetError(f"{path}: {n} value(s) are NaN or infinite; expected {what}", path, "range")
    return arr


def read_depth(path: Path) -> np.ndarray:
    arr = read_npy(path, _EXPECTED["depth"], None)
    if (arr < 0).any():
        raise DatasetError(
            f"{path}: {int((arr < 0).sum())} negative value(s), e.g. {float(arr[arr < 0].flat[0])}; expected "
            f"{_EXPECTED['depth']}",
            path,
            "range",
        )
    return arr


def read_normals(path: Path) -> np.ndarray:
    return read_npy(path, _EXPECTED["normals"], 3)


class LabelResizedWarning(UserWarning):
    """A label file whose size differs from its image's was resized to it (the official loader's RESHAPE)."""

    def __init__(self, message: str, task: str, path: Path) -> None:
        super().__init__(message)
        self.task, self.path = task, path


def _align(
    arr: np.ndarray, shape: tuple[int, int], task: str, path: Path, interpolation: int, warn: bool
) -> np.ndarray:
    """The official alignment of a label to its image: cv2.resize to the image's H x W."""
    if arr.shape[:2] == tuple(shape):
        return arr
    if warn:
        how = "cubic" if interpolation == cv2.INTER_CUBIC else "nearest"
        message = (
            f"{path}: label is {arr.shape[0]}x{arr.shape[1]} but its image is {shape[0]}x{shape[1]} (HxW); resized "
            f"to the image size ({how}) as the official loader does (RESHAPE)"
        )
        warnings.warn(LabelResizedWarning(message, task, path), stacklevel=3)
    return cv2.resize(arr, (shape[1], shape[0]), interpolation=interpolation)


def load_label(
    root: Path,
    task: str,
    image_id: str,
    shape: tuple[int, int],
    semseg_out_of_range: str = "error",
    warn: bool = True,
) -> np.ndarray:
    """One task's raw label for ``image_id``, aligned to the image ``shape`` (H, W)."""
    if task not in FILES or task == "image":
        raise DatasetError(f"unknown task {task!r}; expected one of {list(TASKS)}", None, "config")
    path = Path(root) / FILES[task].format(id=image_id)
    if task == "semseg":
        return _align(read_semseg(path, semseg_out_of_range), shape, task, path, cv2.INTER_NEAREST, warn)
    if task == "depth":
        return _align(read_depth(path), shape, task, path, cv2.INTER_NEAREST, warn)
    return _align(read_normals(path), shape, task, path, cv2.INTER_CUBIC, warn)


# ---------------------------------------------------------------------------------------------------------------
# The dataset


class NYUDMT(MultiTaskDataset):
    """NYUDv2 multi-task split (see the module docstring for layout, decoding and alignment).

    The arguments are PascalMT's, so that ``benchmark.dataset.open_dataset`` passes the same ones to every data
    source; ``cache_dir`` is unused (nothing is cached for this layout)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "val",
        tasks: Iterable[str] = TASKS,
        transform: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        semseg_out_of_range: str = "error",
    ) -> None:
        super().__init__(transform)
        self.root = Path(root).expanduser()
        self.split = split
        self.tasks = resolve_tasks(tasks, TASKS)
        if semseg_out_of_range not in SEMSEG_OUT_OF_RANGE:
            raise DatasetError(
                f"semseg_out_of_range must be one of {SEMSEG_OUT_OF_RANGE}, got {semseg_out_of_range!r}",
                None,
                "config",
            )
        self.semseg_out_of_range = semseg_out_of_range
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"{self.root}: dataset folder not found (expected {LAYOUT})", self.root)
        self.ids = read_split(self.root, split)
        self._check_files_exist()

    def _check_files_exist(self) -> None:
        missing: list[tuple[str, Path]] = []
        for kind in ("image", *self.tasks):
            folder = (self.root / FILES[kind].format(id="x")).parent
            try:
                listing = {e.name for e in os.scandir(folder) if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                listing = set()
            missing += [(kind, folder / Path(FILES[kind].format(id=i)).name) for i in self.ids]
            missing = [(k, p) for k, p in missing if k != kind or p.name not in listing]
        if missing:
            kind, path = missing[0]
            more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
            raise DatasetNotFoundError(
                f"{path}: file not found (expected {_EXPECTED[kind]} for split {self.split!r}, tasks "
                f"{list(self.tasks)}){more}",
                path,
            )

    def load_raw(self, index: int) -> dict[str, np.ndarray]:
        """The arrays before any transform: image float64 [H,W,3], semseg float64 [H,W] (255 ignore), depth [H,W]
        and normals [H,W,3] in their file dtype; every label aligned to the image's size."""
        image_id = self.ids[index]
        image = read_image(image_path(self.root, image_id), _EXPECTED["image"])
        shape = image.shape[:2]
        sample = {"image": image}
        for task in self.tasks:
            sample[task] = load_label(self.root, task, image_id, shape, self.semseg_out_of_range)
        return sample

    def image_path(self, index: int) -> Path:
        return image_path(self.root, self.ids[index])


DATASET = NYUDMT
OBTAIN = (
    "the NYUD_MT folder of the MTLoRA code family (795 train / 654 val images); `benchmark-data fetch` downloads "
    "PASCAL_MT only; check a folder with `benchmark-data check --protocol nyud DIR`"
)


def check_label(root: Path, task: str, image_id: str, shape: tuple[int, int]) -> None:
    """Read and validate one task's label file for ``image_id`` (``benchmark.dataset.check_folder``)."""
    load_label(root, task, image_id, shape, warn=False)


def check_dataset(
    root: str | os.PathLike[str],
    splits: Sequence[str] = ("train", "val"),
    tasks: Iterable[str] = TASKS,
    progress: Any = None,
) -> Any:
    """``benchmark.dataset.check_dataset`` for this layout, by task names."""
    from benchmark.dataset import check_folder

    return check_folder(sys.modules[__name__], root, splits, resolve_tasks(tasks, TASKS), progress)


# ---------------------------------------------------------------------------------------------------------------
# Generated data (benchmark-data synth --protocol nyud)

# (NYUD class 1..40, RGB albedo) of the scene parts; the background planes first
_WALL, _FLOOR, _CEILING = (1, (200, 190, 160)), (2, (120, 90, 60)), (22, (235, 235, 240))
_OBJECTS = [(5, (60, 140, 60)), (7, (170, 60, 40)), (10, (40, 80, 180)), (14, (230, 200, 40)), (40, (140, 60, 160))]
_LIGHT = np.array([-0.3, -0.5, 0.81]) / np.linalg.norm([-0.3, -0.5, 0.81])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, ...]:
    """A room seen from inside: a back wall, a floor and a ceiling receding with depth, and boxes standing in it.

    Returns uint8 image [H,W,3], PNG semseg [H,W] (0 void, 1..40), float32 depth [H,W] (0 missing), float32 normals
    [H,W,3] (zero where invalid). The colour tells the class, the shading the normal, the brightness the depth."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    v = (yy + 0.5) / h - 0.5  # -0.5 top .. 0.5 bottom
    horizon_lo, horizon_hi = rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.3)
    wall_depth = rng.uniform(3.0, 6.0)
    semseg = np.full((h, w), _WALL[0], np.uint8)
    albedo = np.empty((h, w, 3))
    albedo[:] = _WALL[1]
    depth = np.full((h, w), wall_depth)
    normals = np.zeros((h, w, 3))
    normals[:] = (0.0, 0.0, 1.0)
    floor = v > horizon_lo
    ceiling = v < -horizon_hi
    # floor and ceiling: the depth falls towards the image's bottom / top edge
    depth[floor] = wall_depth * horizon_lo / np.maximum(v[floor], 1e-3)
    depth[ceiling] = wall_depth * horizon_hi / np.maximum(-v[ceiling], 1e-3)
    for mask, (cls, colour), n in ((floor, _FLOOR, (0.0, -0.8, 0.6)), (ceiling, _CEILING, (0.0, 0.8, 0.6))):
        semseg[mask], albedo[mask], normals[mask] = cls, colour, _unit(np.array(n))
    for _ in range(int(rng.integers(1, 4))):
        cls, colour = _OBJECTS[int(rng.integers(len(_OBJECTS)))]
        bh, bw = rng.uniform(0.2, 0.45) * h, rng.uniform(0.15, 0.35) * w
        x0, y1 = rng.uniform(0, w - bw), rng.uniform(0.6, 1.0) * h
        box = (xx >= x0) & (xx < x0 + bw) & (yy >= y1 - bh) & (yy < y1)
        if not box.any():
            continue
        u = np.clip((xx - x0) / bw * 2 - 1, -1, 1)
        semseg[box], albedo[box] = cls, colour
        depth[box] = rng.uniform(1.0, 0.8 * wall_depth) - 0.3 * np.sqrt(1 - 0.7 * u[box] ** 2)
        normals[box] = _unit(np.stack([0.8 * u, np.zeros_like(u), np.sqrt(1 - 0.64 * u**2)], -1))[box]
    # void (unlabelled) strip, missing depth: a block plus scattered pixels; invalid normals where depth is missing
    if rng.random() < 0.5:
        semseg[:, : max(1, w // 12)] = 0
    missing = rng.random((h, w)) < 0.02
    by, bx = int(rng.integers(0, h)), int(rng.integers(0, w))
    missing[by : by + h // 6, bx : bx + w // 6] = True
    depth[missing] = 0.0
    normals[missing] = 0.0
    shade = 0.35 + 0.65 * np.clip(normals @ _LIGHT, 0.0, None)
    fog = np.exp(-0.12 * np.where(depth > 0, depth, wall_depth))
    img = albedo * (shade * fog)[..., None] * 1.3 + rng.normal(0.0, 3.0, albedo.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, semseg, depth.astype(np.float32), normals.astype(np.float32)


def make_synthetic(
    out: Path,
    n_train: int,
    n_val: int,
    seed: int,
    protocol: Protocol | None = None,
    size_range: tuple[int, int] = (40, 120),
) -> Path:
    """Write a generated dataset in the NYUD_MT layout into the existing empty folder ``out``: image k from
    ``default_rng([seed, k])``, ids ``img_{k:04d}``, a seeded split (``benchmark.synth``)."""
    out = Path(out)
    for kind in FILES.values():
        (out / kind).parent.mkdir(parents=True, exist_ok=True)
    (out / SPLIT_FILE).parent.mkdir(parents=True, exist_ok=True)
    ids = [f"img_{k:04d}" for k in range(n_train + n_val)]
    order = np.random.default_rng([seed, 10**6]).permutation(len(ids))
    splits = {"train": [ids[i] for i in sorted(order[:n_train])], "val": [ids[i] for i in sorted(order[n_train:])]}
    lo, hi = size_range
    for k, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, k])
        h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
        image, semseg, depth, normals = _scene(rng, h, w)
        Image.fromarray(image).save(out / FILES["image"].format(id=image_id), quality=92)
        Image.fromarray(semseg, mode="L").save(out / FILES["semseg"].format(id=image_id), compress_level=1)
        np.save(out / FILES["depth"].format(id=image_id), depth, allow_pickle=False)
        np.save(out / FILES["normals"].format(id=image_id), normals, allow_pickle=False)
    for split, names in splits.items():
        (out / SPLIT_FILE.format(split=split)).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return out
