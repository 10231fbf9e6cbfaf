"""Collect everything a leaderboard shows: valid runs, published rows, fragments, per protocol."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.protocol import PROTOCOLS, Protocol, Reference
from leaderboard.aggregate import leaderboard_frame, section_reference
from leaderboard.data import (
    Fragment,
    KnownInconsistency,
    PublishedRow,
    load_fragments,
    load_known_inconsistencies,
    load_published,
)
from leaderboard.errors import LeaderboardError, ResultsNotFoundError
from leaderboard.runs import LoadedResults, load_results


@dataclass
class Section:
    """One protocol's part of the leaderboard; Δm is measured against ``reference``."""

    protocol: Protocol
    frame: pd.DataFrame
    published: list[PublishedRow] = field(default_factory=list)
    fragments: list[Fragment] = field(default_factory=list)
    reference: Reference | None = None  # None: the protocol's default

    def __post_init__(self) -> None:
        if self.reference is None:
            self.reference = section_reference(self.protocol)

    @property
    def plotted(self) -> list[dict]:
        """The rows the Δm-parameters plot shows: a Δm and a positive count under the Trainable policy."""
        return [
            r
            for r in self.frame.to_dict("records")
            if not (math.isnan(r["params_m"]) or math.isnan(r["delta_m"]) or r["params_m"] <= 0)
        ]

    @property
    def n_reproduced_groups(self) -> int:
        return int((self.frame["kind"] == "reproduced").sum()) if len(self.frame) else 0


@dataclass
class Leaderboard:
    sections: list[Section]
    results: LoadedResults
    include_published: bool
    known: dict[str, KnownInconsistency] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)  # for stderr: what was skipped and why, empty inputs


def collect(
    results_paths: Sequence[str | os.PathLike[str]],
    include_published: bool = True,
    data_dir: Path | None = None,
    results: LoadedResults | None = None,
    references: Mapping[str, str] | None = None,
) -> Leaderboard:
    """Load results (raising on invalid files) and published data, one section per protocol that has either.

    ``references`` maps a protocol name to the single-task reference its Δm is measured against (by name, one of
    that protocol's); protocols not named use their default. An empty set of results is allowed only when
    published rows exist; otherwise ``ResultsNotFoundError``.
    """
    chosen = resolve_references(references or {})
    loaded = results if results is not None else load_results(results_paths)
    loaded.raise_for_errors()
    shown = ", ".join(str(p) for p in results_paths) or "(no paths)"
    messages = []
    if loaded.skipped:
        messages.append(f"skipped {len(loaded.skipped)} file(s):")
        messages += [f"  {s}" for s in loaded.skipped_summary()]
    known = load_known_inconsistencies(data_dir) if include_published else {}
    sections = []
    for name in PROTOCOLS:  # in the order benchmark.protocol declares them
        protocol = PROTOCOLS[name]
        runs = [r for r in loaded.runs if r.data["protocol"]["name"] == name]
        published = load_published(protocol, data_dir) if include_published else []
        fragments = load_fragments(protocol, data_dir) if include_published else []
        if not runs and not published:
            continue
        ref = chosen[name]
        frame = leaderboard_frame(runs, published, protocol, known, ref.name)
        sections.append(Section(protocol, frame, published, fragments, ref))
    if not loaded.runs:
        what = "no result files" if not loaded.files else "no successful runs"
        if not any(s.published for s in sections):
            hint = "" if include_published else " and --no-published was given"
            raise ResultsNotFoundError(f"{what} under {shown}{hint}: nothing to build")
        messages.append(f"{what} under {shown}: the leaderboard holds published rows only")
    return Leaderboard(sections, loaded, include_published, known, messages)


def resolve_references(references: Mapping[str, str]) -> dict[str, Reference]:
    """The reference of every protocol: the named one where ``references`` names one, else the default."""
    unknown = sorted(set(references) - set(PROTOCOLS))
    if unknown:
        raise LeaderboardError(f"--reference: unknown protocol(s) {unknown}; known: {sorted(PROTOCOLS)}")
    out = {}
    for name, protocol in PROTOCOLS.items():
        try:
            out[name] = section_reference(protocol, references.get(name))
        except LeaderboardError as e:
            raise LeaderboardError(f"--reference {name}={references.get(name)}: {e}") from None
    return out


def section_plot_path(base: str, section: Section, n_sections: int) -> str:
    """The plot file of a section: ``base`` itself with one protocol, ``<stem>-<protocol><suffix>`` with several."""
    if n_sections <= 1:
        return base
    p = Path(base)
    return p.with_name(f"{p.stem}-{section.protocol.name}{p.suffix}").as_posix()
