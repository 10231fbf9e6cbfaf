"""Parity of the data pipelines with the official loaders (``python -m benchmark.parity``: dataset fixtures).

- ``dataset_*.pt`` beside a PASCAL_MT folder: the official PASCAL-Context loader with its val transforms;
- ``nyud_dataset_*.pt`` beside a NYUD_MT folder: the official NYUD loader with its val transforms, and its train
  transforms with forced draws.

:func:`parity_checks` tells the two apart by the fixture's dataset folder (``gt_sets/`` is NYUD_MT's). Every value
a check needs (image size, ids, shapes, dtypes, draws) is read from the fixture.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmark.dataset import DatasetNotFoundError
from benchmark.parity import Check
from benchmark.protocol import NYUD, PASCAL_CONTEXT
from benchmark.transforms import Draw, build_transforms, hflip, scale_rotate

# Error model of the image tolerance: once the official truncation and wrap are reproduced (same JPEG decoder, same
# OpenCV cubic resize) the uint8 image is exact, and the normalisation ``(x / 255 - mean) / std`` is a few fp32
# roundings of values up to |(1 - 0.406) / 0.225| = 2.64, i.e. < 1e-6; 1e-5 (the fixture READMEs' figure) is ten
# times that, while one uint8 step moves a value by 1 / 255 / 0.229 ~ 0.017, so any pixel cast differently fails.
IMAGE_TOL = 1e-5


def _load(path: Path) -> dict[str, Any]:
    from benchmark.safeload import safe_load

    return safe_load(path, "dataset fixture")


def parity_checks(fixture_path: str | os.PathLike[str]) -> list[Check]:
    """The checks of one dataset fixture, PASCAL or NYUD (told by the dataset folder the fixture lists)."""
    fixture_path = Path(fixture_path)
    fx = _load(fixture_path)
    if any(str(f).startswith("gt_sets/") for f in fx.get("dataset_files") or []):
        return nyud_parity_checks(fixture_path, fx)
    return pascal_parity_checks(fixture_path, fx)


def _fixture_dataset_dir(fixture_path: Path, fixture: dict[str, Any], marker: str) -> Path:
    """The dataset folder beside the fixture (the one holding ``marker``/ and every file the fixture lists)."""
    for key in ("dataset_dir", "dataset_folder", "dataset_root", "root"):
        name = fixture.get(key)
        if isinstance(name, str) and (fixture_path.parent / name / marker).is_dir():
            return fixture_path.parent / name
    candidates = sorted(p for p in fixture_path.parent.iterdir() if (p / marker).is_dir())
    files = fixture.get("dataset_files") or []
    matching = [c for c in candidates if files and all((c / f).is_file() for f in files)]
    if len(matching) == 1 or (matching and not files):
        return matching[0]
    if len(candidates) == 1:
        return candidates[0]
    raise DatasetNotFoundError(
        f"{fixture_path}: cannot tell which dataset folder beside it belongs to it (candidates: "
        f"{[c.name for c in candidates]}); expected exactly one folder containing {marker}/ and its files",
        fixture_path.parent,
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def pascal_parity_checks(
    fixture_path: str | os.PathLike[str], fx: dict[str, Any] | None = None, image_tol: float = IMAGE_TOL
) -> list[Check]:
    """PASCAL (``dataset_*.pt`` beside a PASCAL_MT folder): run the loader with the val transforms (official uint8 wrap) on the fixture's dataset and compare.

    Error model of ``image_tol``: see ``IMAGE_TOL``. Labels are integers (normals: float64 of the same OpenCV
    arithmetic): exact.

    One Check per (id, entry): the transformed tensors (labels exact, image within ``image_tol``), the raw arrays
    before the transforms, the meta size, the has-person flag; plus the id order and the normals' valid class set.
    """
    from benchmark.pascal_data import TASKS, PascalMT, normals_valid_context_ids

    fixture_path = Path(fixture_path)
    fx = _load(fixture_path) if fx is None else fx
    stem = fixture_path.stem
    checks: list[Check] = []
    root = _fixture_dataset_dir(fixture_path, fx, "JPEGImages")

    expected_valid = sorted(int(i) for i in fx["normals_valid_context_ids"])
    ours = sorted(normals_valid_context_ids())
    diff = sorted(set(expected_valid) ^ set(ours))
    detail = f"differ: {diff[:10]}" if diff else ""
    checks.append(Check(f"{stem}/normals_valid_context_ids", float(len(diff)), 0.0, not diff, detail))

    transform = build_transforms(
        PASCAL_CONTEXT, train=False, uint8_cast="wrap", label_dtype=torch.float64, image_size=int(fx["img_size"])
    )
    with tempfile.TemporaryDirectory(prefix="mtpeft-parity-") as cache:
        ds = PascalMT(root, fx["split"], TASKS, transform, cache_dir=cache, size_mismatch="resize")
        flags = ds.has_human_parts
    position = _id_order(stem, ds.ids, list(fx["ids"]), checks)
    for image_id in fx["ids"]:
        expected = fx["samples"][image_id]
        name = f"{stem}/{image_id}"
        n = _position(name, image_id, position, checks)
        if n is None:
            continue
        sample = ds[n]
        for key in ("image", *TASKS):
            tol = image_tol if key == "image" else 0.0
            d = _max_diff(sample[key], expected[key])
            detail = f"shape {list(sample[key].shape)} vs {list(expected[key].shape)}" if d == float("inf") else ""
            checks.append(Check(f"{name}/{key}", d, tol, d <= tol, detail))
        size = list(expected["meta"]["im_size"])
        same = sample["meta"]["size"] == size
        checks.append(Check(f"{name}/meta_size", 0.0 if same else 1.0, 0.0, same, f"ours {sample['meta']['size']}"))
        raw, fraw = ds.load_raw(n), expected.get("raw", {})
        pairs = {
            "image_uint8_hwc": raw["image"],
            "semseg_uint8_hw": raw["semseg"],
            "human_parts_uint8_hw": raw["human_parts"],
            "sal_uint8_hw": raw["sal"],
        }
        if "normals_png_uint8_hwc" in fraw and "normals_valid_mask_hw" in fraw:
            # The fixture stores the raw normals compactly: where(mask, 2 * png / 255 - 1, 0).
            png = fraw["normals_png_uint8_hwc"].to(torch.float64)
            mask = fraw["normals_valid_mask_hw"][..., None]
            fraw = {**fraw, "normals": torch.where(mask, 2.0 * png / 255.0 - 1.0, torch.zeros((), dtype=png.dtype))}
            pairs["normals"] = raw["normals"]
        for key, ours_arr in pairs.items():
            if key in fraw:
                d = _max_diff(torch.from_numpy(np.array(ours_arr)), fraw[key])
                checks.append(Check(f"{name}/raw/{key}", d, 0.0, d == 0.0))
        if "has_human_parts_flag" in expected:
            ok = bool(flags[n]) == bool(expected["has_human_parts_flag"])
            checks.append(Check(f"{name}/has_human_parts", 0.0 if ok else 1.0, 0.0, ok))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# NYUD


def _id_order(stem: str, loader_ids: list[str], fixture_ids: list[str], checks: list[Check]) -> dict[str, int]:
    """Check the loader's id order against the fixture's; each id's index in the loader."""
    detail = f"loader order {loader_ids[:5]}... vs fixture {fixture_ids[:5]}..."
    checks.append(_exact(f"{stem}/ids", loader_ids, fixture_ids, detail))
    return {i: n for n, i in enumerate(loader_ids)}


