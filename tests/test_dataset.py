"""PASCAL_MT loader: parity with the official loader's fixture, task subsets, the parts-index cache, bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torch.utils.data import DataLoader

import benchmark.pascal_data as dataset_mod
from benchmark.dataset import DatasetError, DatasetNotFoundError, collate
from benchmark.parity_data import parity_checks
from benchmark.pascal_data import FILES, TASKS, PascalMT, default_cache_dir, normals_valid_context_ids
from benchmark.protocol import PASCAL_CONTEXT
from benchmark.transforms import build_transforms


def _fixture(fixture_dir: Path) -> dict:
    return torch.load(fixture_dir / "dataset_public.pt", weights_only=True)


def _tiny(fixture_dir: Path) -> Path:
    return fixture_dir / "PASCAL_MT_tiny"


def _copy(src: Path, dst: Path) -> Path:
    """A writable copy (the fixture folder is read-only)."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dst


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------------------------
# parity


def test_parity_checks_pass(fixture_dir):
    fx = _fixture(fixture_dir)
    checks = parity_checks(fixture_dir / "dataset_public.pt")
    failed = [c for c in checks if not c.passed]
    assert not failed, failed
    names = {c.name for c in checks}
    for image_id in fx["ids"]:
        for key in ("image", *TASKS):
            assert f"dataset_public/{image_id}/{key}" in names
    assert "dataset_public/normals_valid_context_ids" in names


def test_valid_context_ids_match_fixture(fixture_dir):
    assert sorted(normals_valid_context_ids()) == sorted(
        int(i) for i in _fixture(fixture_dir)["normals_valid_context_ids"]
    )


def test_wrap_matches_everywhere_and_clamp_only_off_the_marked_pixels(fixture_dir, tmp_path):
    fx = _fixture(fixture_dir)
    size = int(fx["img_size"])
    wrap = PascalMT(
        _tiny(fixture_dir),
        fx["split"],
        TASKS,
        build_transforms(PASCAL_CONTEXT, False, uint8_cast="wrap", image_size=size),
        tmp_path,
    )
    clamp = PascalMT(
        _tiny(fixture_dir), fx["split"], TASKS, build_transforms(PASCAL_CONTEXT, False, image_size=size), tmp_path
    )
    assert wrap.ids == list(fx["ids"])
    total_marked = 0
    for n, image_id in enumerate(wrap.ids):
        expected = fx["samples"][image_id]
        marked = expected["image_uint8_cast_out_of_range_mask"]
        total_marked += int(marked.sum())
        w, c = wrap[n], clamp[n]
        assert (w["image"] - expected["image"]).abs().max() <= 1e-5
        differs = (c["image"] - expected["image"]).abs() > 1e-5
        assert torch.equal(differs, marked), image_id
        assert int(marked.sum()) == int(expected["image_uint8_cast_out_of_range_count"])
        # default float32 labels: exact for the label maps, float32 rounding for the normals
        for key in ("semseg", "human_parts", "sal"):
            assert c[key].dtype == torch.float32
            assert torch.equal(c[key].double(), expected[key]), (image_id, key)
        torch.testing.assert_close(c["normals"].double(), expected["normals"], rtol=0, atol=1e-7)
        assert w["meta"] == {"id": image_id, "size": list(expected["meta"]["im_size"])}
    assert total_marked > 0  # the fixture exercises the wrap


def test_collate_and_dataloader(fixture_dir, tmp_path):
    ds = PascalMT(
        _tiny(fixture_dir), "val", ("semseg", "sal"), build_transforms(PASCAL_CONTEXT, False, image_size=32), tmp_path
    )
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert set(batch) == {"image", "semseg", "sal", "meta"}
    assert batch["image"].shape == (3, 3, 32, 32) and batch["semseg"].shape == (3, 1, 32, 32)
    assert [m["id"] for m in batch["meta"]] == ds.ids[:3]
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


# ---------------------------------------------------------------------------------------------------------------
# task subsets, cache, nothing written


def test_semseg_only_needs_no_other_label_files(fixture_dir, tmp_path):
    root = _copy(_tiny(fixture_dir), tmp_path / "ds")
    for folder in ("normals_distill", "pascal-context", "human_parts", "sal_distill"):
        shutil.rmtree(root / folder)
    ds = PascalMT(root, "val", ["semseg"], build_transforms(PASCAL_CONTEXT, False, image_size=16), tmp_path / "cache")
    assert set(ds[0]) == {"image", "semseg", "meta"}
    with pytest.raises(DatasetNotFoundError) as err:
        PascalMT(root, "val", TASKS, None, tmp_path / "cache")
    assert "human_parts" in str(err.value) and "more missing files" in str(err.value)


