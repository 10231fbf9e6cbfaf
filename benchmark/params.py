"""One parameter-accounting rule for every method (the official MTLoRA one, docs/protocol.md 3.5).

- ``decoders``: every parameter whose name lacks "backbone" (trainable or not), as the official code;
- ``adapter``: trainable backbone parameters added by the method (names containing one of its markers);
- ``other_trainable_backbone``: trainable - adapter - trainable decoders (norms, biases, merging, ...);
- ``trainable``: every parameter with ``requires_grad``;
- ``total``: every parameter, adapters included.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def count_parameters(model: nn.Module, adapter_markers: Iterable[str] = ()) -> dict[str, int]:
    markers = tuple(adapter_markers)
    decoders = adapter = trainable = total = trainable_decoders = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        in_backbone = "backbone" in name
        if not in_backbone:
            decoders += n
        if p.requires_grad:
            trainable += n
            if not in_backbone:
                trainable_decoders += n
            elif any(m in name for m in markers):
                adapter += n
    return {
        "decoders": decoders,
        "adapter": adapter,
        "other_trainable_backbone": trainable - adapter - trainable_decoders,
        "trainable": trainable,
        "total": total,
    }