def _position(name: str, image_id: str, position: dict[str, int], checks: list[Check]) -> int | None:
    """The loader's index of ``image_id``, or None after a failed check when the loader's split lacks it."""
    if image_id not in position:
        checks.append(Check(name, float("inf"), 0.0, False, "id not in the loader's split"))
        return None
    return position[image_id]


def _exact(name: str, ours: Any, expected: Any, detail: str = "") -> Check:
    same = ours == expected
    return Check(
        name, 0.0 if same else 1.0, 0.0, same, "" if same else detail or f"ours {ours!r}, official {expected!r}"
    )


def _tensor_check(name: str, ours: torch.Tensor, expected: torch.Tensor, tol: float) -> Check:
    d = _max_diff(ours, expected)
    detail = f"shape {list(ours.shape)} vs {list(expected.shape)}" if d == float("inf") else ""
    return Check(name, d, tol, d <= tol, detail)


# Sum of |w| of OpenCV's cubic weights (a = -0.75) over the 4 taps of one axis, at its worst sub-pixel offset
# (t = 0.5): 1.375; in 2-D the product, 1.890625.
_CUBIC_ABS_WEIGHTS_2D = 1.375**2
# Roundings per output value of one cubic resize, counted generously: 16 products and 15 additions in the worst
# (non-separable) order, or 2 x (4 + 3) in a separable one with a rounded intermediate, plus the rounding of the
# coefficients themselves and of the store: at most 20 unit roundoffs of sum_i |w_i v_i|.
_CUBIC_ROUNDINGS = 20