def test_all_tasks_fail_at_construction_on_one_missing_file(fixture_dir, tmp_path):
    root = _copy(_tiny(fixture_dir), tmp_path / "ds")
    image_id = (root / "ImageSets/Context/val.txt").read_text().split()[-1]
    missing = root / FILES["normals"].format(id=image_id)
    missing.unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        PascalMT(root, "val", TASKS, None, tmp_path / "cache")
    assert str(missing) in str(err.value) and "normals" in str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    PascalMT(root, "val", ("semseg", "human_parts", "sal"), None, tmp_path / "cache")  # the others are fine


def test_voc12_label_preferred(fixture_dir, tmp_path):
    fx = _fixture(fixture_dir)
    voc = [i for i in fx["ids"] if fx["samples"][i]["semseg_source"] == "semseg/VOC12"]
    assert voc
    ds = PascalMT(_tiny(fixture_dir), "val", ["semseg"], None, tmp_path)
    for image_id in voc:
        raw = ds.load_raw(ds.ids.index(image_id))
        voc_png = np.asarray(Image.open(_tiny(fixture_dir) / FILES["semseg_voc"].format(id=image_id)))
        assert np.array_equal(raw["semseg"], voc_png)
        assert np.array_equal(raw["semseg"], fx["samples"][image_id]["raw"]["semseg_uint8_hw"].numpy())


def test_parts_index_cached_outside_the_dataset(fixture_dir, tmp_path, monkeypatch):
    fx = _fixture(fixture_dir)
    root = _tiny(fixture_dir)
    before = _snapshot(root)
    cache = tmp_path / "cache"
    ds = PascalMT(root, "val", TASKS, None, cache)
    flags = ds.has_human_parts
    assert flags == [bool(fx["samples"][i]["has_human_parts_flag"]) for i in ds.ids]
    assert len(list((cache / "parts_index").glob("*.json"))) == 1
    assert _snapshot(root) == before  # nothing written into the dataset folder

    calls = []
    real = dataset_mod.read_part_objects
    monkeypatch.setattr(dataset_mod, "read_part_objects", lambda p: calls.append(p) or real(p))
    assert PascalMT(root, "val", TASKS, None, cache).has_human_parts == flags
    assert calls == []  # served from the cache

    # A changed parts file (new mtime/size) makes the cached index stale: it is rebuilt under a new key.
    copy = _copy(root, tmp_path / "ds")
    assert PascalMT(copy, "val", TASKS, None, cache).has_human_parts == flags
    n_calls = len(calls)
    assert n_calls == len(ds.ids)  # copies have new mtimes
    target = copy / FILES["human_parts"].format(id=ds.ids[0])
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert PascalMT(copy, "val", TASKS, None, cache).has_human_parts == flags
    assert len(calls) == 2 * n_calls
    assert len(list((cache / "parts_index").glob("*.json"))) == 3


def test_human_parts_only_drops_images_without_person(fixture_dir, tmp_path):
    fx = _fixture(fixture_dir)
    ds = PascalMT(_tiny(fixture_dir), "val", ["human_parts"], None, tmp_path)
    assert ds.ids == [i for i in fx["ids"] if fx["samples"][i]["has_human_parts_flag"]]
    full = PascalMT(_tiny(fixture_dir), "val", ["human_parts"], None, tmp_path, drop_images_without_parts=False)
    assert full.ids == list(fx["ids"])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MTPEFT_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MTPEFT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mtpeft"


