"""``benchmark-data`` synth / check / fetch. fetch runs against a local HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.data_cli import main
from benchmark.pascal_data import FILES
from benchmark.synth import make_synthetic_dataset


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("small") / "PASCAL_MT", 4, 3, seed=2, size_range=(16, 28))


def _copy(src: Path, dst: Path) -> Path:
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------------------------
# synth / check


def test_synth_cli(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["synth", "--out", str(out), "--train", "3", "--val", "2", "--seed", "4"]) == 0
    assert len((out / "ImageSets/Context/train.txt").read_text().split()) == 3
    assert main(["check", str(out)]) == 0
    assert "OK: usable" in capsys.readouterr().out
    assert main(["synth", "--out", str(out), "--train", "3", "--val", "2"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not an empty folder" in err and "Traceback" not in err


def test_check_reports_problems_per_split_and_task(small, tmp_path, capsys):
    root = _copy(small, tmp_path / "ds")
    val = (root / "ImageSets/Context/val.txt").read_text().split()
    train = (root / "ImageSets/Context/train.txt").read_text().split()
    (root / FILES["normals"].format(id=val[0])).unlink()
    (root / FILES["normals"].format(id=val[1])).unlink()
    (root / FILES["sal"].format(id=train[0])).write_bytes(b"\x89PNG broken")
    img = np.asarray(Image.open(root / FILES["image"].format(id=train[1])))
    Image.fromarray(np.zeros((img.shape[0] + 3, img.shape[1]), np.uint8)).save(root / FILES["sal"].format(id=train[1]))
    semseg = root / FILES["semseg_voc"].format(id=val[2])
    semseg = semseg if semseg.is_file() else root / FILES["semseg_context"].format(id=val[2])
    arr = np.array(Image.open(semseg))
    arr[0, 0] = 40
    Image.fromarray(arr).save(semseg)

    assert main(["check", str(root)]) == 2
    captured = capsys.readouterr()
    out = captured.out
    assert re.search(rf"val/normals: 2 missing: {val[0]}, {val[1]}", out), out
    assert re.search(rf"train/sal: 1 unreadable: {train[0]}", out), out
    assert re.search(rf"train/sal: 1 size: {train[1]}", out), out
    assert re.search(rf"val/semseg: 1 range: {val[2]}", out), out
    assert "NOT USABLE" in captured.err
    # restricted to what is intact, the folder is usable
    assert main(["check", str(root), "--tasks", "human_parts", "--split", "val"]) == 0
    assert main(["check", str(root), "--tasks", "semseg,human_parts", "--split", "train"]) == 0


def test_check_bad_arguments(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    assert main(["check", str(tmp_path), "--tasks", "depth"]) == 2
    assert "unknown tasks ['depth']" in capsys.readouterr().err
    (tmp_path / "ImageSets/Context").mkdir(parents=True)
    assert main(["check", str(tmp_path)]) == 2
    assert "split file not found" in capsys.readouterr().out


def test_console_script_exit_code_and_message(tmp_path):
    exe = Path(sys.executable).with_name("benchmark-data")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "benchmark.data_cli"]
    proc = subprocess.run([*cmd, "check", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "dataset folder not found" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# fetch against 127.0.0.1


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        server = self.server
        server.requests.append(self.headers.get("Range"))
        if self.path.endswith("/missing.tgz"):
            self.send_error(404)
            return
        data = server.payload
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.cuts:  # send part of the body, then drop the connection
            body = body[: server.cuts.pop(0)]
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    srv.payload, srv.cuts, srv.requests = b"", [], []
    srv.timeout = 5
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stopper = threading.Timer(60.0, srv.shutdown)  # bounded even if a test hangs
    stopper.daemon = True
    stopper.start()
    try:
        yield srv
    finally:
        stopper.cancel()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _tarball(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root, arcname="PASCAL_MT")
    return buf.getvalue()


def _url(server: HTTPServer, name: str = "PASCAL_MT.tgz") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/share/{name}"


def test_fetch_verifies_extracts_and_checks(small, server, tmp_path, capsys):
    server.payload = _tarball(small)
    digest = hashlib.sha256(server.payload).hexdigest()
    dest = tmp_path / "data"
    assert main(["fetch", "--dest", str(dest), "--url", _url(server), "--sha256", digest]) == 0
    out = capsys.readouterr().out
    assert "OK: usable" in out
    assert (dest / "PASCAL_MT.tgz").read_bytes() == server.payload
    assert sorted(p.name for p in dest.iterdir()) == ["PASCAL_MT", "PASCAL_MT.tgz", "PASCAL_MT.tgz.url"]
    extracted = {str(p.relative_to(dest / "PASCAL_MT")) for p in (dest / "PASCAL_MT").rglob("*")}
    assert extracted == {str(p.relative_to(small)) for p in small.rglob("*")}
    # running it again downloads nothing and keeps the extraction
    n = len(server.requests)
    assert main(["fetch", "--dest", str(dest), "--url", _url(server), "--sha256", digest]) == 0
    assert len(server.requests) == n and "already extracted" in capsys.readouterr().out


def test_fetch_resumes_a_truncated_download(small, server, tmp_path, capsys):
    server.payload = _tarball(small)
    half = len(server.payload) // 2
    server.cuts = [half]
    dest = tmp_path / "data"
    digest = hashlib.sha256(server.payload).hexdigest()
    assert main(["fetch", "--dest", str(dest), "--url", _url(server), "--sha256", digest]) == 2
    err = capsys.readouterr().err
    assert f"interrupted after {half} of {len(server.payload)} bytes" in err and "resume" in err
    assert (dest / "PASCAL_MT.tgz.part").stat().st_size == half
    assert not (dest / "PASCAL_MT").exists() and not (dest / "PASCAL_MT.tgz").exists()
    assert main(["fetch", "--dest", str(dest), "--url", _url(server), "--sha256", digest]) == 0
    assert server.requests == [None, f"bytes={half}-"]
    assert (dest / "PASCAL_MT.tgz").read_bytes() == server.payload
    assert not (dest / "PASCAL_MT.tgz.part").exists()
    assert (dest / "PASCAL_MT" / "JPEGImages").is_dir()


def test_fetch_complete_part_file(small, server, tmp_path):
    server.payload = _tarball(small)
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "PASCAL_MT.tgz.part").write_bytes(server.payload)  # interrupted just before the rename
    assert main(["fetch", "--dest", str(dest), "--url", _url(server)]) == 0
    assert server.requests == [f"bytes={len(server.payload)}-"]


def test_fetch_wrong_checksum_extracts_nothing(small, server, tmp_path, capsys):
    server.payload = _tarball(small)
    dest = tmp_path / "data"
    assert main(["fetch", "--dest", str(dest), "--url", _url(server), "--sha256", "0" * 64]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "nothing was extracted" in err and "Traceback" not in err
    # the download is set aside, never reused: the next fetch downloads again
    assert sorted(p.name for p in dest.iterdir()) == ["PASCAL_MT.tgz.rejected", "PASCAL_MT.tgz.url"]
    assert main(["fetch", "--dest", str(dest), "--url", _url(server), "--sha256", "xyz"]) == 2
    assert "64 hexadecimal digits" in capsys.readouterr().err


def test_fetch_refuses_paths_outside_dest(server, tmp_path, capsys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("PASCAL_MT/JPEGImages/a.jpg", "../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    server.payload = buf.getvalue()
    dest = tmp_path / "sub" / "data"
    assert main(["fetch", "--dest", str(dest), "--url", _url(server, "evil.tgz")]) == 2
    assert "outside the destination" in capsys.readouterr().err
    assert not (tmp_path / "sub" / "evil.txt").exists() and not (dest / "PASCAL_MT").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["evil.tgz", "evil.tgz.url"]


def test_fetch_http_error(server, tmp_path, capsys):
    server.payload = b"x"
    assert main(["fetch", "--dest", str(tmp_path / "d"), "--url", _url(server, "missing.tgz")]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "missing.tgz" in err
    assert list((tmp_path / "d").iterdir()) == []
    assert main(["fetch", "--dest", str(tmp_path / "d"), "--url", "ftp://127.0.0.1/x.tgz"]) == 2
    assert "expected an http(s) URL" in capsys.readouterr().err