def cubic_paths_bound(src: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Per output pixel [H, W]: how far two of OpenCV's code paths for the same cubic resize of ``src`` ([h, w, C])
    to ``out_hw`` can be apart (error model in ``normals_resize_tolerance``): 2 x ``_CUBIC_ROUNDINGS`` unit
    roundoffs of 1.890625 M, with M the largest |value| among the source pixels around the output pixel."""
    import cv2

    arr = np.ascontiguousarray(src)
    u = float(np.finfo(arr.dtype).eps) / 2
    local_max = cv2.dilate(np.abs(arr).max(axis=-1).astype(np.float32), np.ones((7, 7), np.uint8))
    m = cv2.resize(local_max, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_NEAREST).astype(np.float64)
    return 2 * _CUBIC_ROUNDINGS * u * _CUBIC_ABS_WEIGHTS_2D * m


def normals_resize_tolerance(raw: np.ndarray, size: int, resamplings_before: int = 0) -> torch.Tensor:
    """Per-pixel bound [3, S, S] on |ours - official| for a normals label resized (and renormalised) from ``raw``.

    Error model. Both sides make the same OpenCV cubic call on the same array, but OpenCV may run a float32 resize
    in Intel IPP or in its own SIMD code depending on the build and the CPU, and those paths order and round the 16
    taps differently (the NYUD fixture's values match this machine to the bit, or to one float32 ulp, depending on
    the path; with IPP switched off, at most 0.13 of this bound). One path's error on a pre-normalisation
    component is at most ``_CUBIC_ROUNDINGS`` unit roundoffs u (the dtype's, 2**-24 for float32) of
    sum |w_i v_i| <= 1.890625 M, with M the largest |component| among the source pixels around the output pixel (a
    7x7 neighbourhood taken through OpenCV's nearest mapping, which covers the 4x4 taps); two paths differ by at most
    twice that: dp (``cubic_paths_bound``). Each cubic resampling made before this one (``resamplings_before``: the
    loader's label-to-image alignment, a train zoom) adds the same term once more, passed through this resize with
    gain 1.890625. Renormalising a vector p moves a unit component by at most sqrt(3) |dp|_inf / |p| (first order),
    plus 4 u for the norm, the division and the store. Where |p| is exactly 0 both sides give the ignore value
    exactly (tolerance 0), and no bound exceeds 2 (two unit vectors differ by at most 2 per component), so an ignored
    pixel against a valid one always fails. For unit-length sources the bound is about 8e-6 (the fixture README's
    "about 1e-5 with another bicubic"); a missing renormalisation or another interpolation moves components by 1e-3
    and more."""
    import cv2

    arr = np.ascontiguousarray(raw)
    u = float(np.finfo(arr.dtype).eps) / 2
    pre = cv2.resize(arr, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    length = np.sqrt((pre**2).sum(axis=-1))
    dp = cubic_paths_bound(arr, (size, size)) * (1 + resamplings_before * _CUBIC_ABS_WEIGHTS_2D)
    with np.errstate(divide="ignore", invalid="ignore"):
        tol = np.where(length > 0, np.sqrt(3) * dp / length + 4 * u, 0.0)
    tol = np.minimum(tol, 2.0)
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(tol[None], (3, size, size))))


def _bounded_check(name: str, ours: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor) -> Check:
    """Elementwise |ours - expected| <= tol (a tensor of the same shape); reports the largest diff / bound."""
    if ours.shape != expected.shape:
        return Check(name, float("inf"), 1.0, False, f"shape {list(ours.shape)} vs {list(expected.shape)}")
    diff = (ours.to(torch.float64) - expected.to(torch.float64)).abs()
    over = diff > tol
    ratio = torch.where(tol > 0, diff / tol, torch.where(diff > 0, torch.inf, 0.0))
    worst = int(ratio.flatten().argmax())
    detail = (
        f"max |diff| {float(diff.max()):.3g}; worst diff/bound {float(ratio.flatten()[worst]):.3g} "
        f"(diff {float(diff.flatten()[worst]):.3g}, per-pixel bound {float(tol.flatten()[worst]):.3g})"
    )
    if over.any():
        detail += f"; {int(over.sum())} values over their bound " + _ipp_note()
    return Check(name, float(ratio.max()), 1.0, not bool(over.any()), detail)


def _ipp_note() -> str:
    import cv2

    state = "on" if cv2.ipp.useIPP() else "off"
    return (
        f"(OpenCV's float32 cubic resize runs in Intel IPP, {state} here; its rounding depends on the CPU code path)"
    )


def _official_shapes_and_dtypes(name: str, out: dict[str, Any], fx: dict[str, Any], keys: list[str]) -> list[Check]:
    checks = []
    for key in keys:
        shape, dtype = fx.get("official_shapes", {}).get(key), fx.get("official_dtypes", {}).get(key)
        if shape is not None:
            checks.append(_exact(f"{name}/{key}/shape", list(out[key].shape), list(shape)))
        if dtype is not None:
            checks.append(_exact(f"{name}/{key}/dtype", str(out[key].dtype).removeprefix("torch."), str(dtype)))
    return checks


def train_normals_tolerance(fx: dict[str, Any]) -> float:
    """Tolerance of the train examples' normals against the official train transforms.

    Error model: at rotation 0 the official ScaleNRotate still rewrites channels 0 and 1 through atan2, sin, cos
    and sqrt in the normals' dtype (float32 here), which moves each component by float32 rounding; this
    implementation leaves them as they are (no rotation). The fixture records that rounding as it reaches the
    output on the unzoomed, unflipped example (``train_noflip_scale1_vs_val_max_abs_diff['normals']``, 1.19e-7 on
    the public file: one float32 ulp at 1, 2**-23). Taken as the larger of that figure and 2**-23: a zoom passes
    the perturbed vectors through one more cubic interpolation, whose weights (a = -0.75) sum in absolute value to
    at most 1.375 per axis, 1.89 in 2-D, and a flip negates channel 0, so the rounding can land on either side:
    2 x 1.89 < 4 times the figure. Every other entry is exact (the same OpenCV calls on the same data)."""
    figure = float((fx.get("train_noflip_scale1_vs_val_max_abs_diff") or {}).get("normals", 0.0))
    return 4.0 * max(figure, 2.0**-23)


# the labels whose alignment the official NYUD loader prints (RESHAPE SEMSEG / RESHAPE DEPTH); normals are silent
RESHAPE_REPORTED = ("semseg", "depth")


def _stored_label_sizes(root: Path, image_id: str, tasks: list[str]) -> dict[str, list[int]]:
    """[H, W] of each task's label file as stored (before any alignment)."""
    from benchmark.nyud_data import FILES

    sizes = {}
    for t in tasks:
        path = root / FILES[t].format(id=image_id)
        if path.suffix == ".npy":
            sizes[t] = list(np.load(path, mmap_mode="r", allow_pickle=False).shape[:2])
        else:
            with Image.open(path) as img:
                sizes[t] = [img.height, img.width]
    return sizes


def nyud_parity_checks(
    fixture_path: str | os.PathLike[str], fx: dict[str, Any] | None = None, image_tol: float = IMAGE_TOL
) -> list[Check]:
    """NYUD (``nyud_dataset_*.pt`` beside a NYUD_MT folder): the loader with the val transforms (official uint8
    wrap, float64 labels) against the official one, sample by sample: the tensors (labels exact, the image within
    ``image_tol``, see ``IMAGE_TOL``), their official shapes and dtypes, the meta, the raw arrays before the
    transforms (the label-to-image alignment included), the resize warnings against the official RESHAPE messages,
    and the pixels the uint8 wrap changes; the id order; and the train examples with the official draws forced
    (normals within ``train_normals_tolerance``). Edge maps, not a task of nyud v1, are not compared."""
    from benchmark.nyud_data import NYUDMT, TASKS, LabelResizedWarning

    fixture_path = Path(fixture_path)
    fx = _load(fixture_path) if fx is None else fx
    stem = fixture_path.stem
    root = _fixture_dataset_dir(fixture_path, fx, "gt_sets")
    size = int(fx["img_size"])
    tasks = [t for t in fx.get("tasks", TASKS) if t in TASKS]
    keys = ["image", *tasks]
    checks: list[Check] = []

    def transform(train: bool, cast: str = "wrap") -> Any:
        return build_transforms(NYUD, train, uint8_cast=cast, label_dtype=torch.float64, image_size=size)

    ds = NYUDMT(root, fx["split"], tasks, transform(False), semseg_out_of_range="keep")
    clamp = transform(False, "clamp")
    position = _id_order(stem, ds.ids, list(fx["ids"]), checks)
    for image_id in fx["ids"]:
        expected = fx["samples"][image_id]
        name = f"{stem}/{image_id}"
        n = _position(name, image_id, position, checks)
        if n is None:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            raw = ds.load_raw(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same alignment again
            sample = ds[n]
        for key in keys:
            if key == "normals" and raw[key].dtype != np.float64:  # see normals_resize_tolerance
                aligned = list(raw[key].shape[:2]) != _stored_label_sizes(root, image_id, [key])[key]
                bound = normals_resize_tolerance(raw[key], size, int(aligned))
                checks.append(_bounded_check(f"{name}/{key}", sample[key], expected[key], bound))
            else:
                tol = image_tol if key == "image" else 0.0
                checks.append(_tensor_check(f"{name}/{key}", sample[key], expected[key], tol))
        checks += _official_shapes_and_dtypes(name, sample, fx, keys)
        meta = expected.get("meta", {})
        checks.append(_exact(f"{name}/meta_size", sample["meta"]["size"], list(meta.get("im_size", []))))
        checks.append(_exact(f"{name}/meta_id", sample["meta"]["id"], meta.get("image")))
        # the raw arrays the official loader held, after the alignment (stored exactly)
        fraw = expected.get("raw", {})
        pairs = {"image_uint8_hwc": "image", "semseg_hw": "semseg", "depth_hw": "depth", "normals_hwc": "normals"}
        for fkey, key in pairs.items():
            if fkey in fraw and key in raw:
                ours = torch.from_numpy(np.ascontiguousarray(raw[key]))
                if key == "normals" and raw[key].dtype != np.float64:
                    # the loader's cubic alignment of a float32 file: OpenCV's code paths (cubic_paths_bound)
                    from benchmark.nyud_data import FILES

                    stored = np.load(root / FILES[key].format(id=image_id), allow_pickle=False)
                    bound = torch.from_numpy(cubic_paths_bound(stored, raw[key].shape[:2]))[..., None]
                    checks.append(_bounded_check(f"{name}/raw/{fkey}", ours, fraw[fkey], bound.expand(ours.shape)))
                else:
                    checks.append(_tensor_check(f"{name}/raw/{fkey}", ours, fraw[fkey], 0.0))
        for key, dtype in (expected.get("raw_dtypes_in_loader") or {}).items():
            if key in ("depth", "normals") and key in raw:  # kept in the file's dtype (image, semseg: values above)
                checks.append(_exact(f"{name}/raw/{key}_dtype", str(raw[key].dtype), str(dtype)))
        # alignment: the labels stored at another size than the image were resized to it (our warnings), and the
        # official loader printed RESHAPE for exactly those of them it reports (semseg and depth; normals silently)
        resized = sorted(w.message.task for w in caught if isinstance(w.message, LabelResizedWarning))
        stored = _stored_label_sizes(root, image_id, tasks)
        want = sorted(t for t in tasks if stored[t] != list(raw["image"].shape[:2]))
        checks.append(_exact(f"{name}/aligned_labels", resized, want))
        official = sorted(m.split()[-1].lower() for m in expected.get("loader_messages", []) if "RESHAPE" in m)
        reported = sorted(t for t in want if t in RESHAPE_REPORTED)
        checks.append(
            _exact(f"{name}/reshape_messages", official, reported, f"official RESHAPE {official}, ours {want}")
        )
        # the uint8 cast: clamping instead of wrapping changes exactly the pixels the fixture marks
        mask = expected.get("image_uint8_cast_out_of_range_mask")
        if mask is not None:
            differs = clamp.apply(raw, None)["image"] != sample["image"]
            wrong = int((differs != mask.bool()).sum())
            checks.append(Check(f"{name}/uint8_wrap_pixels", float(wrong), 0.0, wrong == 0,
                                f"{int(differs.sum())} wrapped pixels vs {int(mask.sum())} in the fixture"))  # fmt: skip
    checks += _nyud_train_examples(stem, root, fx, tasks, transform(True), image_tol)
    return checks


def _nyud_train_examples(
    stem: str, root: Path, fx: dict[str, Any], tasks: list[str], transform: Any, image_tol: float
) -> list[Check]:
    from benchmark.nyud_data import NYUDMT

    examples = fx.get("train_examples") or []
    if not examples:
        return []
    normals_tol = train_normals_tolerance(fx)
    ds = NYUDMT(root, "train", tasks, None, semseg_out_of_range="keep")
    position = {i: n for n, i in enumerate(ds.ids)}
    checks = []
    for k, ex in enumerate(examples):
        name = f"{stem}/train_example_{k}_{ex['id']}"
        n = _position(name, ex["id"], position, checks)
        if n is None:
            continue
        draw = Draw(bool(ex["flip"]), float(ex["rot"]), float(ex["scale"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # alignment warnings are checked on the val samples
            raw = ds.load_raw(n)
            out = transform.apply(raw, draw)
        for key in ["image", *tasks]:
            if key == "normals":
                # the rotation rounding (train_normals_tolerance) plus the resampling paths of the zoom and the
                # resize (normals_resize_tolerance of the flipped, zoomed vectors, one warp)
                vectors = {key: raw[key]}
                vectors = scale_rotate(hflip(vectors, NYUD.tasks) if draw.flip else vectors, NYUD.tasks, draw.angle,
                                       draw.scale)  # fmt: skip
                bound = normals_tol + normals_resize_tolerance(vectors[key], int(fx["img_size"]), 1)
                checks.append(_bounded_check(f"{name}/{key}", out[key], ex[key], bound))
            else:
                tol = image_tol if key == "image" else 0.0
                checks.append(_tensor_check(f"{name}/{key}", out[key], ex[key], tol))
    return checks
