"""Hostile and careless dataset files and archives (issue 15, items 5 and 6, and the dataset answers):
decompression bombs, corrupted or foreign downloads, a byte-order mark, LabelMaps stored as doubles, splits that
overlap, all-zero normals."""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

# the local HTTP server of the fetch tests (127.0.0.1 only)
from test_data_cli import _copy, _tarball, _url, server  # noqa: F401

from benchmark import data_cli
from benchmark.data_cli import main, verify_archive
from benchmark.dataset import MAX_IMAGE_PIXELS, DatasetError, read_image
from benchmark.pascal_data import FILES, read_labelmap, read_split
from benchmark.synth import make_synthetic_dataset


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("small") / "PASCAL_MT", 4, 3, seed=2, size_range=(16, 28))


def _claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size: a decompression bomb costs a few bytes."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9 :]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------- decompression bombs, huge images


@pytest.mark.parametrize(("w", "h"), [(20000, 20000), (8000, 8000)], ids=["bomb", "oversized"])
def test_huge_image_is_bad_input_naming_the_file(tmp_path, w, h):
    path = tmp_path / "big.jpg"
    path.write_bytes(_claiming(_jpeg(), w, h))
    with pytest.raises(DatasetError) as e:
        read_image(path)
    assert str(path) in str(e.value) and f"above the limit of {MAX_IMAGE_PIXELS:,} pixels" in str(e.value)
    assert e.value.problem == "too_large"
    if w * h <= 2 * Image.MAX_IMAGE_PIXELS:  # below Pillow's own bomb error: our limit names the size
        assert f"{w}x{h} pixels" in str(e.value)


def test_check_reports_images_above_the_limit(small, tmp_path, capsys):
    root = _copy(small, tmp_path / "ds")
    train = read_split(root, "train")
    jpg = root / FILES["image"].format(id=train[0])
    jpg.write_bytes(_claiming(jpg.read_bytes(), 20000, 20000))
    assert main(["check", str(root)]) == 2
    out = capsys.readouterr().out
    assert re.search(rf"train/image: 1 too_large: {train[0]}", out), out
    assert f"above the limit of {MAX_IMAGE_PIXELS:,} pixels" in out


def test_run_benchmark_names_a_bomb_in_the_training_data(small, tmp_path):
    root = _copy(small, tmp_path / "ds")
    train = read_split(root, "train")
    jpg = root / FILES["image"].format(id=train[1])
    jpg.write_bytes(_claiming(jpg.read_bytes(), 20000, 20000))
    p = subprocess.run([sys.executable, "-m", "benchmark.cli", "--method", "lora", "--preset", "tiny", "--epochs", "1",
                        "--data", str(root), "--work-dir", str(tmp_path / "wd")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    code, err = p.returncode, p.stderr
    assert code == 2, err
    assert f"{jpg}: image of more pixels than Pillow allows is above the limit" in err and "Traceback" not in err
    assert not (tmp_path / "wd" / "result.json").exists()


# --------------------------------------------------------------------------- split files, LabelMaps, check


def test_split_file_with_a_byte_order_mark(small, tmp_path):
    root = _copy(small, tmp_path / "ds")
    split = root / "ImageSets/Context/val.txt"
    ids = split.read_text().split()
    split.write_bytes(b"\xef\xbb\xbf" + "\n".join(ids).encode() + b"\n")
    assert read_split(root, "val") == ids
    assert main(["check", str(root), "--split", "val"]) == 0


def test_labelmap_of_integral_doubles_is_read_and_fractions_are_refused(tmp_path):
    labels = np.array([[0, 5, 459], [2, 2, 8]])
    path = tmp_path / "lm.mat"
    scipy.io.savemat(path, {"LabelMap": labels.astype(np.float64)})
    got = read_labelmap(path)
    assert got.dtype.kind == "i" and np.array_equal(got, labels)
    scipy.io.savemat(path, {"LabelMap": np.array([[0.0, 1.5], [2.0, 3.0]])})
    with pytest.raises(DatasetError, match=r"lm\.mat: LabelMap \(float64\) holds 1 value\(s\) that are not whole"):
        read_labelmap(path)
    scipy.io.savemat(path, {"LabelMap": np.array([["a", "b"]])})
    with pytest.raises(DatasetError, match="expected a 2-D array of integer class ids"):
        read_labelmap(path)


def test_check_reports_val_ids_in_train_and_all_zero_normals(small, tmp_path, capsys):
    root = _copy(small, tmp_path / "ds")
    train = read_split(root, "train")
    val = read_split(root, "val")
    (root / "ImageSets/Context/val.txt").write_text("\n".join([*val, train[2]]) + "\n")
    normals = root / FILES["normals"].format(id=val[0])
    shape = np.asarray(Image.open(normals)).shape
    Image.fromarray(np.zeros(shape, np.uint8)).save(normals)
    assert main(["check", str(root)]) == 2
    out = capsys.readouterr().out
    assert re.search(rf"val/split: 1 also in train: {train[2]}", out), out
    assert re.search(rf"val/normals: 1 all zero: {val[0]}", out), out


# --------------------------------------------------------------------------- fetch


def _flip(data: bytes, n: int = 64) -> bytes:
    """``n`` bytes inverted in the middle of the compressed stream."""
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + n]) + data[mid + n :]


