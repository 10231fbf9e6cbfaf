"""``leaderboard``: build the leaderboard, check it for regressions, validate result files.

    leaderboard build results/ -o LEADERBOARD.md --plot docs/pareto.png [--csv leaderboard.csv] [--html site/]
                      [--no-published] [--reference PROTOCOL=NAME ...]
    leaderboard compare A B     (A, B: result files or folders, one configuration each)
    leaderboard check [results/] [--leaderboard LEADERBOARD.md] [--skip-params]
    leaderboard validate results/

Exit status: 0 ok, 1 bad input or failed checks (message on stderr, no traceback), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmark.results import atomic_write_text
from leaderboard.errors import LeaderboardError


def check_output_file(flag: str, path: str | os.PathLike[str]) -> None:
    """An output file's folder must exist and be writable, and the file must not be a folder: checked before
    anything is computed or written, so a typo costs nothing and leaves nothing half-written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise LeaderboardError(f"{flag} {p}: is a folder; expected a file name")
    if not parent.is_dir():
        raise LeaderboardError(f"{flag} {p}: folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise LeaderboardError(f"{flag} {p}: not writable (permission denied in {parent})")


def check_output_dir(flag: str, path: str | os.PathLike[str]) -> None:
    """An output folder: created by the build if missing, so its parent must exist and be writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise LeaderboardError(f"{flag} {p}: exists and is not a folder")
    check_output_file(flag, p / "index.html") if p.is_dir() else check_output_file(flag, p)


def check_published_dir(path: Path | None) -> None:
    """``--published-dir`` given: it must be a folder holding the published rows of at least one protocol."""
    if path is None:
        return
    from benchmark.protocol import PROTOCOLS

    if not path.is_dir():
        raise LeaderboardError(f"--published-dir {path}: folder not found")
    expected = [f"{name}.csv" for name in sorted(PROTOCOLS)]
    if not any((path / f).is_file() for f in expected):
        raise LeaderboardError(f"--published-dir {path}: holds no published-data file (expected one of {expected})")


def reference_choice(text: str) -> tuple[str, str]:
    """``--reference PROTOCOL=NAME``: the single-task reference (``benchmark.protocol.REFERENCES``) that the Δm of
    PROTOCOL's section is measured against; it must be a reference of that protocol."""
    from benchmark.protocol import PROTOCOLS, REFERENCES

    protocol, sep, name = text.partition("=")
    if not sep or not protocol or not name:
        raise argparse.ArgumentTypeError(
            f"expected PROTOCOL=NAME (e.g. nyud=tadformer-config-nyud-single-task), got {text!r}"
        )
    if protocol not in PROTOCOLS:
        raise argparse.ArgumentTypeError(f"unknown protocol {protocol!r} in {text!r}; known: {sorted(PROTOCOLS)}")
    mine = sorted(r.name for r in REFERENCES.values() if r.protocol == protocol)
    if name not in mine:
        raise argparse.ArgumentTypeError(
            f"{name!r} is no single-task reference of protocol {protocol!r}; known: {mine}"
        )
    return protocol, name


def _references(pairs: Sequence[tuple[str, str]] | None) -> dict[str, str] | str:
    """``--reference`` pairs as {protocol: reference}, or the usage error when a protocol is named twice."""
    out: dict[str, str] = {}
    for protocol, name in pairs or ():
        if out.get(protocol, name) != name:
            return (
                f"argument --reference: protocol {protocol!r} named twice ({out[protocol]}, {name}); one per protocol"
            )
        out[protocol] = name
    return out


def _build(args: argparse.Namespace) -> int:
    from leaderboard.build import collect, section_plot_path
    from leaderboard.checks import default_plot_link
    from leaderboard.tables import frame_to_csv, render_markdown

    check_published_dir(args.published_dir)
    for flag, value in (("-o", args.output), ("--plot", args.plot), ("--csv", args.csv)):
        if value:
            check_output_file(flag, value)
    if args.html:
        check_output_dir("--html", args.html)
    lb = collect(
        args.results, include_published=args.published, data_dir=args.published_dir, references=args.references
    )
    for m in lb.messages:
        print(f"leaderboard: {m}", file=sys.stderr)
    out_path = Path(args.output) if args.output else Path("LEADERBOARD.md")
    plot_base = args.plot or "docs/pareto.png"
    text = render_markdown(lb, default_plot_link(out_path, plot_base))
    # render everything first, write afterwards: a failure leaves no half-written set of outputs
    pngs = {}
    if args.plot:
        from leaderboard.plot import render_png

        for s in lb.sections:
            if s.plotted:  # a section without a plottable row gets no (empty) plot; its markdown says so
                pngs[section_plot_path(args.plot, s, len(lb.sections))] = render_png(s)
    csv_text = frame_to_csv(lb) if args.csv else None
    site = None
    if args.html:
        from leaderboard.html import render_site

        site = render_site(lb)
    for path, data in pngs.items():
        from benchmark.results import atomic_write_bytes

        atomic_write_bytes(path, data)
        print(f"leaderboard: wrote {path}", file=sys.stderr)
    if csv_text is not None:
        atomic_write_text(args.csv, csv_text)
        print(f"leaderboard: wrote {args.csv}", file=sys.stderr)
    if site is not None:
        from leaderboard.html import write_site

        write_site(site, args.html)
        print(f"leaderboard: wrote {Path(args.html) / 'index.html'} ({len(site)} files)", file=sys.stderr)
    if args.output:
        atomic_write_text(args.output, text)
        n = sum(s.n_reproduced_groups for s in lb.sections)
        print(
            f"leaderboard: wrote {args.output} ({n} reproduced group(s), {len(lb.results.runs)} run(s))",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return 0


def _check(args: argparse.Namespace) -> int:
    from leaderboard.checks import TOLERANCE_POINTS, run_checks

    check_published_dir(args.published_dir)
    report = run_checks(
        args.results or ["results"],
        leaderboard_path=None if args.no_stale else Path(args.leaderboard),
        skip_params=args.skip_params,
        data_dir=args.published_dir,
        tol=TOLERANCE_POINTS if args.tolerance is None else args.tolerance,
    )
    for line in report.passed:
        print(f"ok    {line}")
    if args.skip_params:
        print("skip  params (--skip-params)")
    for f in report.failures:
        print(f"FAIL  [{f.check}] {f.message}", file=sys.stderr)
    if report.ok:
        print("leaderboard check: all checks passed")
        return 0
    print(f"leaderboard check: {len(report.failures)} failure(s)", file=sys.stderr)
    return 1


def _validate(args: argparse.Namespace) -> int:
    from leaderboard.runs import load_results

    loaded = load_results(args.results)
    where = ", ".join(args.results)
    for e in loaded.errors:
        print(f"invalid  {e}", file=sys.stderr)
    for s in loaded.skipped_summary():
        print(f"skipped  {s}", file=sys.stderr)
    if not loaded.files:
        print(f"leaderboard validate: no result files under {where} (nothing to validate)")
        return 0
    n_ok = len(loaded.files) - len(loaded.errors)
    print(
        f"leaderboard validate: {len(loaded.files)} file(s): {n_ok} valid ({len(loaded.runs)} successful run(s), "
        f"{len(loaded.skipped)} skipped), {len(loaded.errors)} invalid"
    )
    return 1 if loaded.errors else 0


def _compare(args: argparse.Namespace) -> int:
    from leaderboard.aggregate import config_text
    from leaderboard.compare import compare_runs, load_group, render

    a, b = load_group(args.a, "A"), load_group(args.b, "B")
    result = compare_runs(a, b)

    def label(runs) -> str:
        r = runs[0]
        seeds = ",".join(str(x.data["seeds"][0]) for x in runs)
        return f"{r.method} {config_text(r.config)} preset {r.data['preset']} seeds {seeds} ({r.protocol.id})"

    sys.stdout.write(render(result, label(a), label(b), a[0].protocol))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="leaderboard",
        description="Build the leaderboard, check it for regressions, validate result files.",
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    data_help = "folder of the published-data CSVs (default: the package's leaderboard/published/)"

    b = sub.add_parser("build", help="aggregate result files and published rows into LEADERBOARD.md")
    b.add_argument("results", nargs="+", help="result files or folders (searched recursively for *.json)")
    b.add_argument("-o", "--output", help="markdown output (default: stdout)")
    b.add_argument("--csv", help="also write the table as CSV")
    b.add_argument("--plot", help="also write the Δm vs parameters plot (PNG); one file per protocol if several")
    b.add_argument("--html", help="also write the leaderboard as a static web page (DIR/index.html, works offline)")
    b.add_argument("--published", action=argparse.BooleanOptionalAction, default=True, help="include published rows")
    b.add_argument("--published-dir", type=Path, default=None, help=data_help)
    b.add_argument(
        "--reference",
        action="append",
        type=reference_choice,
        metavar="PROTOCOL=NAME",
        help="measure PROTOCOL's Δm against the single-task reference NAME instead of the protocol's default "
        "(repeatable, one per protocol)",
    )
    b.set_defaults(func=_build)

    c = sub.add_parser("check", help="regression checks (CI): results, published Δm, parameter counts, staleness")
    c.add_argument("results", nargs="*", help="committed result files or folders (default: results)")
    c.add_argument("--leaderboard", default="LEADERBOARD.md", help="committed markdown to compare with a fresh build")
    c.add_argument("--no-stale", action="store_true", help="skip the LEADERBOARD.md staleness check")
    c.add_argument(
        "--skip-params", action="store_true", help="skip the parameter counts (no benchmark.cli subprocesses)"
    )
    c.add_argument(
        "--tolerance", type=float, default=None, help="band around verified published rows, table units (default 0.5)"
    )
    c.add_argument("--published-dir", type=Path, default=None, help=data_help)
    c.set_defaults(func=_check)

    k = sub.add_parser("compare", help="do two reproduced configurations differ? difference, interval, p-value")
    k.add_argument("a", help="result file or folder of configuration A (its successful runs: one configuration)")
    k.add_argument("b", help="result file or folder of configuration B")
    k.set_defaults(func=_compare)

    v = sub.add_parser("validate", help="validate result files only")
    v.add_argument("results", nargs="+", help="result files or folders")
    v.set_defaults(func=_validate)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if hasattr(args, "reference"):
        args.references = _references(args.reference)
        if isinstance(args.references, str):
            ap.error(args.references)  # exit 2, like every other usage error
    try:
        return args.func(args)
    except LeaderboardError as e:
        print(f"leaderboard: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
