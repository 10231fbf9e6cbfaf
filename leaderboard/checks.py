"""Regression checks that CI runs (``leaderboard check``); each failure says what broke.

1. ``results``: every result file validates (schema, known protocol version, metrics of every task,
   stored Δm equal to the one recomputed from the metrics, unique run ids).
2. ``published-delta-m``: each published row's printed Δm matches the Δm recomputed from its own
   per-task values within rounding (``delta_m_rounding_tol``: the error model of 2-decimal printing against the
   reference the row names), unless it is listed as a known
   inconsistency, and every listed inconsistency is still one (so the list cannot rot).
   ``reference-row``: a published single-task row equals the reference it names.
3. ``params``: the harness reproduces the expected parameter counts (``expected_params.csv``) at the
   paper preset; measured by running ``python -m benchmark.cli --dry-run --json`` per config in a
   subprocess, so the leaderboard itself never imports torch.
   ``published-params``: every published row whose method the harness registers (asked of
   ``python -m benchmark.cli --list --json``, so a newly registered method is checked without any edit here)
   prints the count the harness gives its configuration, under the row's counting policy, rounded as
   printed; rows listed in ``known_inconsistencies.csv`` (field ``params_m_printed``) must still differ.
4. ``tolerance``: committed results of a method with a *verified* published row lie within a band
   around it (``TOLERANCE_POINTS`` per metric in table units, widened to 2·std when several seeds exist).
5. ``stale``: the committed LEADERBOARD.md equals a fresh build.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.protocol import PROTOCOLS, Protocol, get_reference
from leaderboard.aggregate import (
    canonical_config,
    delta_m_mismatch,
    encoder_side,
    reproduced_frame,
    row_delta_m,
    row_rounding_tol,
)
from leaderboard.build import collect
from leaderboard.data import (
    ALL_TRAINABLE,
    ENCODER_SIDE,
    PARAM_FIELDS,
    PARAM_POLICIES,
    ExpectedParams,
    KnownInconsistency,
    PublishedRow,
    load_expected_params,
    load_known_inconsistencies,
    load_known_param_inconsistencies,
    load_published,
)
from leaderboard.errors import LeaderboardError
from leaderboard.runs import LoadedResults, Run, load_results
from leaderboard.tables import BUILD_COMMAND, render_markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
# A reproduction within half a point of the paper on every metric counts as matching: the seed-to-seed
# spread of these metrics on PASCAL-Context is of that order, and papers report a single run.
TOLERANCE_POINTS = 0.5
TOLERANCE_STD_FACTOR = 2.0  # with several seeds, the band is max(TOLERANCE_POINTS, 2·std)
PARAM_PROBE_TIMEOUT_S = 600.0
# A count printed in millions with 2 decimals is the exact count rounded: |count / 1e6 - printed| <= 0.005.
# The 1e-9 absorbs the binary representation of the printed decimal (a float64 of ~10 carries ~1e-15 error).
PARAMS_PRINTED_TOL = 0.005 + 1e-9
DIFF_HEAD_LINES = 40
STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class Failure:
    check: str
    message: str


@dataclass
class CheckReport:
    failures: list[Failure] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)  # one line per check that ran and passed

    def fail(self, check: str, message: str) -> None:
        self.failures.append(Failure(check, message))

    @property
    def ok(self) -> bool:
        return not self.failures

    def count(self, check: str) -> int:
        return sum(1 for f in self.failures if f.check == check)


@dataclass(frozen=True)
class CommandOutput:
    returncode: int
    stdout: str
    stderr: str


CommandRunner = Callable[[Sequence[str], float], CommandOutput]


def run_command(argv: Sequence[str], timeout: float) -> CommandOutput:
    """Run ``argv`` from the repository root; a timeout or a missing interpreter becomes a failed output."""
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, check=False)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return CommandOutput(-1, "", f"{err}\ntimed out after {timeout:g} s")
    except OSError as e:
        return CommandOutput(-1, "", f"cannot run {argv[0]}: {e}")
    return CommandOutput(p.returncode, p.stdout, p.stderr)


# --------------------------------------------------------------------------- 1. result files


def check_results(loaded: LoadedResults, report: CheckReport, paths: Sequence[str | os.PathLike[str]]) -> None:
    for e in loaded.errors:
        report.fail("results", e)
    if not loaded.errors:
        where = ", ".join(str(p) for p in paths)
        if not loaded.files:
            report.passed.append(f"results: no result files under {where} (nothing to validate)")
        else:
            report.passed.append(
                f"results: {len(loaded.files)} file(s) valid, {len(loaded.runs)} successful run(s), "
                f"{len(loaded.skipped)} skipped"
            )


# --------------------------------------------------------------------------- 2. published Δm


def check_published_delta_m(
    rows: Sequence[PublishedRow],
    protocol: Protocol,
    known: Mapping[str, KnownInconsistency],
    report: CheckReport,
    tol: float | None = None,
) -> None:
    """Printed vs recomputed Δm of every published row; listed inconsistencies must still be inconsistent.

    ``tol``: the allowed gap; None (the default) takes each row's rounding bound (``row_rounding_tol``)."""
    ids = {r.id for r in rows}
    n_bad = report.count("published-delta-m")
    tols = []
    for row in rows:
        row_tol = row_rounding_tol(row, protocol) if tol is None else tol
        tols.append(row_tol)
        gap = delta_m_mismatch(row, protocol)
        recomputed = row_delta_m(row, protocol)
        where = f"{row.file}, row {row.row} ({row.id}, {row.label})"
        if row.id in known:
            if gap <= row_tol:
                report.fail(
                    "published-delta-m",
                    f"{where}: listed in known_inconsistencies.csv but printed Δm {row.delta_m_printed:+.2f} now "
                    f"matches the recomputed {recomputed:+.3f} within {row_tol:.4f}; remove the listing",
                )
        elif gap > row_tol:
            report.fail(
                "published-delta-m",
                f"{where}: printed Δm {row.delta_m_printed:+.2f} but its per-task values give {recomputed:+.3f} "
                f"against {row.reference!r} (|diff| {gap:.3f} > {row_tol:.4f}, more than rounding); fix the row or "
                "list it in known_inconsistencies.csv with the reason",
            )
        if row.method == "single_task":
            ref = get_reference(row.reference)
            diffs = {
                t: (row.metrics[t], ref.values.get(t))
                for t in protocol.task_names
                if row.metrics[t] != ref.values.get(t)
            }
            if diffs:
                report.fail("reference-row", f"{where}: single-task row differs from reference {ref.name!r}: {diffs}")
    if report.count("published-delta-m") == n_bad:
        listed = sorted(k for k in known if k in ids)
        bound = (
            f"{min(tols):.4f}" if min(tols, default=0) == max(tols, default=0) else f"{min(tols):.4f}-{max(tols):.4f}"
        )
        report.passed.append(
            f"published-delta-m: {len(rows) - len(listed)} {protocol.name} row(s) match their recomputed Δm within "
            f"rounding ({bound})"
            + (f"; known inconsistencies still inconsistent: {', '.join(listed)}" if listed else "")
        )