def test_fetch_refuses_a_corrupted_archive_and_never_reuses_it(small, server, tmp_path, capsys):  # noqa: F811
    good = _tarball(small)
    server.payload = _flip(good)
    dest = tmp_path / "data"
    assert main(["fetch", "--dest", str(dest), "--url", _url(server)]) == 2
    err = capsys.readouterr().err
    assert "PASCAL_MT.tgz: damaged archive" in err and "nothing was extracted" in err and "Traceback" not in err
    assert sorted(p.name for p in dest.iterdir()) == ["PASCAL_MT.tgz.rejected", "PASCAL_MT.tgz.url"]
    # the next fetch downloads again (the bad file is never reused) and succeeds with the good archive
    server.payload = good
    n = len(server.requests)
    assert main(["fetch", "--dest", str(dest), "--url", _url(server)]) == 0
    assert len(server.requests) == n + 1
    assert (dest / "PASCAL_MT" / "JPEGImages").is_dir()


def test_fetch_with_a_corrected_url_downloads_anew(small, server, tmp_path, capsys):  # noqa: F811
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "PASCAL_MT.tgz").write_bytes(b"not what the corrected URL serves")
    (dest / "PASCAL_MT.tgz.url").write_text("http://127.0.0.1:1/wrong/PASCAL_MT.tgz\n")
    server.payload = _tarball(small)
    assert main(["fetch", "--dest", str(dest), "--url", _url(server)]) == 0
    assert "set aside" in capsys.readouterr().out
    assert (dest / "PASCAL_MT.tgz").read_bytes() == server.payload
    assert (dest / "PASCAL_MT.tgz.rejected").read_bytes() == b"not what the corrected URL serves"


def test_verify_archive_catches_checksums_structure_and_bombs(small, tmp_path):
    good = _tarball(small)
    path = tmp_path / "a.tgz"
    path.write_bytes(good)
    members, total = verify_archive(path)
    files = [p for p in small.rglob("*")]
    assert members == len(files) + 1  # and the top folder
    assert total == sum(p.stat().st_size for p in files if p.is_file())
    # a gzip trailer whose CRC does not match the (intact) contents
    raw = gzip.decompress(good)
    bad_crc = gzip.compress(raw)
    bad_crc = bad_crc[:-8] + bytes(b ^ 0xFF for b in bad_crc[-8:-4]) + bad_crc[-4:]
    path.write_bytes(bad_crc)
    with pytest.raises(data_cli.FetchError, match="damaged archive"):
        verify_archive(path)
    # a damaged tar header (its checksum) inside an intact gzip stream
    headers = [i for i in range(0, len(raw), 512) if raw[i + 257 : i + 262] == b"ustar"]
    messages = set()
    for h in headers[1:]:  # every header but the first: tarfile alone stops quietly at some of these
        broken = bytearray(raw)
        broken[h : h + 8] = b"garbage!"  # a member's name: its header checksum no longer matches
        path.write_bytes(gzip.compress(bytes(broken)))
        with pytest.raises(data_cli.FetchError, match="damaged (archive|tar structure after member)") as e:
            verify_archive(path)
        messages.add("structure" if "tar structure" in str(e.value) else "archive")
    assert "structure" in messages  # the quiet stops were caught by the zero-tail rule
    # tar bombs: too many members, too many bytes
    path.write_bytes(good)
    with pytest.raises(data_cli.FetchError, match="more than 3 members"):
        verify_archive(path, max_members=3)
    with pytest.raises(data_cli.FetchError, match="contents exceed 100 bytes"):
        verify_archive(path, max_total_bytes=100)


def test_fetch_refuses_a_tar_bomb_before_extracting(server, tmp_path, capsys, monkeypatch):  # noqa: F811
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(5):
            info = tarfile.TarInfo(f"PASCAL_MT/JPEGImages/{i}.jpg")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    server.payload = buf.getvalue()
    monkeypatch.setattr(data_cli.verify_archive, "__defaults__", (4, data_cli.MAX_TOTAL_BYTES))
    dest = tmp_path / "data"
    assert main(["fetch", "--dest", str(dest), "--url", _url(server, "bomb.tgz")]) == 2
    assert "more than 4 members" in capsys.readouterr().err
    assert not (dest / "PASCAL_MT").exists()
    assert (dest / "bomb.tgz.rejected").read_bytes() == buf.getvalue()
