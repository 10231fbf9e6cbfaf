"""Run presets: how much of the protocol a run executes (stdlib only).

``paper`` is the protocol exactly. Every other preset shortens or shrinks something and therefore marks its
results ``debug``, so they can never reach a leaderboard table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmark.protocol import Protocol


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: str | None  # None = the protocol's backbone
    image_size: int | None  # None = the protocol's image size
    batch_size: int | None  # total over processes; None = the protocol's
    epochs: int | None  # None = the protocol's
    val_interval: int | None  # epochs; None = the protocol's
    workers: int
    debug: bool  # results are marked "debug"
    synthetic_train: int = 0  # generate a dataset of this size when --data is not given (0: data required)
    synthetic_val: int = 0
    peak_lr: float | None = None  # None = the protocol's batch-size rule
    warmup_epochs: float | None = None
    log_interval: int = 50
    description: str = ""
    # per protocol name, the fields whose value differs for that protocol (e.g. {"nyud": {"image_size": 96}})
    per_protocol: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def for_protocol(self, name: str) -> Preset:
        """This preset with the values it declares for protocol ``name``."""
        return dataclasses.replace(self, **self.per_protocol.get(name, {}))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="paper",
            backbone=None,
            image_size=None,
            batch_size=None,
            epochs=None,
            val_interval=None,
            workers=4,
            debug=False,
            description="the protocol exactly: Swin-T, 448x448, batch 32, 300 epochs, official schedule",
        ),
        Preset(
            name="smoke",
            backbone="swin_micro",
            image_size=64,
            batch_size=4,
            epochs=8,
            val_interval=2,
            workers=0,
            debug=True,
            synthetic_train=96,
            synthetic_val=24,
            peak_lr=1e-3,
            warmup_epochs=0.5,
            log_interval=8,
            description="tiny Swin at 64 px on a generated dataset, 8 epochs on CPU in about a minute (debug)",
        ),
        Preset(
            name="tiny",
            backbone="swin_micro",
            image_size=64,
            batch_size=4,
            epochs=2,
            val_interval=1,
            workers=0,
            debug=True,
            synthetic_train=16,
            synthetic_val=8,
            peak_lr=1e-3,
            warmup_epochs=0.5,
            log_interval=2,
            description="the smallest end-to-end run, for tests: 16 generated images, 2 epochs (debug)",
        ),
    )
}


@dataclass(frozen=True)
class RunSettings:
    """A preset resolved against a protocol (and CLI overrides)."""

    preset: str
    backbone: str
    image_size: int
    batch_size: int
    epochs: int
    val_interval: int
    workers: int
    debug: bool
    peak_lr: float | None
    warmup_epochs: float
    log_interval: int
    synthetic_train: int
    synthetic_val: int


def resolve(
    protocol: Protocol, preset: Preset, epochs: int | None = None, image_size: int | None = None
) -> RunSettings:
    """Fill the preset (its values for this protocol) from the protocol; overriding epochs or the image size away
    from it makes a run debug."""
    preset = preset.for_protocol(protocol.name)
    off_protocol = (epochs is not None and epochs != protocol.epochs) or (
        image_size is not None and image_size != protocol.image_size
    )
    return RunSettings(
        preset=preset.name,
        backbone=preset.backbone or protocol.backbone,
        image_size=image_size or preset.image_size or protocol.image_size,
        batch_size=preset.batch_size or protocol.batch_size,
        epochs=epochs or preset.epochs or protocol.epochs,
        val_interval=preset.val_interval or protocol.eval_interval,
        workers=preset.workers,
        debug=preset.debug or off_protocol,
        peak_lr=preset.peak_lr,
        warmup_epochs=protocol.warmup_epochs if preset.warmup_epochs is None else preset.warmup_epochs,
        log_interval=preset.log_interval,
        synthetic_train=preset.synthetic_train,
        synthetic_val=preset.synthetic_val,
    )
