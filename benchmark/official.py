"""Official MTLoRA checkpoints and parity with the official implementation.

- ``load_official_state_dict``: an official ``MultiTaskSwin`` state dict (scale-lab/MTLoRA) onto this
  project's model (key naming: tests/fixtures/README.md, docs/protocol.md 8);
- ``load_pretrained_backbone``: ImageNet Swin weights (timm or original Microsoft release format);
- ``build_from_fixture_config``: this implementation built from a parity fixture's ``config`` dict (the method
  part through the registry entry that claims the fixture, ``MethodSpec.official``: no method is imported here);
- ``parity_checks``: a ``model_*.pt`` fixture (and its ``model_*_grad.pt`` companion) against this code.

Official -> local key mapping:

=====================================================  =============================================
official                                               local
=====================================================  =============================================
``backbone.X.linear.{weight,bias}``                    ``backbone.swin.X.{weight,bias}``
``backbone.layers.i.downsample.*``                     ``backbone.swin.layers.{i+1}.downsample.*``
``backbone.*lora_shared_A`` / ``lora_tasks_A.<t>``     same name under ``backbone.swin.``
``backbone.*relative_position_index``, ``attn_mask``   dropped (recomputed by timm, identical values)
``downsampler.<t>.downsample_k.weight``                ``decoders.<t>.proj.k.weight``
``decoders.decoders.<t>.last_layer.k.*``               ``decoders.<t>.head.k.*``
=====================================================  =============================================
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.backbones import SwinConfig
from benchmark.checkpoints import (
    STRUCTURAL_BUFFERS,
    read_weights,
    refuse_incomplete,
)
from benchmark.method_api import METHODS
from benchmark.model import ModelConfig, MultiTaskModel
from benchmark.params import count_parameters
from benchmark.parity import Check
from benchmark.safeload import CheckpointError, safe_load

# Parity tolerance (fixture README section 5): the official model in float64 vs its stored float32
# outputs differs by up to 1.03e-5 absolute at an output scale of ~9 (1.4e-6 relative L2): a correct
# float32 re-implementation lands within 1e-5 of the largest magnitude. Injected mistakes move the
# outputs by >= 7e-4 relative (tanh GELU), most by 1e-2 or more.
REL_TOL = 1e-5
# Gradients: the fixture gives no noise floor for them, so the yardstick is this harness's own float64 run of the
# same step (same weights, input and targets). For each tensor, r_t = max|g32 - g64| / max|g64| is the relative
# fp32 error of this backward in that tensor: reduction noise plus its discontinuities (ReLU units of the decoder
# heads whose pre-activation is within rounding of 0 flip, each flip moving the gradients upstream of it by a
# discrete amount; r_t reaches ~1e-2 in the head convs). The official gradient is another fp32 evaluation with
# the same kind of error, so |ours - official| <= |ours - exact| + |exact - official| ~ 2 r_t max|g|; one measured
# r_t is a single sample of that error, hence GRAD_K = 3 (as for the training-loop checks,
# benchmark/official_train.py). The absolute floor, for gradients that are sums of cancelling terms (and for
# tensors whose exact gradient is 0, such as conv biases before a BatchNorm, whose fp32 values are pure rounding):
# 16 fp32 ulps (2**-24 each) of the global gradient norm, the size of the terms that cancel: 16 * 6e-8 ~ 1e-6.
# Backward mistakes (a missing or extra path, a wrong scale) move gradients by O(1e-2..1) of their scale.
# Where the gradient fixture records the official run's own fp32-vs-fp64 drift (``reproducibility``), that term
# is not assumed equal to ours but added as recorded (_official_drift): |exact - official| is at most the
# recorded max-abs drift of that tensor, else at most its L2 drift, <= max_rel_l2 over params * ||g||_2; for the
# global norm it is |official fp32 - official fp64| exactly. Without it, another CPU's kernels expose the
# official run's rounding (TADFormer: its fp32 global norm is 5.5e-6 relative off its fp64 one, ours 2.4e-7).
GRAD_K = 3.0
GLOBAL_NORM = "<global gradient norm>"
GRAD_ABS_FLOOR = 1e-6


@dataclass
class LoadReport:
    """What a checkpoint load placed where."""

    loaded: list[str] = field(default_factory=list)  # model keys filled from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys that could not be placed
    missing: list[str] = field(default_factory=list)  # model keys left unfilled
    ignored: list[str] = field(default_factory=list)  # checkpoint keys dropped on purpose (buffers, head)

    @property
    def complete(self) -> bool:
        return not self.unexpected and not self.missing

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" ... (+{len(xs) - 5})" if len(xs) > 5 else "")

        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unplaced checkpoint keys: {few(self.unexpected)}")
        if self.missing:
            parts.append(f"{len(self.missing)} model keys not in the checkpoint: {few(self.missing)}")
        return "; ".join(parts)


# --------------------------------------------------------------------------- reading checkpoint files


def _state_dict_of(obj: Any, source: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{source}: expected a state dict (or {{'model': state_dict}}), got {type(obj).__name__}"
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"{source}: the state dict holds no tensors")
    return sd


# --------------------------------------------------------------------------- official -> local keys

_DROP = STRUCTURAL_BUFFERS


def official_to_local_key(key: str) -> str | None:
    """The local name of an official state-dict key; None for buffers that are recomputed (dropped)."""
    if key.rsplit(".", 1)[-1] in _DROP:
        return None
    if key.startswith("backbone."):
        k = key[len("backbone.") :]
        k = k.replace(".linear.", ".")
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        return "backbone.swin." + k
    m = re.match(r"^downsampler\.([^.]+)\.downsample_(\d+)\.(.+)$", key)
    if m:
        return f"decoders.{m.group(1)}.proj.{m.group(2)}.{m.group(3)}"
    m = re.match(r"^decoders\.decoders\.([^.]+)\.last_layer\.(.+)$", key)
    if m:
        return f"decoders.{m.group(1)}.head.{m.group(2)}"
    return key


def to_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """This model's state dict under the official names (the inverse of ``official_to_local_key``).

    Linears that a registered method's ``official.wraps_linear`` claims (MTLoRA's layers) get the official
    ``.linear.`` infix; structural buffers are not included.
    """
    wraps = [s.official.wraps_linear for s in METHODS.specs() if s.official is not None]
    wrapped = {name for name, m in model.named_modules() if any(w(m) for w in wraps)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in wrapped and leaf in ("weight", "bias"):
            key = f"{module}.linear.{leaf}"
        if key.startswith("backbone.swin."):
            k = key[len("backbone.swin.") :]
            k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
            key = "backbone." + k
        else:
            m = re.match(r"^decoders\.([^.]+)\.proj\.(\d+)\.(.+)$", key)
            if m:
                key = f"downsampler.{m.group(1)}.downsample_{m.group(2)}.{m.group(3)}"
            m = re.match(r"^decoders\.([^.]+)\.head\.(.+)$", key)
            if m:
                key = f"decoders.decoders.{m.group(1)}.last_layer.{m.group(2)}"
        out[key] = value
    return out


def load_official_state_dict(
    model: nn.Module, state_dict: Mapping[str, Any] | str | Path, source: str | None = None
) -> LoadReport:
    """Load an official MTLoRA (``MultiTaskSwin``) state dict, a ``{'model': ...}`` dict or such a file.

    Every key is mapped (see the module docstring) and shape-checked; structural buffers are dropped.
    Raises ``CheckpointError`` when shapes disagree or nothing matches (another architecture).
    """
    source = source or (str(state_dict) if isinstance(state_dict, (str, Path)) else "state dict")
    raw = read_weights(state_dict) if isinstance(state_dict, (str, Path)) else state_dict
    sd = _state_dict_of(raw, source)
    own = model.state_dict()
    report = LoadReport()
    mapped: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key, value in sd.items():
        local = official_to_local_key(key)
        if local is None:
            report.ignored.append(key)
        elif local not in own:
            report.unexpected.append(key)
        elif own[local].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} -> {local} {tuple(own[local].shape)}")
        else:
            mapped[local] = value
    if mismatched:
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensors have the wrong shape for this model (another architecture "
            f"or configuration?): " + "; ".join(mismatched[:5])
        )
    if not mapped:
        raise CheckpointError(
            f"{source}: none of its {len(sd)} keys matches this model (first keys: {list(sd)[:3]}); "
            "is it an official MTLoRA checkpoint?"
        )
    model.load_state_dict(mapped, strict=False)
    report.loaded = sorted(mapped)
    report.missing = sorted(set(own) - set(mapped))
    return report


def load_pretrained_backbone(backbone: nn.Module, path: str | Path) -> LoadReport:
    """ImageNet Swin weights into a backbone with a timm ``swin`` (plain, or with MTLoRA layers).

    Accepts timm checkpoints and the original release (``{'model': ...}`` with ``layers.i.downsample``,
    ``head.*``); the classifier and the final norm are ignored (the official backbone has neither).
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    swin = getattr(backbone, "swin", None)
    if swin is None:
        raise ValueError(f"load_pretrained_backbone: {type(backbone).__name__} has no timm 'swin' module")
    sd = _state_dict_of(read_weights(path), str(path))
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    report = LoadReport()
    # buffers timm recomputes, and the classifier / final norm the official backbone does not have
    report.ignored = sorted(k for k in sd if k.rsplit(".", 1)[-1] in _DROP or k.startswith(("head.", "norm.")))
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "norm."))}
    try:
        sd = checkpoint_filter_fn(sd, swin)  # moves downsample one stage, renames head, resizes tables
    except Exception as e:
        raise CheckpointError(f"{path}: does not fit this Swin backbone (another variant?): {e}") from None
    own = swin.state_dict()
    mapped: dict[str, Tensor] = {}
    mismatched = []
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            mapped[k] = v
    if mismatched:
        raise CheckpointError(
            f"{path}: does not fit this Swin backbone, {len(mismatched)} tensors differ in shape: "
            + "; ".join(mismatched[:5])
        )
    if not mapped:
        raise CheckpointError(f"{path}: no key matches a Swin backbone (first keys: {list(sd)[:3]})")
    # every backbone weight must come from the file: only the classifier / final norm (absent from this
    # backbone), the recomputed structural buffers and LoRA weights of an already adapted backbone may be left out
    unset = {k for k in own if k not in mapped and k.rsplit(".", 1)[-1] not in _DROP and ".lora_" not in k}
    refuse_incomplete(f"--pretrained {path}", unset, "Swin backbone weight(s) are")
    swin.load_state_dict(mapped, strict=False)
    report.loaded = sorted(mapped)
    report.missing = sorted(set(own) - set(mapped))
    return report


