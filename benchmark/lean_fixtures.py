"""The in-repository (lean) form of official-parity fixture folders: ``python -m benchmark.lean_fixtures SRC DST``.

A model fixture stores its eval outputs twice: ``head_outputs_before_resize`` (the decoder heads, e.g. 28x28) and
``outputs``, the same tensors after the final bilinear resize to the image size (e.g. 224x224), which is most of the
file. The lean form keeps the heads in full and replaces ``outputs`` by ``outputs_lean``:

- ``stride`` and ``shape[task]``: the subsample step and the full output shape;
- ``subsample[task]``: ``outputs[task][:, :, ::stride, ::stride]``, the official full-resolution values at those
  points, exactly as stored;
- ``resize``: the rule (bilinear, ``align_corners=False``) by which the full outputs follow from the heads, and
  ``resize_of_heads_max_abs_diff[task]``: how far ``outputs`` is from that resize of ``head_outputs_before_resize``,
  measured here when the lean file is made (fp32 rounding of one interpolation: a few ulps of the largest output).

The model checker (``benchmark.official.parity_checks``) then compares this implementation's full outputs against
the resize of the official heads at every pixel, and against the official values at the subsampled pixels, so a
lean file checks the same numbers as the full one. Every other key, and every other file (metrics, dataset,
gradient and training fixtures, dataset folders), is copied unchanged. Files are written atomically; the folder's
README is not copied (the repository has its own).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmark.safeload import CheckpointError, safe_load

DEFAULT_STRIDE = 16
# The stored full outputs must be the resize of the stored heads up to fp32 rounding: one bilinear
# interpolation is a convex combination of 4 values, at most ~4 roundings of the largest magnitude
# (4 * 2**-24 relative); 1e-6 relative leaves a margin of ~4x and still refuses any other resize rule
# (align_corners=True moves the outputs by 0.2 of their scale, fixture README section 5).
RESIZE_REL_TOL = 1e-6


class LeanError(ValueError):
    """A source folder or file that cannot be turned into the lean form."""


def resize_heads(heads: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The official final resize: bilinear, ``align_corners=False``."""
    return F.interpolate(heads, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def lean_model_fixture(fx: dict, stride: int = DEFAULT_STRIDE, source: str = "fixture") -> dict:
    """The lean form of one model fixture dict (see the module docstring); refuses outputs that are not the resize."""
    outputs, heads = fx["outputs"], fx["head_outputs_before_resize"]
    if set(outputs) != set(heads):
        raise LeanError(f"{source}: outputs and head_outputs_before_resize name different tasks")
    lean: dict = {
        "stride": int(stride),
        "resize": "bilinear, align_corners=False, from head_outputs_before_resize to shape[2:]",
        "shape": {},
        "subsample": {},
        "resize_of_heads_max_abs_diff": {},
    }
    for t, full in outputs.items():
        resized = resize_heads(heads[t], full.shape[-2:])
        diff = float((resized.double() - full.double()).abs().max())
        scale = max(1.0, float(full.abs().max()))
        if diff > RESIZE_REL_TOL * scale:
            raise LeanError(
                f"{source}: outputs[{t!r}] is not the bilinear resize of its head output (max diff {diff:.3g} > "
                f"{RESIZE_REL_TOL * scale:.3g}); keep the full file"
            )
        lean["shape"][t] = [int(s) for s in full.shape]
        lean["subsample"][t] = full[:, :, ::stride, ::stride].clone()
        lean["resize_of_heads_max_abs_diff"][t] = diff
    out = {k: v for k, v in fx.items() if k != "outputs"}
    out["outputs_lean"] = lean
    return out


def _atomic_save(obj: object, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(dst)


def make_lean(src: Path, dst: Path, stride: int = DEFAULT_STRIDE) -> list[str]:
    """Write the lean form of fixture folder ``src`` into ``dst``; returns one line per file written.

    Every model file is converted (and checked) before anything is written, so a refused file leaves ``dst``
    as it was.
    """
    if not src.is_dir():
        raise LeanError(f"fixture folder not found: {src}")
    plan: list[tuple[Path, object]] = []  # (source path, lean dict or None to copy as it is)
    for path in sorted(src.iterdir()):
        if path.is_dir() or path.suffix != ".pt":
            if path.is_dir():
                plan.append((path, None))
            continue
        try:
            fx = safe_load(path, "fixture")
        except CheckpointError as e:
            raise LeanError(str(e)) from None
        lean = None
        if isinstance(fx, dict) and "outputs" in fx and "head_outputs_before_resize" in fx:
            lean = lean_model_fixture(fx, stride, str(path))
        plan.append((path, lean))
    if not plan:
        raise LeanError(f"no fixture files (*.pt) in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    lines = []
    for path, lean in plan:
        target = dst / path.name
        if path.is_dir():
            tmp = dst / f".{path.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.replace(target)
            lines.append(f"copied folder {path.name}/")
        elif lean is not None:
            _atomic_save(lean, target)
            lines.append(
                f"lean {path.name}: {path.stat().st_size / 1e6:.1f} MB -> {target.stat().st_size / 1e6:.1f} MB"
            )
        else:
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(target)
            lines.append(f"copied {path.name}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.lean_fixtures", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="folder of official fixtures (full form)")
    parser.add_argument(
        "dst", type=Path, help="folder to write the lean form into (e.g. tests/fixtures/official_parity)"
    )
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE, help="subsample step of the full outputs")
    args = parser.parse_args(argv)
    if args.stride < 1:
        print(f"error: --stride must be >= 1, got {args.stride}", file=sys.stderr)
        return 2
    try:
        for line in make_lean(args.src, args.dst, args.stride):
            print(line)
    except LeanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
