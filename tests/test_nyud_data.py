"""NYUDv2 data (protocol nyud): the NYUD_MT loader, its transforms, generated data, the check, and dataset parity on
the repository's copy of the official fixture (tests/fixtures/nyud_parity)."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.data_cli import main
from benchmark.dataset import DATASETS, DatasetError, check_dataset, collate, dataset_ready, open_dataset
from benchmark.nyud_data import FILES, NYUDMT, LabelResizedWarning, read_depth, read_normals, read_split
from benchmark.parity_data import (
    _bounded_check,
    normals_resize_tolerance,
    nyud_parity_checks,
    parity_checks,
    train_normals_tolerance,
)
from benchmark.protocol import NYUD, PASCAL_CONTEXT
from benchmark.safeload import safe_load
from benchmark.synth import make_synthetic_dataset
from benchmark.transforms import Draw, build_transforms, hflip

NYUD_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nyud_parity"
FIXTURE = NYUD_FIXTURES / "nyud_dataset_public.pt"
TINY = NYUD_FIXTURES / "NYUD_MT_tiny"


@pytest.fixture(scope="module")
def fx():
    return safe_load(FIXTURE, "dataset fixture")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("nyud") / "data", 6, 3, seed=1, protocol=NYUD)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


# --------------------------------------------------------------------------- loader


def test_registry_picks_the_loader_by_protocol(synth):
    assert set(DATASETS.names()) >= {"pascal_mt", "nyud_mt"}
    ds = open_dataset(NYUD, synth, "val")
    assert isinstance(ds, NYUDMT) and ds.tasks == NYUD.task_names and len(ds) == 3
    assert dataset_ready(NYUD, synth) and not dataset_ready(PASCAL_CONTEXT, synth)
    # the options every data source takes, and a subset of the tasks
    sub = open_dataset(NYUD, synth, "train", None, cache_dir=synth.parent / "cache", tasks=["normals", "depth"])
    assert sub.tasks == ("depth", "normals") and set(sub.load_raw(0)) == {"image", "depth", "normals"}
    with pytest.raises(DatasetError, match="unknown task"):
        open_dataset(NYUD, synth, "val", tasks=["sal"])


def test_loader_reads_the_official_encodings(fx):
    ds = NYUDMT(TINY, "val", semseg_out_of_range="keep")
    assert ds.ids == list(fx["ids"]) == read_split(TINY, "val")  # file order, not sorted
    n = ds.ids.index("img_0007")  # its PNG holds 255, which the official decoding turns into 254
    raw = ds.load_raw(n)
    png = np.asarray(Image.open(TINY / FILES["semseg"].format(id="img_0007")))
    assert raw["semseg"].dtype == np.float64 and raw["image"].dtype == np.float64
    assert np.array_equal(raw["semseg"], np.where(png == 0, 255.0, png - 1.0))
    assert (raw["semseg"] == 254).sum() == (png == 255).sum() > 0
    assert raw["depth"].dtype == np.float32 and raw["normals"].dtype == np.float32  # the files' dtype
    assert np.array_equal(raw["depth"], np.load(TINY / FILES["depth"].format(id="img_0007")))
    # the default refuses such a label, naming the file and what was expected
    with pytest.raises(DatasetError, match=r"segmentation/img_0007\.png: PNG values \[255\] above 40"):
        NYUDMT(TINY, "val").load_raw(n)


def test_loader_aligns_smaller_labels_with_a_warning():
    ds = NYUDMT(TINY, "val", semseg_out_of_range="keep")
    n = ds.ids.index("img_0052")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = ds.load_raw(n)
    resized = sorted(w.message.task for w in caught if issubclass(w.category, LabelResizedWarning))
    assert resized == ["depth", "normals", "semseg"]
    assert "img_0052.npy: label is 21x28 but its image is 54x72" in str(caught[1].message)
    assert all(raw[t].shape[:2] == raw["image"].shape[:2] for t in NYUD.task_names)


def test_val_and_train_samples_through_the_dataset(synth):
    val = NYUDMT(synth, "val", transform=build_transforms(NYUD, False, image_size=32))
    batch = collate([val[0], val[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["semseg"].shape == (2, 1, 32, 32)
    assert batch["depth"].shape == (2, 1, 32, 32) and batch["normals"].shape == (2, 3, 32, 32)
    assert [m["id"] for m in batch["meta"]] == val.ids[:2]
    depth, normals = batch["depth"], batch["normals"]
    assert (depth == 255).any() and (((depth > 0) & (depth < 255)) | (depth == 255)).all()
    valid = (normals != 255).all(1)
    assert ((normals == 255).all(1) | valid).all()
    torch.testing.assert_close(normals.permute(0, 2, 3, 1)[valid].norm(dim=-1), torch.ones(int(valid.sum())))
    train = NYUDMT(synth, "train", transform=build_transforms(NYUD, True, seed=3, image_size=32))
    a, b = train[2], train[2]
    assert all(torch.equal(a[k], b[k]) for k in ("image", "semseg", "depth", "normals"))
    assert train.transform.draw(0, 2).scale in NYUD.scale_choices


def test_zoom_divides_depth_and_the_draws_can_be_forced(synth):
    ds = NYUDMT(synth, "train")
    raw = ds.load_raw(0)
    tf = build_transforms(NYUD, True, uint8_cast="wrap", label_dtype=torch.float64, image_size=40)
    val = build_transforms(NYUD, False, uint8_cast="wrap", label_dtype=torch.float64, image_size=40)
    same = tf.apply(raw, Draw(False, 0.0, 1.0))
    ref = val(raw)
    for key in ("image", "semseg", "depth", "normals"):
        assert torch.equal(same[key], ref[key]), key  # scale 1 without flip: the val output
    zoomed = tf.apply(raw, Draw(False, 0.0, 1.5))
    centre = raw["depth"][raw["depth"].shape[0] // 2, raw["depth"].shape[1] // 2]
    if centre > 0:
        assert float(zoomed["depth"][0, 20, 20]) == pytest.approx(float(centre) / 1.5, rel=1e-6)
    flipped = tf.apply(raw, Draw(True, 0.0, 1.0))
    mirrored = hflip(raw, NYUD)
    assert np.array_equal(mirrored["normals"][..., 0], -raw["normals"][:, ::-1, 0])
    assert np.array_equal(mirrored["depth"], raw["depth"][:, ::-1])
    expected = val(mirrored)
    assert all(torch.equal(flipped[k], expected[k]) for k in expected)


# --------------------------------------------------------------------------- parity on the repository's copy


def test_dataset_parity_on_the_fixture_copy(fx):
    checks = parity_checks(FIXTURE)
    failed = [c for c in checks if not c.passed]
    assert not failed, failed[:5]
    names = {c.name for c in checks}
    for image_id in fx["ids"]:
        for key in ("image", "semseg", "depth", "normals"):
            assert f"nyud_dataset_public/{image_id}/{key}" in names
    assert "nyud_dataset_public/img_0052/raw/normals_hwc" in names
    assert sum("train_example" in n for n in names) == 4 * len(fx["train_examples"])
    labels = [c for c in checks if c.name.endswith(("/semseg", "/depth")) and "train" not in c.name]
    assert labels and all(c.tol == 0 for c in labels)


def test_train_normals_tolerance_follows_the_fixture_figure(fx):
    assert train_normals_tolerance(fx) == 4 * max(fx["train_noflip_scale1_vs_val_max_abs_diff"]["normals"], 2**-23)
    assert train_normals_tolerance({"train_noflip_scale1_vs_val_max_abs_diff": {"normals": 1e-6}}) == 4e-6


def test_dataset_parity_holds_on_opencvs_other_resize_path():
    """The float32 normals are compared within the rounding of OpenCV's code paths, not bit for bit: with Intel IPP
    switched off (the path another CPU or build may take) every check still holds."""
    cv2 = pytest.importorskip("cv2")
    before = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        failed = [c for c in parity_checks(FIXTURE) if not c.passed]
    finally:
        cv2.ipp.setUseIPP(before)
    assert not failed, failed[:5]


def test_normals_bound_is_rounding_sized_and_refuses_real_differences():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:20, 0:30] / 30.0
    v = np.stack([xx - 0.5, yy - 0.3, np.ones_like(xx)], axis=-1).astype(np.float32)  # a smooth surface
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    v[4:14, 4:16] = 0  # an invalid block: its inner pixels stay exactly zero after the resize
    bound = normals_resize_tolerance(v, 16)
    inner = bound[:, 6:8, 5:8]  # every cubic tap inside the block
    assert bool((inner == 0).all())  # exactly zero vectors: exact, ignore against ignore
    valid = bound[:, 12:, 12:]
    assert 1e-6 < float(valid.max()) < 2e-5  # float32 rounding of a 16-tap sum of unit vectors, renormalised
    assert float(bound.max()) <= 2.0
    official = torch.from_numpy(rng.uniform(-1, 1, size=(3, 16, 16)))
    assert _bounded_check("same", official.clone(), official, bound).passed
    shifted = official.clone()
    shifted[:, 13, 13] += 1e-4  # a renormalisation or interpolation difference is this large or larger
    assert not _bounded_check("shifted", shifted, official, bound).passed
    ignored = official.clone()
    ignored[:, 2, 2] = 255.0  # an ignored pixel where the official one is valid
    assert not _bounded_check("ignored", ignored, official, bound).passed


def test_dataset_parity_fails_on_a_changed_file(tmp_path, fx):
    root = _copy(NYUD_FIXTURES, tmp_path / "set")
    path = root / "NYUD_MT_tiny" / FILES["depth"].format(id="img_0064")
    depth = np.load(path)
    depth[10, 10] += 0.25
    np.save(path, depth)
    (root / "NYUD_MT_tiny" / "gt_sets" / "val.txt").write_text("".join(f"{i}\n" for i in sorted(fx["ids"])))
    checks = {c.name: c for c in nyud_parity_checks(root / "nyud_dataset_public.pt")}
    assert not checks["nyud_dataset_public/img_0064/depth"].passed
    assert not checks["nyud_dataset_public/ids"].passed
    assert checks["nyud_dataset_public/img_0131/depth"].passed


# --------------------------------------------------------------------------- generated data


def test_synth_is_deterministic_and_in_the_real_layout(tmp_path, synth):
    again = make_synthetic_dataset(tmp_path / "again", 6, 3, seed=1, protocol=NYUD)
    files = sorted(p.relative_to(synth) for p in synth.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((synth / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert {f.parts[0] for f in files} == {"images", "segmentation", "depth", "normals", "gt_sets"}
    assert check_dataset(NYUD, synth).ok
    with pytest.raises(FileExistsError, match="not an empty folder"):
        make_synthetic_dataset(synth, 1, 1, protocol=NYUD)


def test_synth_labels_are_learnable(synth):
    ds = NYUDMT(synth, "train")
    colours: dict[int, list] = {}
    for n in range(len(ds)):
        raw = ds.load_raw(n)
        png = np.asarray(Image.open(synth / FILES["semseg"].format(id=ds.ids[n])))
        assert png.max() <= 40 and png.dtype == np.uint8
        depth, normals = raw["depth"], raw["normals"]
        assert (depth == 0).any() and (depth > 0).mean() > 0.9  # missing pixels as 0
        norm = np.linalg.norm(normals, axis=-1)
        assert (norm == 0).any() and np.allclose(norm[norm > 0], 1.0, atol=1e-6)
        assert ((depth == 0) == (norm == 0)).all()
        for c in np.unique(raw["semseg"]):
            if c != 255:
                colours.setdefault(int(c), []).append(raw["image"][raw["semseg"] == c].mean(0))
    means = {c: np.mean(v, axis=0) for c, v in colours.items()}
    assert len(means) >= 4
    # every class has its own colour: the nearest class mean tells the class
    for c, m in means.items():
        others = min(np.abs(m - o).sum() for k, o in means.items() if k != c)
        assert others > 30, (c, m)


# --------------------------------------------------------------------------- check and bad input


def _bad(root: Path, what: str) -> Path:
    ids = read_split(root, "train")
    if what == "semseg_41":
        path = root / FILES["semseg"].format(id=ids[0])
        png = np.asarray(Image.open(path)).copy()
        png[0, 0] = 41
        Image.fromarray(png, mode="L").save(path)
    elif what == "depth_nan":
        path = root / FILES["depth"].format(id=ids[1])
        d = np.load(path)
        d[3, 3] = np.nan
        np.save(path, d)
    elif what == "depth_3d":
        path = root / FILES["depth"].format(id=ids[2])
        np.save(path, np.load(path)[..., None])
    elif what == "normals_int":
        path = root / FILES["normals"].format(id=ids[3])
        np.save(path, np.load(path).astype(np.int32))
    elif what == "normals_garbage":
        path = root / FILES["normals"].format(id=ids[4])
        path.write_bytes(b"\x93NUMPY garbage")
    elif what == "missing":
        path = root / FILES["depth"].format(id=ids[5])
        path.unlink()
    return path


def test_check_names_every_bad_file(synth, tmp_path, capsys):
    root = _copy(synth, tmp_path / "bad")
    paths = {w: _bad(root, w) for w in ("semseg_41", "depth_nan", "depth_3d", "normals_int", "normals_garbage")}
    report = check_dataset(NYUD, root)
    assert not report.ok
    found = {(p.task, p.problem): p.example for p in report.problems}
    assert (
        "PNG values [41] above 40" in found[("semseg", "range")]
        and str(paths["semseg_41"]) in found[("semseg", "range")]
    )
    assert "1 value(s) are NaN or infinite" in found[("depth", "range")]
    assert "array of float32 [" in found[("depth", "structure")] and "expected" in found[("depth", "structure")]
    assert "int32" in found[("normals", "structure")]
    assert str(paths["normals_garbage"]) in found[("normals", "unreadable")]
    assert main(["check", "--protocol", "nyud", str(root)]) == 2
    out = capsys.readouterr()
    assert "train/depth: 1 range" in out.out and "NOT USABLE" in out.err


def test_check_reports_a_missing_file_and_cli_messages(synth, tmp_path, capsys):
    root = _copy(synth, tmp_path / "bad")
    path = _bad(root, "missing")
    assert main(["check", "--protocol", "nyud", str(root)]) == 2
    out = capsys.readouterr().out
    assert "train/depth: 1 missing" in out and f"{path}: file not found" in out
    with pytest.raises(FileNotFoundError, match=r"img_\d+\.npy: file not found \(expected a \.npy float array"):
        NYUDMT(root, "train")
    assert main(["check", "--protocol", "nyud", str(root), "--tasks", "human_parts"]) == 2
    assert "unknown tasks ['human_parts']" in capsys.readouterr().err
    assert main(["check", "--protocol", "nyud2", str(root)]) == 2
    assert "--protocol 'nyud2': unknown protocol" in capsys.readouterr().err


def test_npy_files_are_never_unpickled(synth, tmp_path):
    root = _copy(synth, tmp_path / "bad")
    marker = tmp_path / "unpickled"
    path = root / FILES["depth"].format(id=read_split(root, "val")[0])
    np.save(path, np.array([_Boom(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="expected a .npy float array"):
        read_depth(path)
    report = check_dataset(NYUD, root, splits=["val"])
    assert any(p.task == "depth" for p in report.problems)
    assert not marker.exists()
    with pytest.raises(DatasetError, match=r"\[2, 2, 4\]"):
        np.save(path, np.zeros((2, 2, 4), np.float32))
        read_normals(path)


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_synth_cli_writes_the_nyud_layout(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--protocol", "nyud", str(out), "--train", "2", "--val", "1"]) == 0
    assert len(read_split(out, "train")) == 2 and main(["check", "--protocol", "nyud", str(out)]) == 0
    assert main(["synth", "--protocol", "nyud", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert pickle.loads(pickle.dumps(build_transforms(NYUD, True))).draw(0, 1) == build_transforms(NYUD, True).draw(
        0, 1
    )


def test_parity_cli_runs_the_nyud_dataset_set_by_default():
    r = subprocess.run(
        [sys.executable, "-m", "benchmark.parity", "--only", "nyud_dataset"],
        cwd=NYUD_FIXTURES.parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "== nyud_parity/nyud_dataset_public.pt (nyud_dataset)" in r.stdout
    assert "PASS  nyud_dataset_public/train_example_1_img_0903/depth" in r.stdout and " 0 failed" in r.stdout