def test_epoch_and_workers_reproducible(fixture_dir, tmp_path):
    ds = PascalMT(
        _tiny(fixture_dir), "val", TASKS, build_transforms(PASCAL_CONTEXT, True, seed=3, image_size=24), tmp_path
    )

    def run(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate, timeout=60 if workers else 0)
        return [b["image"] for b in loader] + [b["normals"] for b in loader]

    ds.set_epoch(0)
    e0 = run(0)
    ds.set_epoch(1)
    e1 = run(0)
    e1_workers = run(2)
    assert ds.epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(e1, e1_workers, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear DatasetError naming the file, nothing written


def _first_val_id(root: Path) -> str:
    return (root / "ImageSets/Context/val.txt").read_text().split()[0]


def _break_image(root: Path) -> Path:
    p = root / FILES["image"].format(id=_first_val_id(root))
    p.write_bytes(b"not a jpeg")
    return p


def _break_png(root: Path) -> Path:
    p = root / FILES["sal"].format(id=_first_val_id(root))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # the header parses, the pixel data is cut
    return p


def _break_mat(root: Path) -> Path:
    p = root / FILES["human_parts"].format(id=_first_val_id(root))
    p.write_bytes(b"MATLAB garbage" * 3)
    return p


def _break_anno(root: Path) -> Path:
    p = root / FILES["human_parts"].format(id=_first_val_id(root))
    scipy.io.savemat(p, {"anno": {"imname": "x", "things": np.zeros(3)}})
    return p


def _break_labelmap_key(root: Path) -> Path:
    p = root / FILES["labelmap"].format(id=_first_val_id(root))
    scipy.io.savemat(p, {"Labels": np.zeros((3, 3), np.uint16)})
    return p


def _wrong_size(root: Path) -> Path:
    p = root / FILES["sal"].format(id=_first_val_id(root))
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(p)
    return p


def _semseg_out_of_range(root: Path) -> Path:
    image_id = _first_val_id(root)
    p = root / FILES["semseg_context"].format(id=image_id)
    arr = np.array(Image.open(p))
    arr[0, 0] = 33
    Image.fromarray(arr).save(p)
    return p


def _duplicate_id(root: Path) -> Path:
    p = root / "ImageSets/Context/val.txt"
    ids = p.read_text().split()
    p.write_text("\n".join(ids + [ids[1]]) + "\n")
    return p


def _missing_split(root: Path) -> Path:
    p = root / "ImageSets/Context/val.txt"
    p.unlink()
    return p


def _missing_root(root: Path) -> Path:
    shutil.rmtree(root)
    return root


BREAKERS = {
    "corrupt_image": (_break_image, "not a readable image file; expected an RGB JPEG", False),
    "corrupt_png": (_break_png, "cannot decode", False),
    "corrupt_mat": (_break_mat, "cannot read MATLAB file", False),
    "bad_anno_structure": (_break_anno, "'anno'", False),
    "labelmap_key": (_break_labelmap_key, "LabelMap", False),
    "wrong_size_label": (_wrong_size, "expected the same size", False),
    "semseg_out_of_range": (_semseg_out_of_range, "expected 0..20 or 255", False),
    "duplicate_id": (_duplicate_id, "listed twice", True),
    "missing_split": (_missing_split, "split file not found", True),
    "missing_root": (_missing_root, "dataset folder not found", True),
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_input_gives_one_clear_error(case, fixture_dir, tmp_path):
    breaker, expected, at_construction = BREAKERS[case]
    root = _copy(_tiny(fixture_dir), tmp_path / "ds")
    if case == "semseg_out_of_range":
        # make sure the broken id takes its semseg from pascal-context
        (root / FILES["semseg_voc"].format(id=_first_val_id(root))).unlink(missing_ok=True)
    bad = breaker(root)
    before = _snapshot(root) if root.exists() else None
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as err:
        ds = PascalMT(root, "val", TASKS, build_transforms(PASCAL_CONTEXT, False, image_size=16), cache)
        assert not at_construction, "expected the error at construction"
        ds[0]
    message = str(err.value)
    assert str(bad) in message and expected in message, message
    assert "\n" not in message
    if before is not None:
        assert _snapshot(root) == before


def test_wrong_size_label_resized_on_request(fixture_dir, tmp_path):
    root = _copy(_tiny(fixture_dir), tmp_path / "ds")
    _wrong_size(root)
    ds = PascalMT(root, "val", ["sal"], None, tmp_path / "c", size_mismatch="resize")
    raw = ds.load_raw(0)
    assert raw["sal"].shape == raw["image"].shape[:2]


def test_unknown_task_and_options(fixture_dir, tmp_path):
    with pytest.raises(DatasetError, match="unknown task"):
        PascalMT(_tiny(fixture_dir), "val", ["depth"], None, tmp_path)
    with pytest.raises(DatasetError, match="size_mismatch"):
        PascalMT(_tiny(fixture_dir), "val", TASKS, None, tmp_path, size_mismatch="crop")
