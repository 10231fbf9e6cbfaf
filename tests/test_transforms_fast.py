"""The optimised transforms give bitwise the same tensors as a plain reference implementation.

``_ref_*`` below is the straightforward implementation of docs/protocol.md 2.2 / 2.3 as it was before the transforms were
optimised (one OpenCV call per entry on HWC arrays, NumPy arithmetic step by step). It is the specification: every
output of ``build_transforms(...)`` and of the public step functions must equal it exactly (values, dtype, shape), for
the PASCAL-Context entries (unchanged since the transforms were written per task) and for NYUD's (depth; float32
normals; float64 semseg; a zoom from discrete choices without rotation).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from benchmark.nyud_data import NYUDMT
from benchmark.pascal_data import (
    FILES,
    HUMAN_PART_GROUPS,
    PERSON_CLASS,
    TASKS,
    PascalMT,
    _normals_valid,
    normals_valid_context_ids,
    part_categories,
    read_labelmap,
    read_normals_png,
    read_part_objects,
)
from benchmark.protocol import NYUD, PASCAL_CONTEXT
from benchmark.synth import make_synthetic_dataset
from benchmark.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    add_ignore_regions,
    build_transforms,
    cast_uint8,
    hflip,
    resize,
    scale_rotate,
    to_tensors,
)

_INTER = {
    "image": cv2.INTER_CUBIC,
    "semseg": cv2.INTER_NEAREST,
    "human_parts": cv2.INTER_NEAREST,
    "sal": cv2.INTER_NEAREST,
    "normals": cv2.INTER_CUBIC,
    "depth": cv2.INTER_NEAREST,
}
_EPS = float(np.finfo(np.float64).eps)


# --------------------------------------------------------------------------- reference (the spec)


def _ref_hflip(sample):
    out = {}
    for key in sample:
        arr = cv2.flip(sample[key], 1)
        if key == "normals":
            arr[..., 0] *= -1.0
        out[key] = arr
    return out


def _ref_scale_rotate(sample, angle, scale):
    out = {}
    for key in sample:
        arr = sample[key]
        h, w = arr.shape[:2]
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        if key == "normals" and angle != 0:  # no rotation: the vectors are left as they are
            arr = arr.copy()
            a = np.deg2rad(angle)
            x, y = arr[..., 0].copy(), arr[..., 1].copy()
            arr[..., 0] = x * np.cos(a) + y * np.sin(a)
            arr[..., 1] = y * np.cos(a) - x * np.sin(a)
        out[key] = cv2.warpAffine(arr, matrix, (w, h), flags=_INTER[key])
        if key == "depth":
            out[key] = out[key] / scale
    return out


def _ref_resize(sample, size):
    out = {}
    for key in sample:
        arr = sample[key]
        arr = cv2.resize(arr, (size, size), interpolation=_INTER[key])  # one call on all channels, as officially
        if key == "normals":
            # the norm in the vectors' dtype, the epsilon and the division in float64, the quotient in their dtype
            norm = np.sqrt(arr[..., 0] ** 2 + arr[..., 1] ** 2 + arr[..., 2] ** 2).astype(np.float64) + _EPS
            arr = (arr / norm[..., None]).astype(arr.dtype)
        out[key] = arr
    return out


def _ref_add_ignore_regions(sample):
    out = dict(sample)
    if "normals" in out:
        arr = out["normals"].copy()
        zero = np.sqrt(arr[..., 0] ** 2 + arr[..., 1] ** 2 + arr[..., 2] ** 2) == 0
        arr[zero] = 255
        out["normals"] = arr
    if "human_parts" in out and not out["human_parts"].any():
        out["human_parts"] = np.full_like(out["human_parts"], 255)
    if "depth" in out:
        arr = out["depth"].copy()
        arr[arr == 0] = 255
        out["depth"] = arr
    return out


def _ref_cast_uint8(image, mode):
    if mode == "wrap":
        return (np.trunc(image).astype(np.int64) & 0xFF).astype(np.uint8)
    return np.trunc(np.clip(image, 0.0, 255.0)).astype(np.uint8)


def _ref_to_tensors(sample, uint8_cast, label_dtype):
    out = {}
    for key, arr in sample.items():
        if key == "image":
            img = torch.from_numpy(_ref_cast_uint8(arr, uint8_cast).transpose(2, 0, 1).copy()).to(torch.float32) / 255
            m = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
            s = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
            out[key] = (img - m) / s
        else:
            arr = arr[..., None] if arr.ndim == 2 else arr
            out[key] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(label_dtype)
    return out


def _reference(sample, size, train, draw, uint8_cast, label_dtype):
    if train:
        flip, angle, scale = draw
        if flip:
            sample = _ref_hflip(sample)
        sample = _ref_scale_rotate(sample, angle, scale)
    sample = _ref_add_ignore_regions(_ref_resize(sample, size))
    return _ref_to_tensors(sample, uint8_cast, label_dtype)


# --------------------------------------------------------------------------- samples


def _unit_normals(rng, h, w):
    n = rng.normal(size=(h, w, 3))
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _handmade(h, w, seed, *, wild_image=False, zero_parts=False, zero_normals=False, tiny_normals=False):
    """A sample with the raw dtypes of ``load_raw``; options add the edge cases the fast path must keep."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
    image[: h // 3, : w // 3] = 0.0  # flat dark block next to bright noise: cubic overshoot below 0 and above 255
    image[h // 3 : h // 2, : w // 2] = 255.0
    if wild_image:  # beyond 0..255: the uint8 cast clamps or wraps
        image += rng.uniform(-600.0, 900.0, (h, w, 3))
        image[0, :3] = (-1.0, -0.5, 256.0)
    normals = _unit_normals(rng, h, w) * rng.uniform(0.5, 1.5, (h, w, 1))
    normals[: max(1, h // 4)] = 0.0  # invalid band
    if tiny_normals:  # so small that squares underflow: the ignore test is on the renormalised vectors
        normals[h // 2 :, : w // 3] *= 1e-170
        normals[-1, -1] = (5e-324, 0.0, 0.0)
    if zero_normals:
        normals[:] = 0.0
    parts = np.zeros((h, w), np.uint8)
    if not zero_parts:
        parts[h // 2 :, w // 4 : w // 2] = rng.integers(1, 7, (h - h // 2, w // 2 - w // 4))
    return {
        "image": image,
        "semseg": np.where(rng.random((h, w)) < 0.05, 255, rng.integers(0, 21, (h, w))).astype(np.uint8),
        "human_parts": parts,
        "sal": rng.integers(0, 2, (h, w)).astype(np.uint8),
        "normals": normals,
    }


def _all_values_image(h, w):
    """An image in which every channel takes each of the 256 values (the whole normalisation table is used)."""
    sample = _handmade(h, w, 7)
    flat = sample["image"].reshape(-1, 3)
    flat[:256] = np.arange(256, dtype=np.float64)[:, None]
    return sample


HANDMADE = {
    "odd": lambda: _handmade(37, 53, 1),
    "tall_odd": lambda: _handmade(71, 29, 2, tiny_normals=True),
    "wild_image": lambda: _handmade(45, 61, 3, wild_image=True),
    "zero_parts": lambda: _handmade(50, 66, 4, zero_parts=True),
    "zero_normals": lambda: _handmade(33, 47, 5, zero_normals=True),
    "all_values": lambda: _all_values_image(40, 80),
    "subset": lambda: {k: v for k, v in _handmade(41, 59, 6).items() if k in ("image", "sal", "normals")},
    "labels_only": lambda: {k: v for k, v in _handmade(41, 59, 8).items() if k in ("semseg", "human_parts")},
}

# (epoch, index) pairs; test_pairs_cover_flip_and_no_flip checks that they include flips and no flips
PAIRS = [(0, 0), (0, 1), (0, 5), (1, 3), (2, 11), (7, 2)]


def _assert_same(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    assert list(out) == list(ref), what
    for key in ref:
        a, b = out[key], ref[key]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}/{key}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        assert torch.equal(a, b), f"{what}/{key}: max diff {(a.double() - b.double()).abs().max()}"
        assert a.is_contiguous(), f"{what}/{key}: not contiguous"
        # bit for bit, the signs of zeros included
        assert torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8)), f"{what}/{key}: bits differ"


def _check(sample, size, train, uint8_cast, label_dtype, pairs, what, protocol=PASCAL_CONTEXT):
    tf = build_transforms(protocol, train, seed=3, uint8_cast=uint8_cast, label_dtype=label_dtype, image_size=size)
    for epoch, index in pairs if train else [(0, 0)]:
        snapshot = {k: v.copy() for k, v in sample.items()}
        out = tf(sample, epoch=epoch, index=index)
        for k in sample:  # the input is not modified
            assert np.array_equal(sample[k], snapshot[k], equal_nan=True), f"{what}: input {k} modified"
        ref = _reference(snapshot, size, train, tf.draw(epoch, index), uint8_cast, label_dtype)
        _assert_same(out, ref, f"{what} train={train} {uint8_cast} {label_dtype} e{epoch} i{index}")


@pytest.mark.parametrize("protocol", [PASCAL_CONTEXT, NYUD], ids=lambda p: p.name)
def test_pairs_cover_flip_and_no_flip(protocol):
    tf = build_transforms(protocol, train=True, seed=3, image_size=8)
    flips = {tf.draw(e, i)[0] for e, i in PAIRS}
    assert flips == {True, False}


@pytest.mark.parametrize("name", sorted(HANDMADE))
@pytest.mark.parametrize("train", [True, False])
def test_handmade_samples_match_reference(name, train):
    sample = HANDMADE[name]()
    for uint8_cast in ("clamp", "wrap"):
        for label_dtype in (torch.float32, torch.float64):
            _check(sample, 64, train, uint8_cast, label_dtype, PAIRS[:3], name)
    _check(sample, 75, train, "wrap", torch.float64, PAIRS[3:], f"{name}@75")


def test_every_uint8_value_normalised_like_reference():
    """The normalisation lookup table against the per-pixel float32 torch arithmetic, for all 256 values."""
    rng = np.random.default_rng(11)
    image = np.stack([rng.permutation(256).reshape(16, 16) for _ in range(3)], axis=-1).astype(np.float64)
    for uint8_cast in ("clamp", "wrap"):
        _assert_same(to_tensors({"image": image}, uint8_cast), _ref_to_tensors({"image": image}, uint8_cast, None), "")
        # a same-size resize copies the image, so every value also reaches the transform's lookup
        _check({"image": image}, 16, False, uint8_cast, torch.float32, [], f"values {uint8_cast}")


def test_synthetic_dataset_matches_reference(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n_train=6, n_val=1, seed=2, size_range=(64, 96))
    ds = PascalMT(root, "train", TASKS, None, tmp_path / "cache")
    for n in range(len(ds)):
        raw = ds.load_raw(n)
        for uint8_cast in ("clamp", "wrap"):
            for label_dtype in (torch.float32, torch.float64):
                pairs = PAIRS[n % 3 :: 3] + [(n, n)]
                _check(raw, 72, True, uint8_cast, label_dtype, pairs, f"synth{n}")
                _check(raw, 72, False, uint8_cast, label_dtype, pairs, f"synth{n}")


def test_full_size_matches_reference(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n_train=1, n_val=1, seed=4, size_range=(375, 500))
    raw = PascalMT(root, "train", TASKS, None, tmp_path / "cache").load_raw(0)
    _check(raw, 448, True, "clamp", torch.float32, [(0, 0), (0, 1)], "448")
    _check(raw, 448, False, "wrap", torch.float64, [(0, 0)], "448")


@pytest.mark.parametrize("flip", [True, False])
def test_step_functions_match_reference(flip):
    """The public per-step functions (used on their own by other code and tests) keep their exact results."""
    sample = _handmade(39, 57, 9, tiny_normals=True, wild_image=True)
    snapshot = {k: v.copy() for k, v in sample.items()}
    steps = [
        (lambda s: hflip(s, PASCAL_CONTEXT) if flip else s, lambda s: _ref_hflip(s) if flip else s),
        (lambda s: scale_rotate(s, PASCAL_CONTEXT, -13.7, 1.19), lambda s: _ref_scale_rotate(s, -13.7, 1.19)),
        (lambda s: resize(s, PASCAL_CONTEXT, 50), lambda s: _ref_resize(s, 50)),
        (lambda s: add_ignore_regions(s, PASCAL_CONTEXT), _ref_add_ignore_regions),
    ]
    ours, ref = sample, snapshot
    for fast, slow in steps:
        ours, ref = fast(ours), slow(ref)
        assert list(ours) == list(ref)
        for key in ref:
            assert ours[key].dtype == ref[key].dtype and ours[key].shape == ref[key].shape, key
            assert np.array_equal(ours[key], ref[key]), key
    for key in sample:
        assert np.array_equal(sample[key], snapshot[key]), f"input {key} modified"
    for mode in ("clamp", "wrap"):
        assert np.array_equal(cast_uint8(ours["image"], mode), _ref_cast_uint8(ref["image"], mode))
        for label_dtype in (torch.float32, torch.float64):
            _assert_same(to_tensors(ours, mode, label_dtype), _ref_to_tensors(ref, mode, label_dtype), mode)


# --------------------------------------------------------------------------- NYUD entries (depth kind, float32 files)


def _nyud_handmade(h, w, seed, *, wild_image=False):
    """A sample with the raw dtypes of ``NYUDMT.load_raw``: float64 semseg (0..39, 254, 255), float32 depth with
    missing pixels (0) in a block and scattered, float32 normals of non-unit length with a zero block and isolated
    zero vectors."""
    rng = np.random.default_rng(seed)
    sample = _handmade(h, w, seed, wild_image=wild_image)
    semseg = np.where(rng.random((h, w)) < 0.05, 255.0, rng.integers(0, 40, (h, w)).astype(np.float64))
    semseg[: h // 5, : w // 5] = 254.0
    depth = rng.uniform(0.5, 9.0, (h, w)).astype(np.float32)
    depth[h // 3 : h // 2, w // 3 : w // 2] = 0.0
    depth[rng.random((h, w)) < 0.03] = 0.0
    normals = (_unit_normals(rng, h, w) * rng.uniform(0.25, 3.0, (h, w, 1))).astype(np.float32)
    normals[h // 2 :, : w // 4] = 0.0
    normals[rng.random((h, w)) < 0.02] = 0.0
    return {"image": sample["image"], "semseg": semseg, "depth": depth, "normals": normals}


NYUD_HANDMADE = {
    "odd": lambda: _nyud_handmade(37, 53, 21),
    "tall": lambda: _nyud_handmade(71, 29, 22),
    "wild_image": lambda: _nyud_handmade(45, 61, 23, wild_image=True),
    "depth_only": lambda: {k: v for k, v in _nyud_handmade(41, 59, 24).items() if k in ("image", "depth")},
}


def test_nyud_draws_are_the_protocols():
    """Zooms from the discrete choices with equal odds, never a rotation; the flip with the protocol's odds."""
    tf = build_transforms(NYUD, train=True, seed=3, image_size=8)
    draws = [tf.draw(e, i) for e in range(30) for i in range(30)]
    assert {d.angle for d in draws} == {0.0}
    scales = [d.scale for d in draws]
    assert set(scales) == set(NYUD.scale_choices)
    for choice in NYUD.scale_choices:  # 900 draws: each choice 300 +- 4.4 sigma
        assert abs(scales.count(choice) - len(scales) / 3) < 4.4 * (len(scales) * 2 / 9) ** 0.5
    assert 0.4 < np.mean([d.flip for d in draws]) < 0.6


@pytest.mark.parametrize("name", sorted(NYUD_HANDMADE))
@pytest.mark.parametrize("train", [True, False])
def test_nyud_handmade_samples_match_reference(name, train):
    sample = NYUD_HANDMADE[name]()
    for uint8_cast in ("clamp", "wrap"):
        for label_dtype in (torch.float32, torch.float64):
            _check(sample, 64, train, uint8_cast, label_dtype, PAIRS[:3], name, NYUD)
    _check(sample, 75, train, "wrap", torch.float64, PAIRS[3:], f"{name}@75", NYUD)


def test_nyud_synthetic_dataset_matches_reference(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n_train=4, n_val=1, seed=2, size_range=(48, 90), protocol=NYUD)
    ds = NYUDMT(root, "train")
    for n in range(len(ds)):
        raw = ds.load_raw(n)
        assert raw["depth"].dtype == raw["normals"].dtype == np.float32 and raw["semseg"].dtype == np.float64
        for train in (True, False):
            _check(raw, 72, train, "wrap", torch.float64, PAIRS[n % 3 :: 3] + [(n, n)], f"nyud{n}", NYUD)


def test_nyud_step_functions_match_reference():
    sample = _nyud_handmade(39, 57, 25, wild_image=True)
    ours, ref = sample, {k: v.copy() for k, v in sample.items()}
    steps = [
        (lambda s: hflip(s, NYUD), _ref_hflip),
        (lambda s: scale_rotate(s, NYUD, 0.0, 1.5), lambda s: _ref_scale_rotate(s, 0.0, 1.5)),
        (lambda s: resize(s, NYUD, 50), lambda s: _ref_resize(s, 50)),
        (lambda s: add_ignore_regions(s, NYUD), _ref_add_ignore_regions),
    ]
    for fast, slow in steps:
        ours, ref = fast(ours), slow(ref)
        for key in ref:
            assert ours[key].dtype == ref[key].dtype and ours[key].shape == ref[key].shape, key
            assert np.array_equal(ours[key], ref[key]), key
    # the zoom divided the depth (0 stays 0, then ignored), the flip negated the normals' x
    assert (ours["depth"] == 255).any() and (ours["normals"] == 255).all(-1).any()
    for label_dtype in (torch.float32, torch.float64):
        _assert_same(to_tensors(ours, "wrap", label_dtype), _ref_to_tensors(ref, "wrap", label_dtype), "nyud")


# --------------------------------------------------------------------------- loading (PascalMT.load_raw)


def _ref_normals(root, image_id):
    png = read_normals_png(root / FILES["normals"].format(id=image_id))
    labelmap = read_labelmap(root / FILES["labelmap"].format(id=image_id))
    valid = np.isin(labelmap, np.fromiter(normals_valid_context_ids(), dtype=np.int64))
    return np.where(valid[..., None], 2.0 * png.astype(np.float64) / 255.0 - 1.0, 0.0)


def _ref_human_parts(root, image_id, shape):
    objects = read_part_objects(root / FILES["human_parts"].format(id=image_id))
    if PERSON_CLASS not in part_categories(objects):
        return np.zeros(shape, np.uint8)
    target = None
    for obj in objects:
        if obj.class_ind != PERSON_CLASS or not obj.parts:
            continue
        if target is None:
            target = np.zeros(obj.mask.shape, np.uint8)
        for name, mask in obj.parts:
            target[mask.astype(bool)] = HUMAN_PART_GROUPS.get(name, 0)
    return np.zeros(shape, np.uint8) if target is None else target


def _check_load_raw(root, split, cache):
    ds = PascalMT(root, split, TASKS, None, cache, size_mismatch="resize")
    for n, image_id in enumerate(ds.ids):
        raw = ds.load_raw(n)
        shape = raw["image"].shape[:2]
        expected = {"normals": _ref_normals(root, image_id), "human_parts": _ref_human_parts(root, image_id, shape)}
        for key, ref in expected.items():
            if ref.shape[:2] != shape:  # the fixture's deliberately mismatched files: compare before the resize
                continue
            assert raw[key].dtype == ref.dtype and raw[key].shape == ref.shape, (image_id, key)
            # bit for bit (the signs of zeros included)
            assert np.ascontiguousarray(raw[key]).tobytes() == np.ascontiguousarray(ref).tobytes(), (image_id, key)


def test_load_raw_matches_reference_synthetic(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", n_train=8, n_val=1, seed=5, size_range=(40, 90))
    _check_load_raw(root, "train", tmp_path / "cache")


def test_load_raw_matches_reference_fixture(fixture_dir, tmp_path):
    roots = sorted(p for p in fixture_dir.iterdir() if (p / "JPEGImages").is_dir())
    assert roots
    for root in roots:
        for split in ("train", "val"):
            if (root / "ImageSets" / "Context" / f"{split}.txt").is_file():
                _check_load_raw(root, split, tmp_path / "cache")


def test_normals_valid_lookup_equals_isin():
    ids = np.fromiter(normals_valid_context_ids(), dtype=np.int64)
    rng = np.random.default_rng(0)
    every = np.arange(int(ids.max()) + 1)  # every id up to the largest valid one: the table path
    cases = [
        every.astype(np.uint16).reshape(1, -1),
        rng.permutation(every).astype(np.int32).reshape(1, -1),
        rng.integers(0, int(ids.max()) + 1, (30, 40)).astype(np.uint16),
        rng.integers(0, 460, (30, 40)).astype(np.uint16),
        np.array([[0, 1, 5000, 65535]], np.uint16),  # beyond the table
        np.array([[-3, 0, int(ids[0]), 7]], np.int64),  # negative
        np.zeros((0, 4), np.uint16),
        np.full((3, 3), int(ids.max()), np.uint8 if ids.max() < 256 else np.uint16),
    ]
    for labelmap in cases:
        got = _normals_valid(labelmap)
        assert got.dtype == bool and np.array_equal(got, np.isin(labelmap, ids)), labelmap