# --------------------------------------------------------------------------- 3. parameter counts


def _set_value(v: Any) -> str:
    """A config value as ``--set`` text: strings bare, everything else (numbers, bools, lists) as JSON."""
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def param_probe_argv(exp: ExpectedParams, python: str | None = None) -> list[str]:
    """``python -m benchmark.cli --method M --preset P [--protocol NAME] --dry-run --json [--set k=v ...]``.

    One ``--set`` followed by every pair: the option takes several values, and a repeated ``--set``
    would replace the earlier ones.
    """
    argv = [python or sys.executable, "-m", "benchmark.cli", "--method", exp.method, "--preset", exp.preset]
    if exp.protocol:
        argv += ["--protocol", exp.protocol]
    argv += ["--dry-run", "--json"]
    if exp.config:
        argv += ["--set", *(f"{k}={_set_value(exp.config[k])}" for k in sorted(exp.config))]
    return argv


def _parse_json_stdout(stdout: str) -> dict[str, Any] | None:
    """The JSON object on stdout; tolerates log lines before it (the last object that parses wins)."""
    try:
        obj = json.loads(stdout)
        return obj if isinstance(obj, dict) else None
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    found = None
    pos = 0
    for line in stdout.splitlines(keepends=True):
        if line.startswith("{"):
            try:
                obj, _ = decoder.raw_decode(stdout, pos)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                found = obj
        pos += len(line)
    return found


