"""Checkpoint files: this harness's own (written atomically, read back for resume and evaluation) and other
weights files (official and timm checkpoints), every one read through ``benchmark.safeload``'s restricted
loading (never an unrestricted unpickle)."""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.results import atomic_write_bytes
from benchmark.safeload import CheckpointError, safe_load  # one error type for every checkpoint problem

CKPT_FORMAT = "mtpeft-checkpoint"
CKPT_VERSION = 1
CKPT_PATTERN = re.compile(r"^epoch_(\d+)\.pth$")
# structural buffers every model recomputes (never required from a file)
STRUCTURAL_BUFFERS = ("relative_position_index", "attn_mask")
# meta fields that must match for --resume to continue a checkpoint (the rest of the meta is informative)
RESUME_KEYS = ("run_id", "protocol", "backbone", "image_size", "seed", "preset", "epochs", "batch_size")


class ResumeMismatchError(ValueError):
    """--resume found a checkpoint of a different run (settings differ): never silently continue or discard it."""


def trainable_state(net: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters plus every buffer (BatchNorm statistics): all a resume needs."""
    keep = {n for n, p in net.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in net.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k in keep}


def frozen_fingerprint(net: nn.Module) -> str:
    """sha256 over the frozen parameters: a checkpoint only fits the model it was trained from."""
    h = hashlib.sha256()
    for n, p in sorted(net.named_parameters()):
        if not p.requires_grad:
            h.update(n.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint file (ours or another's) read as a dict without running anything from it
    (``benchmark.safeload``); CheckpointError when it is missing, not loadable or not a dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    data = safe_load(path, "checkpoint")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(data).__name__}")
    return data


def is_own_checkpoint(data: Mapping[str, Any]) -> bool:
    return data.get("format") == CKPT_FORMAT


def load_model_state(net: nn.Module, ckpt: Mapping[str, Any], source: str) -> None:
    """Load one of our checkpoints into a freshly built model of the same method and config."""
    if ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{source}: checkpoint version {ckpt.get('version')!r}, expected {CKPT_VERSION}")
    state = ckpt["model"]
    own = net.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} checkpoint key(s) do not exist in this model "
            f"(another method or architecture?), e.g. {unexpected[:3]}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        )
    refuse_incomplete(source, required_state_keys(net) - set(state), "trained parameter(s) or buffer(s) are")
    fp = ckpt.get("frozen_fingerprint")
    if fp is not None and fp != frozen_fingerprint(net):
        raise CheckpointError(
            f"{source}: the frozen weights of this model differ from those the checkpoint was trained on "
            "(build it with the same --pretrained file and seed)"
        )
    net.load_state_dict(state, strict=False)


def check_resume_settings(ckpt: Mapping[str, Any], meta: Mapping[str, Any], path: Path) -> None:
    """Refuse to continue a checkpoint written by a run with other settings (another preset, epoch count, ...)."""
    diff = [
        f"{k} {ckpt[k]!r} (this run: {meta[k]!r})"
        for k in RESUME_KEYS
        if k in ckpt and k in meta and ckpt[k] != meta[k]
    ]
    if diff:
        raise ResumeMismatchError(
            f"--resume: {path} belongs to a different run: {'; '.join(diff)}. "
            "Use another --work-dir, or delete its checkpoints to start over"
        )


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    found = []
    for p in ckpt_dir.glob("epoch_*.pth"):
        m = CKPT_PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def read_weights(path: str | os.PathLike[str]) -> Any:
    """A file of weights as it is (a state dict, ``{'model': ...}``, an official or timm checkpoint) read with
    ``torch.load`` without running code from it (``benchmark.safeload``: weights-only, then the allow-list of an
    official checkpoint, whose yacs config is read as plain data)."""
    return safe_load(path, "checkpoint")


def required_state_keys(model: nn.Module) -> set[str]:
    """What a checkpoint must give for evaluation: every trained parameter and every buffer in the state dict,
    except the structural ones the model recomputes (relative position indices, attention masks)."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] not in STRUCTURAL_BUFFERS}
    return (trained | buffers) & set(model.state_dict())


def refuse_incomplete(source: str, missing: set[str] | list[str], what: str) -> None:
    """A CheckpointError listing what ``source`` leaves unset, when anything is."""
    if missing:
        names = sorted(missing)
        shown = ", ".join(names[:8]) + (f" ... (+{len(names) - 8} more)" if len(names) > 8 else "")
        raise CheckpointError(f"{source}: {len(names)} {what} missing from the file: {shown}")
