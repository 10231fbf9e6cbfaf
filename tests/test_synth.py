"""Generated dataset: real layout and file structures, deterministic, fast, and learnable from the pixels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from benchmark.pascal_data import FILES, TASKS, PascalMT, check_dataset, read_split
from benchmark.protocol import PASCAL_CONTEXT
from benchmark.synth import make_synthetic_dataset
from benchmark.transforms import build_transforms


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "PASCAL_MT", 64, 16, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _structure(value) -> object:
    """Field names and leaf kinds of a loaded MATLAB value, recursively (shapes left out)."""
    arr = np.asarray(value)
    if arr.dtype.names:
        if arr.size == 0:
            return ("struct", ())
        first = arr.reshape(-1)[0]
        return ("struct", tuple((n, _structure(first[n])) for n in arr.dtype.names))
    if arr.dtype.kind == "f" and arr.size == 0:
        return "empty"
    return (arr.dtype.kind, arr.ndim)


def test_fast_complete_and_deterministic(synth, tmp_path):
    assert read_split(synth, "train").__len__() == 64 and len(read_split(synth, "val")) == 16
    assert not set(read_split(synth, "train")) & set(read_split(synth, "val"))
    report = check_dataset(synth)
    assert report.ok, report.lines()
    start = time.perf_counter()
    again = make_synthetic_dataset(tmp_path / "again", 64, 16, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"64 + 16 images took {elapsed:.1f} s"
    assert _files(again) == _files(synth)  # byte-identical for a seed (no timestamps in the .mat files)
    other = make_synthetic_dataset(tmp_path / "other", 4, 2, seed=1)
    assert _files(other) != _files(make_synthetic_dataset(tmp_path / "other0", 4, 2, seed=0))


def test_file_structures_mirror_the_fixture(synth, fixture_dir):
    tiny = fixture_dir / "PASCAL_MT_tiny"
    fx_id = (tiny / "ImageSets/Context/val.txt").read_text().split()[0]
    ref = scipy.io.loadmat(tiny / FILES["human_parts"].format(id=fx_id))["anno"]
    ids = read_split(synth, "train") + read_split(synth, "val")
    with_parts = 0
    for image_id in ids:
        anno = scipy.io.loadmat(synth / FILES["human_parts"].format(id=image_id))["anno"]
        objects = anno[0, 0]["objects"]
        for obj in objects[0]:
            parts = obj["parts"]
            if parts.size:
                with_parts += 1
                assert _structure(parts) == _structure(ref[0, 0]["objects"][0, 0]["parts"])
            else:
                assert _structure(parts) == "empty" == _structure(ref[0, 0]["objects"][0, -1]["parts"])
        assert _structure(objects[0, 0]["class_ind"]) == _structure(ref[0, 0]["objects"][0, 0]["class_ind"])
        assert _structure(objects[0, 0]["mask"]) == _structure(ref[0, 0]["objects"][0, 0]["mask"])
        assert [n for n in anno.dtype.names] == list(ref.dtype.names)
        assert list(objects.dtype.names) == list(ref[0, 0]["objects"].dtype.names)
        lm = scipy.io.loadmat(synth / FILES["labelmap"].format(id=image_id))["LabelMap"]
        ref_lm = scipy.io.loadmat(tiny / FILES["labelmap"].format(id=fx_id))["LabelMap"]
        assert lm.dtype == ref_lm.dtype and lm.ndim == 2
    assert with_parts > 10
    voc = [i for i in ids if (synth / FILES["semseg_voc"].format(id=i)).is_file()]
    context = [i for i in ids if (synth / FILES["semseg_context"].format(id=i)).is_file()]
    assert 0 < len(voc) < len(context) and len(voc) + len(context) == len(ids)


def test_loader_reads_it_with_varied_sizes(synth, tmp_path):
    ds = PascalMT(synth, "train", TASKS, None, tmp_path)
    sizes = set()
    for n in range(len(ds)):
        raw = ds.load_raw(n)
        h, w = raw["image"].shape[:2]
        sizes.add((h, w))
        assert h != w and 40 <= h <= 120 and 40 <= w <= 120
        assert set(np.unique(raw["semseg"])) <= {0, 3, 5, 7, 8, 15, 20, 255}
        assert raw["human_parts"].max() <= 6 and set(np.unique(raw["sal"])) <= {0, 1}
    assert len(sizes) > 30
    flags = ds.has_human_parts
    assert 0 < sum(flags) < len(flags)
    val = PascalMT(synth, "val", TASKS, build_transforms(PASCAL_CONTEXT, False, image_size=32), tmp_path)
    ignored_parts = sum(bool((val[n]["human_parts"] == 255).all()) for n in range(len(val)))
    assert 0 < ignored_parts < len(val)


def _quantise(images: np.ndarray) -> np.ndarray:
    q = (images // 32).astype(np.int64)  # 8 levels per channel
    return q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]


def test_labels_are_learnable_from_colour(synth, tmp_path):
    """A colour lookup table fitted on train beats the best constant prediction on val for every task."""
    size = 32
    data = {}
    for split in ("train", "val"):
        ds = PascalMT(synth, split, TASKS, build_transforms(PASCAL_CONTEXT, False, image_size=size), tmp_path)
        samples = [ds[n] for n in range(len(ds))]
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        img = torch.stack([((s["image"] * std + mean) * 255).round() for s in samples]).permute(0, 2, 3, 1)
        data[split] = {"bin": _quantise(img.numpy()).reshape(-1)}
        for key in ("semseg", "human_parts", "sal"):
            data[split][key] = torch.stack([s[key][0] for s in samples]).numpy().reshape(-1).astype(np.int64)
        data[split]["normals"] = (
            torch.stack([s["normals"] for s in samples]).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
        )
    tr, va = data["train"], data["val"]

    for key, n_cls in (("semseg", 21), ("human_parts", 7), ("sal", 2)):
        ok_tr, ok_va = tr[key] != 255, va[key] != 255
        table = np.zeros((512, n_cls))
        np.add.at(table, (tr["bin"][ok_tr], tr[key][ok_tr]), 1)
        pred = table.argmax(1)[va["bin"][ok_va]]
        acc = float((pred == va[key][ok_va]).mean())
        majority = float((va[key][ok_va] == np.bincount(tr[key][ok_tr]).argmax()).mean())
        assert acc > majority + 0.05, (key, acc, majority)

    ok_tr, ok_va = (tr["normals"] != 255).all(1), (va["normals"] != 255).all(1)
    sums = np.zeros((512, 3))
    np.add.at(sums, tr["bin"][ok_tr], tr["normals"][ok_tr])
    pred = sums[va["bin"][ok_va]]
    pred[np.linalg.norm(pred, axis=1) == 0] = tr["normals"][ok_tr].mean(0)
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    const = tr["normals"][ok_tr].mean(0) / np.linalg.norm(tr["normals"][ok_tr].mean(0))

    def angle(p: np.ndarray) -> float:
        return float(np.degrees(np.arccos(np.clip((p * va["normals"][ok_va]).sum(1), -1, 1))).mean())

    assert angle(pred) < angle(np.broadcast_to(const, pred.shape)) - 3.0


def test_refuses_existing_output(synth, tmp_path):
    before = sorted(p.name for p in synth.iterdir())
    with pytest.raises(FileExistsError, match="not an empty folder"):
        make_synthetic_dataset(synth, 2, 1, seed=0)
    assert sorted(p.name for p in synth.iterdir()) == before
    with pytest.raises(ValueError, match="at least one"):
        make_synthetic_dataset(tmp_path / "x", 0, 1)
    assert not (tmp_path / "x").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_synthetic_dataset(empty, 2, 1) == empty and (empty / "JPEGImages").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
