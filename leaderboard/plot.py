"""Δm against trainable parameters with the Pareto front (matplotlib, Agg backend, deterministic PNG)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from benchmark.results import atomic_write_bytes
from leaderboard.build import Section


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points with the best Δm at ≤ parameters (x = params, y = Δm), by increasing x.

    A point is on the front when no point with fewer or equal parameters has a higher or equal Δm
    (ties: the one with fewer parameters wins; exact duplicates keep the first).
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _point_label(row: dict) -> str:
    if row["kind"] == "reproduced":
        return f"{row['method']} {row['config_text']} (ours, n={row['n_seeds']})"
    return row["label"] + (f" [{short_init(row['init'])}]" if row["init_differs"] else "")


def short_init(init: str) -> str:
    """'imagenet-22k' -> 'IN-22K' (plot labels stay short)."""
    return init.replace("imagenet-", "IN-").upper() if init.startswith("imagenet-") else init


def render_png(section: Section, dpi: int = 150) -> bytes:
    """The plot of one section as PNG bytes (no timestamp or version metadata, so builds are repeatable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = section.protocol
    ref = section.reference
    rows = section.plotted
    with plt.rc_context({"font.size": 9, "svg.hashsalt": "leaderboard"}):
        fig, ax = plt.subplots(figsize=(10, 6.6), layout="constrained")
        xs = [r["params_m"] for r in rows]
        ys = [r["delta_m"] for r in rows]
        styles = {
            "verified": dict(marker="o", s=42, color="#4C72B0", edgecolor="white", linewidth=0.6, zorder=3),
            "unverified": dict(marker="o", s=42, facecolor="white", edgecolor="#4C72B0", linewidth=1.4, zorder=3),
            "reproduced": dict(marker="*", s=170, color="#C44E52", edgecolor="black", linewidth=0.6, zorder=4),
        }
        names = {
            "verified": "published, verified (Δm recomputed from its per-task values)",
            "unverified": "published, secondary quote not yet verified (Δm recomputed)",
            "reproduced": "reproduced here (mean over seeds)",
        }

        def kind_of(r: dict) -> str:
            return "reproduced" if r["kind"] == "reproduced" else "verified" if r["verified"] else "unverified"

        for kind in ("verified", "unverified", "reproduced"):
            idx = [i for i, r in enumerate(rows) if kind_of(r) == kind]
            if idx:
                ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], label=names[kind], **styles[kind])
        front = pareto_front(list(zip(xs, ys, strict=True)))
        ax.set_xscale("log")
        if xs:
            ax.set_xlim(min(xs) / 1.5, max(xs) * 2.2)
            ax.set_ylim(min(min(ys), 0.0) - 1.0, max(ys) + 1.3)
        if front:
            # the front as a staircase, continued to the right edge: the best Δm reachable with ≤ x parameters
            fx = [xs[i] for i in front] + [ax.get_xlim()[1]]
            fy = [ys[i] for i in front] + [ys[front[-1]]]
            ax.step(fx, fy, where="post", color="#55A868", linestyle="--", linewidth=1.3, zorder=2,
                    label="Pareto front (best Δm at ≤ parameters)")  # fmt: skip
        else:
            fx, fy = [], []
        ax.axhline(0.0, color="grey", linewidth=0.8, zorder=1)
        ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if xs and min(xs) / 1.5 <= t <= max(xs) * 2.2]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("Trainable parameters (millions, log scale)")
        ax.set_ylabel("Δm (%) vs single-task reference  ↑ better")
        ax.set_title(
            f"{p.name} v{p.version} ({p.backbone}, {p.image_size}×{p.image_size}): Δm against trainable parameters\n"
            f"reference: {ref.name} (Δm = 0)",
            fontsize=10,
        )
        ax.grid(True, which="both", linewidth=0.4, alpha=0.5)
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
        _place_labels(fig, ax, xs, ys, [_point_label(r) for r in rows], bold=set(front), staircase=(fx, fy))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
        plt.close(fig)
    return buf.getvalue()


def write_plot(section: Section, path: str | os.PathLike[str]) -> Path:
    return atomic_write_bytes(path, render_png(section))


def _place_labels(
    fig, ax, xs: list[float], ys: list[float], labels: list[str], bold: set[int], staircase: tuple[list, list]
) -> None:
    """Greedy label placement: for each point, the nearest candidate offset whose text box overlaps no
    marker, no earlier label, the Pareto staircase or the legend, and stays inside the axes; farther
    candidates get a leader line."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    pts = [to_px((x, y)) for x, y in zip(xs, ys, strict=True)]
    r = 7.0  # marker half-size in pixels, plus a margin
    obstacles = [(px - r, py - r, px + r, py + r) for px, py in pts]
    sx, sy = staircase
    for k in range(len(sx) - 1):  # "post" steps: horizontal from (x_k, y_k) to x_{k+1}, then vertical to y_{k+1}
        (x0, y0), (x1, y1) = to_px((sx[k], sy[k])), to_px((sx[k + 1], sy[k + 1]))
        obstacles.append((x0, y0 - 2, x1, y0 + 2))
        obstacles.append((x1 - 2, min(y0, y1), x1 + 2, max(y0, y1)))
    legend = ax.get_legend()
    if legend is not None:
        b = legend.get_window_extent(renderer)
        obstacles.append((b.x0, b.y0, b.x1, b.y1))
    axbox = ax.get_window_extent(renderer)
    directions = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1)]
    directions += [(1, 0.5), (-1, 0.5), (1, -0.5), (-1, -0.5), (0.5, 1), (-0.5, 1), (0.5, -1), (-0.5, -1)]
    # Pareto-front labels first (they matter most), then crowded points: they have the fewest free spots
    crowd = [sum(1 for q in pts if abs(q[0] - p[0]) + abs(q[1] - p[1]) < 80) for p in pts]
    for i in sorted(range(len(xs)), key=lambda i: (i not in bold, -crowd[i], xs[i], ys[i])):
        placed = False
        for dist in (6, 14, 24, 36, 50, 66, 85):
            for dx, dy in directions:
                ha = "left" if dx > 0.5 else "right" if dx < -0.5 else "center"
                va = "bottom" if dy > 0.5 else "top" if dy < -0.5 else "center"
                t = ax.annotate(
                    labels[i], (xs[i], ys[i]), xytext=(dx * dist, dy * dist), textcoords="offset points",
                    ha=ha, va=va, fontsize=7.5, fontweight="bold" if i in bold else "normal", zorder=5,
                    arrowprops=dict(arrowstyle="-", color="grey", linewidth=0.5, shrinkA=0, shrinkB=3)
                    if dist > 6 else None,
                )  # fmt: skip
                b = t.get_window_extent(renderer)
                box = (b.x0 - 2, b.y0 - 1, b.x1 + 2, b.y1 + 1)
                inside = box[0] >= axbox.x0 and box[2] <= axbox.x1 and box[1] >= axbox.y0 and box[3] <= axbox.y1
                if inside and not any(_overlap(box, o) for o in obstacles):
                    obstacles.append(box)
                    placed = True
                    break
                t.remove()
            if placed:
                break
        if not placed:  # keep the label even if it has to overlap: a missing label would hide a point's name
            ax.annotate(labels[i], (xs[i], ys[i]), xytext=(6, 6), textcoords="offset points", fontsize=7.5,
                        fontweight="bold" if i in bold else "normal", zorder=5)  # fmt: skip


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
