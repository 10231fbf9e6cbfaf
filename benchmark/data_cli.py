"""``benchmark-data``: generate, check and fetch a protocol's multi-task data (default protocol pascal-context).

    benchmark-data synth [--protocol P] DIR [--train N] [--val M] [--seed S]  # small generated dataset, real layout
    benchmark-data check [--protocol P] DIR [--tasks semseg,normals] [--split val]  # exit 0 only if usable
    benchmark-data fetch --dest DIR [--url URL] [--sha256 HEX]        # PASCAL_MT: download (resumable), verify, check

``synth`` also takes the folder as ``--out DIR``. Errors print one line on stderr and exit 2 (bad arguments, a
folder or file that cannot be used, a failed download); nothing half-written is left behind (a download keeps only
its ``.part`` file, so the next ``fetch`` resumes it).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from benchmark.dataset import SPLITS, DatasetError, check_dataset
from benchmark.protocol import PASCAL_CONTEXT, PROTOCOLS, Protocol, get_protocol

DEFAULT_URL = "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz"  # docs/protocol.md 1
_CHUNK = 1 << 20


class FetchError(DatasetError):
    """A download, checksum or archive problem; the message says what to do next."""


# ---------------------------------------------------------------------------------------------------------------
# fetch


def _archive_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return name if re.fullmatch(r"[A-Za-z0-9._-]+", name or "") else "dataset.tar"


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a 'bytes a-b/total' or 'bytes */total' header."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return first, total


def download(url: str, target: Path, log: Callable[[str], None] = print, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target``, resuming ``target.part`` with an HTTP Range request when it exists."""
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            _, total = _content_range(e.headers.get("Content-Range"))
            if total == offset:  # the .part file already holds everything
                os.replace(part, target)
                return target
            raise FetchError(
                f"{part}: server refused to resume at byte {offset} (HTTP 416); delete it and retry"
            ) from e
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}; expected the dataset archive") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise FetchError(f"{url}: cannot connect ({e}); check the URL and the network") from e
    with resp:
        status = resp.status
        if status == 206:
            first, total = _content_range(resp.headers.get("Content-Range"))
            if first != offset:
                raise FetchError(f"{url}: server resumed at byte {first}, expected {offset}; delete {part} and retry")
            mode = "ab"
        elif status == 200:
            if offset:
                log(f"server does not support resuming; downloading {target.name} from the start")
            offset, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise FetchError(f"{url}: unexpected HTTP status {status}; expected 200 or 206")
        if offset:
            log(f"resuming {target.name} at {offset} bytes")
        received = offset
        next_report = received + max((total or 0) // 10, 50 * _CHUNK)
        with open(part, mode) as f:
            try:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    if received >= next_report:
                        log(f"  {received / 2**20:.0f} MiB" + (f" of {total / 2**20:.0f} MiB" if total else ""))
                        next_report = received + max((total or 0) // 10, 50 * _CHUNK)
            except (OSError, http.client.HTTPException) as e:
                f.flush()
                raise FetchError(
                    f"{url}: download interrupted after {received} bytes ({e}); run the same command to resume "
                    f"(partial file kept: {part})"
                ) from e
    if total is not None and received != total:
        raise FetchError(
            f"{url}: download interrupted after {received} of {total} bytes; run the same command to resume "
            f"(partial file kept: {part})"
        )
    os.replace(part, target)
    return target


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# Limits against tar bombs: PASCAL_MT.tgz holds about 60,000 files and 6 GB; these leave ample room.
MAX_MEMBERS = 1_000_000
MAX_TOTAL_BYTES = 64 * 2**30


def _open_decompressed(archive: Path) -> Any:
    """The archive's decompressed stream (gzip, bzip2, xz or none, told by its first bytes)."""
    import bz2
    import gzip
    import lzma

    with open(archive, "rb") as f:
        head = f.read(6)
    if head[:2] == b"\x1f\x8b":
        return gzip.open(archive, "rb")
    if head[:3] == b"BZh":
        return bz2.open(archive, "rb")
    if head == b"\xfd7zXZ\x00":
        return lzma.open(archive, "rb")
    return open(archive, "rb")


def verify_archive(
    archive: Path, max_members: int = MAX_MEMBERS, max_total_bytes: int = MAX_TOTAL_BYTES
) -> tuple[int, int]:
    """Read the whole archive once before anything is extracted: every compressed byte to the end of the stream
    (so the gzip / bzip2 / xz checksums are verified), every tar header (their checksums), within
    ``max_members`` members and ``max_total_bytes`` of contents; after the last member only the zero blocks that
    end a tar may follow (tarfile stops quietly at a damaged header: the bytes after it are not zero). Returns
    (members, bytes); FetchError otherwise."""
    members = total = 0
    try:
        with _open_decompressed(archive) as stream:
            with tarfile.open(fileobj=stream, mode="r:") as tar:  # reads forward only: one decompression pass
                for m in tar:
                    members += 1
                    total += max(m.size, 0)
                    if members > max_members:
                        raise FetchError(
                            f"{archive}: more than {max_members:,} members; refusing (a tar bomb?), nothing extracted"
                        )
                    if total > max_total_bytes:
                        raise FetchError(
                            f"{archive}: contents exceed {max_total_bytes:,} bytes; refusing (a tar bomb?), "
                            "nothing extracted"
                        )
                end = tar.offset
            stream.seek(end)
            while chunk := stream.read(_CHUNK):  # to the compression trailer, whose checksum is verified
                if chunk.strip(b"\0"):
                    raise FetchError(
                        f"{archive}: damaged tar structure after member {members} (byte {end} of the contents is "
                        "not a valid header); nothing was extracted. The file was set aside; run fetch again to "
                        "download it anew"
                    )
                end += len(chunk)
    except FetchError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        raise FetchError(
            f"{archive}: damaged archive ({type(e).__name__}: {e}); nothing was extracted. The file was set aside; "
            "run fetch again to download it anew"
        ) from e
    if members == 0:
        raise FetchError(f"{archive}: the archive is empty; expected the PASCAL_MT folder")
    return members, total


def _safe_members(archive: Path, tar: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], list[str]]:
    """Members to extract (plain files and folders only) and the top-level names; anything that could write
    outside the destination (absolute paths, '..', links, devices) is an error."""
    members, tops = [], []
    for m in tar.getmembers():
        p = PurePosixPath(m.name)
        if m.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", m.name) or ".." in p.parts or "\\" in m.name:
            raise FetchError(f"{archive}: member {m.name!r} would be written outside the destination; refusing")
        if not (m.isfile() or m.isdir()):
            raise FetchError(f"{archive}: member {m.name!r} is a link or special file; expected files and folders")
        parts = [x for x in p.parts if x not in ("", ".")]
        if not parts:
            continue
        if parts[0] not in tops:
            tops.append(parts[0])
        members.append(m)
    if not tops:
        raise FetchError(f"{archive}: the archive is empty; expected the PASCAL_MT folder")
    return members, tops


def extract(archive: Path, dest: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Extract ``archive`` into ``dest`` through a temporary folder; returns the top-level paths."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members, tops = _safe_members(archive, tar)
            targets = [dest / t for t in tops]
            existing = [t for t in targets if t.exists()]
            if existing and len(existing) == len(targets):
                log(f"already extracted: {', '.join(str(t) for t in targets)}")
                return targets
            if existing:
                raise FetchError(f"{existing[0]}: already exists; remove it or choose another --dest")
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
            try:
                log(f"extracting {archive.name} ...")
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp, members=members, **kwargs)
                for t in tops:
                    os.replace(tmp / t, dest / t)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise FetchError(f"{archive}: cannot extract ({e}); expected a (gzipped) tar archive") from e
    return targets


SOURCE_SUFFIX = ".url"
REJECTED_SUFFIX = ".rejected"


def _set_aside(path: Path, log: Callable[[str], None], why: str) -> None:
    """Rename a download that must not be reused (``<name>.rejected``, replacing an older one)."""
    target = path.with_name(path.name + REJECTED_SUFFIX)
    os.replace(path, target)
    log(f"set aside {path} as {target.name}: {why}")


def fetch(
    dest: str | os.PathLike[str],
    url: str = DEFAULT_URL,
    sha256: str | None = None,
    log: Callable[[str], None] = print,
    timeout: float = 60.0,
) -> Path:
    """Download (resuming), verify, extract into ``dest``; return the dataset root (the folder with JPEGImages)."""
    dest = Path(dest).expanduser()
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise FetchError(f"--sha256 {sha256!r}: expected 64 hexadecimal digits")
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise FetchError(f"{url}: expected an http(s) URL")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / _archive_name(url)
    source = archive.with_name(archive.name + SOURCE_SUFFIX)  # the URL the download (or its .part) came from
    part = archive.with_name(archive.name + ".part")
    recorded = source.read_text().strip() if source.is_file() else None
    if (archive.is_file() or part.is_file()) and recorded is not None and recorded != url:
        # a file from another URL is never reused: a corrected --url downloads anew
        for old in (archive, part):
            if old.is_file():
                _set_aside(old, log, f"it came from {recorded}, not {url}")
    if archive.is_file():
        log(f"{archive} already downloaded")
    else:
        log(f"downloading {url} -> {archive}")
        source.write_text(url + "\n")
        try:
            download(url, archive, log, timeout)
        except FetchError:
            if not part.is_file():  # nothing was received: nothing to remember the origin of
                source.unlink(missing_ok=True)
            raise
    digest = sha256_of(archive)
    if sha256 is None:
        log(f"sha256 {digest} (pass --sha256 to verify it next time)")
    elif digest.lower() != sha256.lower():
        _set_aside(archive, log, "its sha256 does not match")
        raise FetchError(
            f"{archive}: sha256 {digest} does not match the expected {sha256.lower()}; nothing was extracted. "
            "The file was set aside (never reused); check the --sha256 value and run fetch again"
        )
    try:
        members, total = verify_archive(archive)
    except FetchError:
        _set_aside(archive, log, "it failed verification")
        raise
    log(f"verified {archive.name}: {members} members, {total:,} bytes")
    tops = extract(archive, dest, log)
    for candidate in [*tops, dest]:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FetchError(f"{archive}: no JPEGImages/ folder in the extracted files {[t.name for t in tops]}")


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _names(values: Sequence[str] | None, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    if not values:
        return tuple(allowed)
    names = [n for v in values for n in v.split(",") if n]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise DatasetError(f"unknown {what} {bad}; expected some of {list(allowed)}", None, "config")
    return tuple(dict.fromkeys(names))


def _run_check(protocol: Protocol, root: Path, splits: Sequence[str], tasks: Sequence[str]) -> int:
    report = check_dataset(protocol, root, splits, tasks, progress=lambda m: print(m, file=sys.stderr))
    for line in report.lines():
        print(line)
    if report.ok:
        print(f"OK: usable for protocol {protocol.name}, splits {list(splits)} and tasks {list(tasks)}")
        return 0
    n = sum(len(p.names) for p in report.problems)
    print(f"NOT USABLE: {n} problem(s) in {len(report.problems)} group(s)", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmark-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    protocol_help = f"protocol whose data layout and tasks are used: {', '.join(PROTOCOLS)} (default pascal-context)"
    p = sub.add_parser("synth", help="write a small generated dataset in the protocol's real layout")
    p.add_argument("--protocol", default=PASCAL_CONTEXT.name, help=protocol_help)
    p.add_argument("out_dir", nargs="?", type=Path, metavar="DIR", help="new (or empty) output folder")
    p.add_argument("--out", type=Path, help="the same as DIR")
    p.add_argument("--train", type=int, default=64, help="train images (default 64)")
    p.add_argument("--val", type=int, default=16, help="val images (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("check", help="validate a dataset folder; exit 0 only when it is usable")
    p.add_argument("--protocol", default=PASCAL_CONTEXT.name, help=protocol_help)
    p.add_argument("root", type=Path)
    p.add_argument("--tasks", nargs="+", help="subset of the protocol's tasks, e.g. semseg,normals (default all)")
    p.add_argument("--split", nargs="+", help=f"subset of {','.join(SPLITS)} (default all)")
    p = sub.add_parser("fetch", help="download, verify and extract the PASCAL_MT dataset, then check it")
    p.add_argument("--dest", required=True, type=Path, help="folder to download and extract into")
    p.add_argument("--url", default=DEFAULT_URL)
    p.add_argument("--sha256", help="expected checksum of the archive")
    return parser


def _protocol(name: str) -> Protocol:
    try:
        return get_protocol(name)
    except KeyError:
        raise DatasetError(f"--protocol {name!r}: unknown protocol; expected one of {list(PROTOCOLS)}") from None


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out_dir is not None and args.out is not None and args.out_dir != args.out:
        raise DatasetError(f"synth: two output folders given ({args.out_dir} and --out {args.out}); expected one")
    out = args.out_dir if args.out_dir is not None else args.out
    if out is None:
        raise DatasetError("synth: no output folder; expected DIR (or --out DIR)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message
        return 0 if e.code == 0 else 2
    try:
        if args.command == "synth":
            protocol = _protocol(args.protocol)
            out = make_synthetic(_out_dir(args), args.train, args.val, args.seed, protocol)
            print(f"wrote {args.train} train + {args.val} val images ({protocol.name} layout) to {out}")
            return 0
        if args.command == "check":
            protocol = _protocol(args.protocol)
            splits = _names(args.split, SPLITS, "splits")
            return _run_check(protocol, args.root, splits, _names(args.tasks, protocol.task_names, "tasks"))
        if args.command == "fetch":
            root = fetch(args.dest, args.url, args.sha256)
            return _run_check(PASCAL_CONTEXT, root, SPLITS, PASCAL_CONTEXT.task_names)
    except (ValueError, OSError) as e:  # DatasetError, FetchError, synth's errors, unwritable folders
        print(f"benchmark-data {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"benchmark-data {args.command}: interrupted", file=sys.stderr)
        return 130
    return 2


def make_synthetic(out: Path, n_train: int, n_val: int, seed: int, protocol: Protocol = PASCAL_CONTEXT) -> Path:
    from benchmark.synth import make_synthetic_dataset  # imported lazily: check/fetch do not need it

    return make_synthetic_dataset(out, n_train, n_val, seed, protocol=protocol)


if __name__ == "__main__":
    raise SystemExit(main())