# --------------------------------------------------------------------------- building from a fixture config


def _need(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        raise ValueError(f"fixture config: missing field {key!r}")
    return config[key]


def build_from_fixture_config(
    config: Mapping[str, Any],
    drop_path_rate: float | None = None,
    lora_dropout: float | None = None,
) -> tuple[MultiTaskModel, Any]:
    """This implementation of the model a fixture's ``config`` describes; returns (model, method config).

    Every size, rank, scale, task and layer set is read from ``config``; anything this implementation
    cannot represent is a ValueError. ``drop_path_rate`` / ``lora_dropout`` override the training-only
    noise (the gradient fixtures run with both at 0). The registered method whose ``official.claims`` accepts
    ``config`` reads its own fields (``OfficialSupport.config_from_fixture``).
    """
    unsupported = {
        "absolute_pos_embed": (config.get("absolute_pos_embed", False), False),
        "final_backbone_norm": (config.get("final_backbone_norm", False), False),
        "patch_embed_norm": (config.get("patch_embed_norm", True), True),
    }
    for key, (got, want) in unsupported.items():
        if bool(got) != want:
            raise ValueError(f"fixture config: {key}={got!r} is not supported (expected {want!r})")
    scale_rule = str(config.get("attention_scale", "head_dim ** -0.5")).replace(" ", "")
    if scale_rule != "head_dim**-0.5":
        raise ValueError(f"fixture config: attention_scale {config['attention_scale']!r} is not supported")
    act = str(config.get("mlp_activation", "GELU (exact erf form)")).lower()
    if "gelu" not in act or "tanh" in act:
        raise ValueError(f"fixture config: mlp_activation {config['mlp_activation']!r} is not supported (exact GELU)")

    depths = tuple(int(d) for d in _need(config, "depths"))
    claimed = [spec for spec in METHODS.specs() if spec.official is not None and spec.official.claims(config)]
    if len(claimed) != 1:
        who = ", ".join(spec.name for spec in claimed) or "no registered method"
        raise ValueError(f"fixture config: {who} claims this fixture (expected exactly one method)")
    official = claimed[0].official
    assert official is not None
    swin = SwinConfig(
        embed_dim=int(_need(config, "embed_dim")),
        depths=depths,
        num_heads=tuple(int(h) for h in _need(config, "num_heads")),
        window_size=int(_need(config, "window_size")),
        patch_size=int(config.get("patch_size", 4)),
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
        qkv_bias=bool(config.get("qkv_bias", True)),
        in_chans=int(config.get("in_chans", 3)),
        img_size=int(_need(config, "img_size")),
        drop_path_rate=float(
            config.get("drop_path_rate_train_only", 0.0) if drop_path_rate is None else drop_path_rate
        ),
    )
    method_cfg = official.config_from_fixture(config, lora_dropout)
    (spec,) = [s for s in METHODS.specs() if s.config_cls is type(method_cfg)]
    tasks = list(_need(config, "tasks"))
    num_outputs = dict(_need(config, "num_outputs"))
    missing = [t for t in tasks if t not in num_outputs]
    if missing:
        raise ValueError(f"fixture config: num_outputs lacks {missing}")
    dec = dict(config.get("decoder", {}))
    if "hrnet" not in str(dec.get("type", "HRNet")).lower():
        raise ValueError(f"fixture config: decoder type {dec['type']!r} is not supported (HRNet-style head only)")
    channels = tuple(int(c) for c in dec.get("downsampler_channels", (18, 36, 72, 144)))
    if "head_in_channels" in dec and int(dec["head_in_channels"]) != sum(channels):
        raise ValueError(f"fixture config: decoder.head_in_channels {dec['head_in_channels']} != sum{channels}")
    model_cfg = ModelConfig(
        backbone=swin,
        tasks={t: int(num_outputs[t]) for t in tasks},
        decoder_channels=channels,
        head_channels=int(dec.get("head_hidden_channels", 4 * sum(channels))),
        bn_momentum=float(config.get("batch_norm_momentum", 0.1)),
    )
    model = MultiTaskModel(model_cfg)
    for m in model.modules():  # eps are not ModelConfig fields: set them on the modules
        if isinstance(m, nn.LayerNorm):
            m.eps = float(config.get("layer_norm_eps", 1e-5))
        elif isinstance(m, nn.BatchNorm2d):
            m.eps = float(config.get("batch_norm_eps", 1e-5))
    model = spec.apply(model, method_cfg)
    eps = float(config.get("layer_norm_eps", 1e-5))
    for m in model.modules():  # the LayerNorms a method adds (TADFormer's prompt_layernorm)
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    return model, method_cfg


# --------------------------------------------------------------------------- parity


def _scale(ref: Tensor) -> float:
    return max(1.0, float(ref.abs().max())) if ref.numel() else 1.0


def _compare(name: str, ours: Tensor, ref: Tensor, rel: float = REL_TOL) -> Check:
    """max|ours - ref| against rel * max(1, max|ref|)."""
    if tuple(ours.shape) != tuple(ref.shape):
        return Check(name, math.inf, 0.0, False, f"shape {tuple(ours.shape)} != official {tuple(ref.shape)}")
    diff = float((ours.detach().cpu().double() - ref.double()).abs().max()) if ref.numel() else 0.0
    tol = rel * _scale(ref)
    return Check(name, diff, tol, diff <= tol, f"max|ref|={float(ref.abs().max()):.4g}")


def _compare_summary(name: str, ours: Tensor, summary: Mapping[str, Any]) -> Check:
    """A debug-intermediate tensor [B, L, C] against its stored shape, per-image l2 / mean and slice.

    max_diff is the largest relative deviation: slice and mean differences over the feature scale
    max(1, max|ref slice|, rms), the l2 difference over the reference l2.
    """
    shape = tuple(int(s) for s in summary["shape"])
    if tuple(ours.shape) != shape:
        return Check(name, math.inf, REL_TOL, False, f"shape {tuple(ours.shape)} != official {shape}")
    x = ours.detach().cpu().double()
    b = shape[0]
    flat = x.reshape(b, -1)
    l2 = flat.norm(dim=1)
    mean = flat.mean(dim=1)
    ref_l2 = torch.tensor(summary["l2_per_image"], dtype=torch.float64)
    ref_mean = torch.tensor(summary["mean_per_image"], dtype=torch.float64)
    ref_slice = summary["slice_first16tokens_first8ch"].double()
    n_tok, n_ch = ref_slice.shape[1], ref_slice.shape[2]
    rms = float(ref_l2.max()) / math.sqrt(flat.shape[1])
    scale = max(1.0, float(ref_slice.abs().max()), rms)
    d_slice = float((x[:, :n_tok, :n_ch] - ref_slice).abs().max()) / scale
    d_mean = float((mean - ref_mean).abs().max()) / scale
    d_l2 = float(((l2 - ref_l2).abs() / ref_l2.clamp_min(1e-12)).max())
    worst = max(d_slice, d_mean, d_l2)
    detail = f"rel: slice {d_slice:.2e}, mean {d_mean:.2e}, l2 {d_l2:.2e} (scale {scale:.3g})"
    return Check(name, worst, REL_TOL, worst <= REL_TOL, detail)


def _exact(name: str, ok: bool, detail: str = "") -> Check:
    return Check(name, 0.0 if ok else 1.0, 0.0, ok, detail)


def _set_check(name: str, ours: set[str], ref: set[str]) -> Check:
    extra, lacking = sorted(ours - ref), sorted(ref - ours)
    detail = ""
    if extra or lacking:
        detail = f"only here: {extra[:5]}{' ...' if len(extra) > 5 else ''}; only official: {lacking[:5]}"
    return Check(name, float(len(extra) + len(lacking)), 0.0, not extra and not lacking, detail)


def _geometry_checks(stem: str, model: MultiTaskModel, config: Mapping[str, Any]) -> list[Check]:
    checks = []
    expected = config.get("effective_window_and_shift_per_block")
    if expected is not None:
        ours = [
            [[int(blk.window_size[0]), int(blk.shift_size[0])] for blk in layer.blocks]
            for layer in model.backbone.layers
        ]
        want = [[[int(w), int(s)] for w, s in stage] for stage in expected]
        checks.append(_exact(f"{stem}/config/window_and_shift", ours == want, f"ours {ours} vs {want}"))
    swin = model.cfg.backbone
    if "stage_dims" in config:
        ours_d, want_d = list(swin.stage_dims), [int(c) for c in config["stage_dims"]]
        checks.append(_exact(f"{stem}/config/stage_dims", ours_d == want_d, f"{ours_d} vs {want_d}"))
    if "decoder_input_grid" in config:
        grid, n = swin.img_size // swin.patch_size, len(swin.depths)
        ours_g = [grid // 2 ** min(i + 1, n - 1) for i in range(n)]
        want_g = [int(g) for g in config["decoder_input_grid"]]
        checks.append(_exact(f"{stem}/config/decoder_input_grid", ours_g == want_g, f"{ours_g} vs {want_g}"))
    if "decoder_input_channels" in config:
        ours_c = list(model.backbone.feature_channels)
        want_c = [int(c) for c in config["decoder_input_channels"]]
        checks.append(_exact(f"{stem}/config/decoder_input_channels", ours_c == want_c, f"{ours_c} vs {want_c}"))
    return checks


def output_checks(
    stem: str, outputs: Mapping[str, Tensor], heads: Mapping[str, Tensor], fx: Mapping[str, Any]
) -> list[Check]:
    """This implementation's eval outputs (and pre-resize head outputs) against a model fixture, full or lean form.

    Full form: every pixel of ``outputs``. Lean form (``benchmark.lean_fixtures``): every pixel against the official
    resize of the official heads, plus the official full-resolution values at the subsampled pixels. The resize
    term of the tolerance is the fp32 rounding of that resize as measured when the lean file was made.
    """
    checks = []
    if "outputs" in fx:
        for t, ref in fx["outputs"].items():
            checks.append(_compare(f"{stem}/outputs/{t}", outputs[t], ref))
    else:
        from benchmark.lean_fixtures import resize_heads

        lean = fx["outputs_lean"]
        s = int(lean["stride"])
        for t, sub in lean["subsample"].items():
            shape = tuple(int(x) for x in lean["shape"][t])
            ours = outputs[t]
            if tuple(ours.shape) != shape:
                checks.append(
                    Check(f"{stem}/outputs/{t}", math.inf, 0.0, False, f"shape {tuple(ours.shape)} != {shape}")
                )
                continue
            ref_full = resize_heads(fx["head_outputs_before_resize"][t], shape[-2:])
            c = _compare(f"{stem}/outputs/{t}", ours, ref_full)
            extra = float(lean["resize_of_heads_max_abs_diff"][t])
            checks.append(
                replace(
                    c,
                    tol=c.tol + extra,
                    passed=c.max_diff <= c.tol + extra,
                    detail=c.detail + f"; every pixel vs resize of official heads (+{extra:.3g} resize rounding)",
                )
            )
            c = _compare(f"{stem}/outputs_subsample/{t}", ours[:, :, ::s, ::s], sub)
            checks.append(replace(c, detail=c.detail + f"; official full-resolution values at stride {s}"))
    for t, ref in fx.get("head_outputs_before_resize", {}).items():
        checks.append(_compare(f"{stem}/head_outputs_before_resize/{t}", heads[t], ref))
    return checks


def _official_trainable_names(names: list[str]) -> set[str]:
    return {k for k in (official_to_local_key(n) for n in names) if k is not None}


def parity_checks(model_fixture_path: Path, device: str = "cpu") -> list[Check]:
    """Every comparison between this implementation and one official model fixture (+ its grad companion),
    the model run on ``device`` in fp32. On CUDA, TF32 is switched off for the duration: the fixture's
    tolerances are those of an fp32 implementation (TF32 products carry a 10-bit mantissa, ~5e-4 relative)."""
    with strict_fp32(device):
        return _parity_checks(Path(model_fixture_path), torch.device(device))


@contextlib.contextmanager
def strict_fp32(device: str | torch.device = "cuda") -> Iterator[None]:
    """TF32 off for CUDA matrix products and convolutions inside the block (restored after); nothing on the CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _parity_checks(model_fixture_path: Path, device: torch.device) -> list[Check]:
    path = Path(model_fixture_path)
    if not path.is_file():
        raise FileNotFoundError(f"model fixture {path} does not exist")
    fx = safe_load(path, "model fixture")
    for key in ("config", "state_dict", "input"):
        if key not in fx:
            raise ValueError(f"model fixture {path}: missing key {key!r}")
    if "outputs" not in fx and "outputs_lean" not in fx:
        raise ValueError(f"model fixture {path}: missing key 'outputs' (full form) or 'outputs_lean' (lean form)")
    stem = path.stem
    config = fx["config"]
    model, cfg = build_from_fixture_config(config)
    checks = _geometry_checks(stem, model, config)
    report = load_official_state_dict(model, fx["state_dict"])
    checks.append(_exact(f"{stem}/load_state_dict", report.complete, report.summary()))
    model.to(device).eval()
    image = fx["input"].to(device)
    with torch.no_grad():
        outputs = model(image)
        feats = model.backbone(image)
        heads = {t: model.decoders[t](feats[t]) for t in model.tasks}
        patch_tokens, stages = model.backbone.forward_stages(image)
    checks += output_checks(stem, outputs, heads, fx)
    debug = fx.get("debug_intermediates")
    if debug:
        tokens = patch_tokens.flatten(1, 2)
        checks.append(_compare_summary(f"{stem}/debug/patch_embed_output", tokens, debug["patch_embed_output"]))
        n_ref = len(debug["stages"])
        checks.append(
            _exact(f"{stem}/debug/num_stages", len(stages) == n_ref, f"ours {len(stages)}, official {n_ref}")
        )
        for i, (st, ref) in enumerate(zip(stages, debug["stages"], strict=False)):
            checks.append(_compare_summary(f"{stem}/debug/stage{i}/shared", st.shared.flatten(1, 2), ref["shared"]))
            for k, t in enumerate(model.tasks):
                if t in ref.get("tasks", {}):
                    f = st.shared if st.tasks is None else st.tasks[k]
                    checks.append(_compare_summary(f"{stem}/debug/stage{i}/{t}", f.flatten(1, 2), ref["tasks"][t]))
    checks += _trainable_checks(stem, model, fx.get("trainable"))
    grad_path = path.with_name(f"{stem}_grad.pt")
    if grad_path.is_file():
        checks += _grad_checks(grad_path, path, fx, device)
    return checks


def _trainable_checks(stem: str, model: nn.Module, trainable: Mapping[str, Any] | None) -> list[Check]:
    if not trainable:
        return []
    checks = []
    ours = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    ref_names = _official_trainable_names(list(trainable["names"]))
    checks.append(_set_check(f"{stem}/trainable/names", set(ours), ref_names))
    ref_numel = {official_to_local_key(k): int(v) for k, v in trainable.get("numel", {}).items()}
    bad = sorted(k for k, v in ref_numel.items() if ours.get(k) != v)
    checks.append(Check(f"{stem}/trainable/numel", float(len(bad)), 0.0, not bad, f"differ: {bad[:5]}"))
    counts = count_parameters(model, ("lora_",))
    ours_b = {
        "trainable": counts["trainable"],
        "decoder": counts["decoders"],
        "lora": counts["adapter"],
        "extra": counts["other_trainable_backbone"],
        "total": counts["total"],
        "total_without_lora": counts["total"] - counts["adapter"],
    }
    ref_b = dict(trainable.get("official_breakdown", {}))
    if "count_total_trainable" in trainable:
        ref_b.setdefault("trainable", trainable["count_total_trainable"])
    for k, v in ref_b.items():
        if k in ours_b:
            d = abs(ours_b[k] - int(v))
            checks.append(
                Check(f"{stem}/counts/{k}", float(d), 0.0, d == 0, f"ours {ours_b[k]:,} official {int(v):,}")
            )
    return checks


def fixture_loss(model: MultiTaskModel, weights: Mapping[str, Any], source: Path | str) -> nn.Module:
    """This harness's multi-task loss (the one a run trains with) for the model's tasks, with a fixture's weights."""
    from benchmark.losses import MultiTaskLoss
    from benchmark.protocol import PASCAL_CONTEXT, TaskSpec
    from benchmark.tasks import TASK_KINDS

    pascal = {s.name: s for s in PASCAL_CONTEXT.tasks}  # the official model fixtures are PASCAL-Context models
    unknown = [t for t in model.tasks if (t not in pascal and t not in TASK_KINDS) or t not in weights]
    if unknown:
        raise ValueError(f"{source}: no loss or loss weight for task(s) {unknown}")
    specs = [
        replace(pascal[t], loss_weight=float(weights[t]))
        if t in pascal
        else TaskSpec(t, t, "", True, model.cfg.tasks[t], float(weights[t]), False, t)
        for t in model.tasks
    ]
    return MultiTaskLoss(specs)


def _fp64_gradient_noise(
    fx: Mapping[str, Any], g: Mapping[str, Any], params: Mapping[str, nn.Parameter], source: Path
) -> dict[str, float]:
    """name -> r_t: max|g32 - g64| / max|g64| between this float32 backward (``params``' grads) and the same step
    run in float64 (see GRAD_K); 0 where the float64 gradient is 0. ``GLOBAL_NORM``: the same for the global norm."""
    model, _ = build_from_fixture_config(fx["config"], drop_path_rate=0.0, lora_dropout=0.0)
    load_official_state_dict(model, fx["state_dict"])
    model.double().train()
    loss_fn = fixture_loss(model, g["loss_weights"], source)
    targets = {t: v.to(torch.float64) for t, v in g["targets"].items()}
    loss_fn(model(fx["input"].double()), targets)["total"].backward()
    r, sq32, sq64 = {}, 0.0, 0.0
    for name, p64 in model.named_parameters():
        p32 = params.get(name)
        if p64.grad is None or p32 is None or p32.grad is None:
            continue
        scale = float(p64.grad.abs().max())
        g32 = p32.grad.cpu().double()
        r[name] = float((g32 - p64.grad).abs().max()) / scale if scale > 0 else 0.0
        sq32, sq64 = sq32 + float(g32.pow(2).sum()), sq64 + float(p64.grad.pow(2).sum())
    r[GLOBAL_NORM] = abs(math.sqrt(sq32) - math.sqrt(sq64)) / math.sqrt(sq64) if sq64 > 0 else 0.0
    return r


def _official_drift(repro: Mapping[str, Any], name: str, ref: Tensor) -> float:
    """The official fp32 gradient's own distance from exact arithmetic in tensor ``name`` (max abs), from the
    fixture's recorded figures: the tensor's measured fp32-vs-fp64 max-abs difference where recorded, else the
    bound max_rel_l2 (over params) * ||ref||_2 (a max-abs error is at most the L2 error); 0 without figures."""
    per_tensor = repro.get("max_abs_diff_grad_fp32_vs_fp64_representative", {})
    if name in per_tensor:
        return float(per_tensor[name])
    return float(repro.get("max_rel_l2_diff_grad_fp32_vs_fp64_over_params", 0.0)) * float(ref.double().norm())


def _grad_checks(
    grad_path: Path, model_path: Path, fx: Mapping[str, Any], device: torch.device | None = None
) -> list[Check]:
    device = device or torch.device("cpu")
    g = safe_load(grad_path, "gradient fixture")
    stem = grad_path.stem
    uses = g.get("uses_state_dict_and_input_of")
    if uses is not None and uses != model_path.name:
        raise ValueError(f"{grad_path}: uses_state_dict_and_input_of is {uses!r}, not {model_path.name!r}")
    model, _ = build_from_fixture_config(fx["config"], drop_path_rate=0.0, lora_dropout=0.0)
    load_official_state_dict(model, fx["state_dict"])
    model.train()
    loss_fn = fixture_loss(model, g["loss_weights"], grad_path)
    targets = {t: v.to(device, torch.float64) for t, v in g["targets"].items()}  # the official loader's dtype
    model.to(device).zero_grad(set_to_none=True)
    outputs = model(fx["input"].to(device))
    losses = loss_fn(outputs, targets)
    losses["total"].backward()

    checks = []
    for k, ref in g["loss"].items():
        ours = losses[k].item()
        d = abs(ours - float(ref))
        tol = REL_TOL * max(1.0, abs(float(ref)))
        checks.append(Check(f"{stem}/loss/{k}", d, tol, d <= tol, f"ours {ours:.10g} official {float(ref):.10g}"))
    if "loss_dtypes" in g:
        ours_dt = {k: str(losses[k].dtype).replace("torch.", "") for k in g["loss_dtypes"]}
        checks.append(_exact(f"{stem}/loss_dtypes", ours_dt == dict(g["loss_dtypes"]), f"{ours_dt}"))

    params = dict(model.named_parameters())
    ref_global = float(g.get("global_grad_l2_norm", 0.0))
    floor = GRAD_ABS_FLOOR * ref_global
    r = _fp64_gradient_noise(fx, g, params, grad_path)
    repro = g.get("reproducibility", {})
    for name, ref in g.get("grads", {}).items():
        p = params.get(official_to_local_key(name) or "")
        if p is None or p.grad is None:
            checks.append(_exact(f"{stem}/grad/{name}", False, "parameter missing or without gradient"))
            continue
        scale = float(ref.abs().max())
        diff = float((p.grad.cpu().double() - ref.double()).abs().max())
        r_t = r.get(official_to_local_key(name) or "", 0.0)
        theirs = _official_drift(repro, name, ref)
        tol = GRAD_K * r_t * scale + theirs + floor
        detail = (
            f"max|ref|={scale:.4g}; tol 3 r_t max|ref| + official drift + floor, r_t={r_t:.3g} (fp32 vs fp64 here), "
            f"official drift {theirs:.3g}, floor {floor:.3g}"
        )
        checks.append(Check(f"{stem}/grad/{name}", diff, tol, diff <= tol, detail))

    norms = g.get("grad_l2_norm_per_trainable_param", {})
    if norms:
        # max_diff: the worst |norm - ref| as a fraction of its own tolerance (3 r_t ref + floor); passes at <= 1
        worst, worst_name, none_mismatch = 0.0, "", []
        for name, ref in norms.items():
            p = params.get(official_to_local_key(name) or "")
            ours_n = None if p is None or p.grad is None else float(p.grad.double().norm())
            if (ref is None) != (ours_n is None):
                none_mismatch.append(name)
                continue
            if ref is None:
                continue
            theirs = float(repro.get("max_rel_l2_diff_grad_fp32_vs_fp64_over_params", 0.0)) * float(ref)
            frac = abs(ours_n - float(ref)) / (
                GRAD_K * r.get(official_to_local_key(name) or "", 0.0) * float(ref) + theirs + floor
            )
            if frac > worst:
                worst, worst_name = frac, name
        checks.append(
            Check(
                f"{stem}/grad_norms",
                worst,
                1.0,
                worst <= 1.0 and not none_mismatch,
                f"{len(norms)} params, worst {worst_name}; None where the official has a gradient or vice "
                f"versa: {none_mismatch[:5]}",
            )
        )
    if "trainable_params_without_grad" in g:
        ours_ng = {n for n, p in params.items() if p.requires_grad and p.grad is None}
        ref_ng = _official_trainable_names(list(g["trainable_params_without_grad"]))
        checks.append(_set_check(f"{stem}/trainable_without_grad", ours_ng, ref_ng))
    if "global_grad_l2_norm" in g:
        sq = sum(
            float(p.grad.double().pow(2).sum()) for p in params.values() if p.requires_grad and p.grad is not None
        )
        ours_g, ref_g = math.sqrt(sq), float(g["global_grad_l2_norm"])
        d = abs(ours_g - ref_g)
        theirs = abs(ref_g - float(repro["global_grad_l2_norm_fp64"])) if "global_grad_l2_norm_fp64" in repro else 0.0
        tol = GRAD_K * r[GLOBAL_NORM] * ref_g + theirs + floor
        detail = f"ours {ours_g:.10g} official {ref_g:.10g} (official fp32 vs fp64: {theirs:.3g})"
        checks.append(Check(f"{stem}/global_grad_norm", d, tol, d <= tol, detail))
    frozen = g.get("frozen_params_checked_no_grad", [])
    if frozen:
        bad = []
        for name in frozen:
            p = params.get(official_to_local_key(name) or "")
            if p is None or p.requires_grad or p.grad is not None:
                bad.append(name)
        checks.append(Check(f"{stem}/frozen_no_grad", float(len(bad)), 0.0, not bad, f"{bad[:5]}"))
    for t, stats in g.get("bn_running_stats_after_forward", {}).items():
        bn = model.decoders[t].head[1]
        for k in ("running_mean", "running_var"):
            checks.append(_compare(f"{stem}/bn/{t}/{k}", getattr(bn, k), stats[k]))
        nbt = int(stats["num_batches_tracked"])
        checks.append(_exact(f"{stem}/bn/{t}/num_batches_tracked", int(bn.num_batches_tracked) == nbt, f"{nbt}"))
    return checks