def _jsonish(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples and lists compare equal


def check_param_counts(
    expected: Sequence[ExpectedParams],
    report: CheckReport,
    runner: CommandRunner = run_command,
    timeout: float = PARAM_PROBE_TIMEOUT_S,
) -> None:
    """Run one dry-run subprocess per expected (method, config) and compare every recorded count."""
    n_bad = report.count("params")
    for exp in expected:
        argv = param_probe_argv(exp)
        what = f"{exp.method} {canonical_config(exp.config)} (expected_params.csv row {exp.row})"
        out = runner(argv, timeout)
        if out.returncode != 0:
            tail = (out.stderr or out.stdout)[-STDERR_TAIL_CHARS:].rstrip()
            report.fail("params", f"{what}: `{' '.join(argv[1:])}` exited with {out.returncode}; stderr tail:\n{tail}")
            continue
        obj = _parse_json_stdout(out.stdout)
        params = obj.get("params") if obj else None
        if not isinstance(params, dict):
            report.fail(
                "params",
                f"{what}: dry-run printed no JSON object with 'params'; stdout tail:\n{out.stdout[-STDERR_TAIL_CHARS:]}",
            )
            continue
        problems = []
        if obj.get("method") != exp.method:
            problems.append(f"method is {obj.get('method')!r}")
        got_cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
        for k, v in sorted(exp.config.items()):
            if k not in got_cfg or _jsonish(got_cfg[k]) != _jsonish(v):
                problems.append(f"config {k}={got_cfg.get(k, '<missing>')!r}, expected {v!r}")
        for k in PARAM_FIELDS:
            want = exp.counts.get(k)
            if want is None:
                continue
            got = params.get(k)
            if got != want:
                diff = f" ({got - want:+,})" if isinstance(got, int) else ""
                problems.append(f"{k} {got if got is None else format(got, ',')} != expected {want:,}{diff}")
        if problems:
            report.fail("params", f"{what}: " + "; ".join(problems))
    if report.count("params") == n_bad:
        report.passed.append(f"params: {len(expected)} (method, config) count(s) match expected_params.csv")


def caching_runner(runner: CommandRunner) -> CommandRunner:
    """``runner`` that runs each distinct command once (the parameter checks probe some configs twice)."""
    memo: dict[tuple[str, ...], CommandOutput] = {}

    def run(argv: Sequence[str], timeout: float) -> CommandOutput:
        key = tuple(argv)
        if key not in memo:
            memo[key] = runner(argv, timeout)
        return memo[key]

    return run


def registered_methods(runner: CommandRunner, timeout: float = PARAM_PROBE_TIMEOUT_S) -> set[str]:
    """The method names the harness registers, from ``python -m benchmark.cli --list --json`` (torch stays out of
    this process); a LeaderboardError when the listing fails."""
    argv = [sys.executable, "-m", "benchmark.cli", "--list", "--json"]
    out = runner(argv, timeout)
    try:
        listed = json.loads(out.stdout) if out.returncode == 0 else None
    except json.JSONDecodeError:
        listed = None
    if not isinstance(listed, list) or not all(isinstance(m, dict) and "name" in m for m in listed):
        tail = (out.stderr or out.stdout)[-STDERR_TAIL_CHARS:].rstrip()
        raise LeaderboardError(f"`{' '.join(argv[1:])}` gave no method list (exit {out.returncode}):\n{tail}")
    return {m["name"] for m in listed}


def _count_under(params: Mapping[str, Any], policy: str) -> int:
    return int(params["trainable"]) if policy == ALL_TRAINABLE else encoder_side(params)


def check_published_params(
    rows: Sequence[PublishedRow],
    known: Mapping[str, KnownInconsistency],
    report: CheckReport,
    runner: CommandRunner = run_command,
    timeout: float = PARAM_PROBE_TIMEOUT_S,
) -> None:
    """Printed parameter counts of published rows against the harness's count of the same method and config.

    Data-driven: a row is probed when its method is registered (``registered_methods``), its count is printed and
    its policy is one the harness can count (``all-trainable``: ``trainable``; ``encoder-side``: the trainable
    parameters outside the decoders). Rows of methods the harness does not have are listed, not failed.
    """
    n_bad = report.count("published-params")
    try:
        names = registered_methods(runner, timeout)
    except LeaderboardError as e:
        report.fail("published-params", str(e))
        return
    matched, absent, uncounted, still_known = [], set(), [], []
    for row in rows:
        if row.params_m_printed is None or row.params_policy not in (ALL_TRAINABLE, ENCODER_SIDE):
            uncounted.append(row.id)
            continue
        if row.method not in names:
            absent.add(row.method)
            continue
        exp = ExpectedParams(row.method, row.config, "paper", protocol=row.protocol)
        argv = param_probe_argv(exp)
        where = f"{row.file}, row {row.row} ({row.id}, {row.label})"
        out = runner(argv, timeout)
        obj = _parse_json_stdout(out.stdout) if out.returncode == 0 else None
        params = obj.get("params") if obj else None
        if not isinstance(params, dict) or not all(isinstance(params.get(k), int) for k in PARAM_FIELDS):
            tail = (out.stderr or out.stdout)[-STDERR_TAIL_CHARS:].rstrip()
            report.fail("published-params", f"{where}: `{' '.join(argv[1:])}` gave no parameter counts:\n{tail}")
            continue
        count = _count_under(params, row.params_policy)
        gap = abs(count / 1e6 - row.params_m_printed)
        what = f"printed {row.params_m_printed:.2f}M ({PARAM_POLICIES[row.params_policy]})"
        if row.id in known:
            if gap <= PARAMS_PRINTED_TOL:
                report.fail(
                    "published-params",
                    f"{where}: listed in known_inconsistencies.csv (params_m_printed) but {what} now matches the "
                    f"harness's {count:,}; remove the listing",
                )
            else:
                still_known.append(row.id)
        elif gap > PARAMS_PRINTED_TOL:
            report.fail(
                "published-params",
                f"{where}: {what}, but `{' '.join(argv[1:])}` counts {count:,} ({count / 1e6:.2f}M) for its config "
                f"{canonical_config(row.config)}; fix the row's config or count, or list it in known_inconsistencies.csv",
            )
        else:
            matched.append(row.id)
    if report.count("published-params") == n_bad:
        line = f"published-params: {len(matched)} published count(s) equal the harness's count of their config"
        if still_known:
            line += f"; known inconsistencies still inconsistent: {', '.join(still_known)}"
        if absent:
            line += f"; methods not in the harness (not checked): {', '.join(sorted(absent))}"
        if uncounted:
            line += f"; no count under a known policy: {', '.join(uncounted)}"
        report.passed.append(line)


# --------------------------------------------------------------------------- 4. tolerance band


def _matches(run: Run, row: PublishedRow) -> bool:
    p = run.data["protocol"]
    if (p["name"], p["version"]) != (row.protocol, row.protocol_version) or run.method != row.method:
        return False
    return all(k in run.config and _jsonish(run.config[k]) == _jsonish(v) for k, v in row.config.items())


def check_tolerance(
    runs: Sequence[Run],
    rows: Sequence[PublishedRow],
    protocol: Protocol,
    report: CheckReport,
    tol: float = TOLERANCE_POINTS,
) -> None:
    """Reproductions of verified published rows: |mean − published| ≤ max(tol, 2·std) on every metric."""
    n_bad = report.count("tolerance")
    compared = 0
    for row in rows:
        if not row.verified:
            continue
        matched = [r for r in runs if _matches(r, row)]
        if not matched:
            continue
        frame = reproduced_frame(matched, protocol)
        for g in frame.to_dict("records"):
            compared += 1
            n = g["n_seeds"]
            bad = []
            for t in protocol.task_names:
                std = g[f"{t}_std"]
                band = max(tol, TOLERANCE_STD_FACTOR * std) if n >= 2 else tol
                gap = g[t] - row.metrics[t]
                if abs(gap) > band:
                    bad.append(f"{t} {g[t]:.2f} vs {row.metrics[t]:.2f} ({gap:+.2f}, band ±{band:.2f})")
            if bad:
                report.fail(
                    "tolerance",
                    f"{row.method} {g['config_text']} ({n} seed(s), runs {', '.join(g['run_ids'])}) is outside the band "
                    f"around verified published row {row.id} ({row.file}, row {row.row}): " + "; ".join(bad),
                )
    if report.count("tolerance") == n_bad:
        n_ver = sum(1 for r in rows if r.verified)
        report.passed.append(
            f"tolerance: {compared} reproduced group(s) compared with {n_ver} verified {protocol.name} row(s)"
        )


# --------------------------------------------------------------------------- 5. stale LEADERBOARD.md


def check_stale(path: Path, expected_text: str, report: CheckReport) -> None:
    if not path.exists():
        report.fail("stale", f"{path} not found; generate it with `{BUILD_COMMAND}`")
        return
    current = path.read_text(encoding="utf-8")
    if current == expected_text:
        report.passed.append(f"stale: {path} is up to date")
        return
    diff = list(
        difflib.unified_diff(
            current.splitlines(),
            expected_text.splitlines(),
            f"{path} (committed)",
            f"{path} (fresh build)",
            lineterm="",
        )
    )
    head = "\n".join(diff[:DIFF_HEAD_LINES]) + (
        f"\n... ({len(diff) - DIFF_HEAD_LINES} more diff lines)" if len(diff) > DIFF_HEAD_LINES else ""
    )
    report.fail("stale", f"{path} differs from a fresh build; regenerate with `{BUILD_COMMAND}`:\n{head}")


def default_plot_link(leaderboard_path: Path, plot_path: str = "docs/pareto.png") -> str:
    """The plot link as ``build`` writes it: the plot path relative to the markdown file's folder."""
    return Path(os.path.relpath(Path(plot_path).resolve(), leaderboard_path.resolve().parent)).as_posix()


# --------------------------------------------------------------------------- all of them


def run_checks(
    results_paths: Sequence[str | os.PathLike[str]],
    leaderboard_path: Path | None = Path("LEADERBOARD.md"),
    skip_params: bool = False,
    data_dir: Path | None = None,
    runner: CommandRunner = run_command,
    tol: float = TOLERANCE_POINTS,
) -> CheckReport:
    """Every check; bad published data raises ``PublishedDataError`` (it is input, not a regression)."""
    report = CheckReport()
    runner = caching_runner(runner)
    loaded = load_results(results_paths)
    check_results(loaded, report, results_paths)
    known = load_known_inconsistencies(data_dir)
    all_rows: list[PublishedRow] = []
    for name in sorted(PROTOCOLS):
        protocol = PROTOCOLS[name]
        rows = load_published(protocol, data_dir)
        all_rows += rows
        if rows:
            check_published_delta_m(rows, protocol, known, report)
        check_tolerance(loaded.runs, rows, protocol, report, tol)
    known_params = load_known_param_inconsistencies(data_dir)
    ids = {r.id for r in all_rows}
    for kid in sorted(set(known) - ids):
        report.fail("published-delta-m", f"known_inconsistencies.csv lists {kid!r}, which is no published row id")
    for kid in sorted(set(known_params) - ids):
        report.fail("published-params", f"known_inconsistencies.csv lists {kid!r}, which is no published row id")
    if not skip_params:
        check_param_counts(load_expected_params(data_dir), report, runner)
        check_published_params(all_rows, known_params, report, runner)
    if leaderboard_path is not None:
        valid = LoadedResults(runs=loaded.runs, skipped=loaded.skipped, files=loaded.files)
        try:
            lb = collect(results_paths, include_published=True, data_dir=data_dir, results=valid)
        except LeaderboardError as e:
            report.fail("stale", f"cannot build the leaderboard: {e}")
        else:
            check_stale(leaderboard_path, render_markdown(lb, default_plot_link(leaderboard_path)), report)
    return report
