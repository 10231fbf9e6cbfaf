"""TADFormer (Baek et al., CVPR 2025): task-adaptive dynamic transformer on a shared-LoRA Swin.

What it changes in the model (the official code, commit 1f53b9f, a fork of the MTLoRA code; every formula below
is checked by ``python -m benchmark.parity tests/fixtures/tadformer_parity``):

- every ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` of every block gets one shared LoRA
  ``W x + b + s B A drop(x)`` (scale ``s`` a plain multiplier, 4.0; LoRA dropout on the shared input). There
  are no task-specific LoRA matrices;
- one learnable prompt token per task (rows in the order of the model's tasks) is normalised by each block's
  ``norm1``, copied into every window and prepended to it. Attention runs over prompts and patches; the
  relative-position bias and the shift mask touch only the patch-patch block. After ``attn.proj`` the prompt
  outputs are averaged over the windows of each image, ``P <- P + MLP(norm2(mean))`` (the block's own MLP and
  LoRA; the attention output is not a residual), and the prompts are lifted to the next stage by a bias-free
  ``task_prompts_up`` linear C -> 2C beside the patch merging;
- in the last block of every stage each task gets its own stream. Task-prompt conditioning (TPC): the raw
  scores ``q k^T`` of prompt t against the window's patches (unscaled, no bias, mask or softmax) go through
  GELU and modulate the attention output per head, ``M_t``; ``attn.proj`` of task t computes
  ``W O + b + s B F_t(A LN_p(O + M_t))``; fc1 and fc2 of task t use the frozen weight on the *shared* input and
  ``s B F_t(A u_t)`` on the task's own input. ``F_t`` is the task filter on the rank-r activations, per window
  in ``attn.proj`` and on the full stage grid in fc1/fc2;
- ``tadformer`` (the paper's filter): one dynamic task filter (DTF) per layer shared by the tasks, whose 3x3
  depth-wise kernels are generated per sample (window or image) and task stream from the pooled activation
  and normalised over their 9 taps; ``tadformer_release``: the released code's static per-task depth-wise 3x3
  convolution;
- a stage's task feature is ``sigmoid(g) K_t + (1 - sigmoid(g)) Z_t``: ``K_t`` is the skip feature (``M_t``
  stored channel-major and *reinterpreted* as token-major, the official memory layout, not a transpose),
  ``Z_t`` the task stream. It passes through the next patch merging (same weights as the shared stream) and
  feeds the task's decoder; the next stage only sees the shared stream;
- trainable: the LoRA factors and filters, everything named ``prompt``, the patch embedding, every LayerNorm,
  the relative-position tables and the decoders. The qkv/proj/fc1/fc2 base weights and the patch-merging
  reductions are frozen. At Swin-T, 448 px, 4 tasks this is 3,557,502 / 4,776,126 / 7,379,262 trainable for
  ``tadformer`` at r = 16 / 32 / 64 (the paper's 3.56 / 4.78 / 7.38 M, decoders included) and 3,532,350 /
  4,670,526 / 6,946,878 for ``tadformer_release``. In the breakdown, "adapter" is everything TADFormer adds
  (names with ``lora_`` or ``prompt``); the official script's "lora" field counts the ``lora_`` names only.

Implementation: the task streams are computed with the tasks stacked on a leading axis ([T, B, ...]); the
frozen products ``W x + b`` are computed once and shared by the shared and every task output, and the filters
run for all tasks at once (grouped convolutions). ``TADFormerBackbone.batched = False`` runs the filters, window
reversals and patch mergings of the task streams one task at a time (the reference path for tests). For evaluation the shared LoRA is folded
into the frozen weights (``benchmark.peft_tools.merge_for_eval``) of every layer except ``attn.proj``, ``mlp.fc1`` and
``mlp.fc2`` of the task-adapted blocks: their task streams need ``W`` and ``B``, ``A`` apart (``W x`` on the
shared input plus a filtered low-rank term), which a merged weight cannot give back exactly.

Deviations and readings of the official code that the fixtures cannot check (training-only behaviour):

- LoRA dropout in ``attn.proj`` of a task-adapted block: TPC works on the shared branch's dropped-out LoRA input
  (one mask): ``M_t = GELU(S_t) * drop(O)``, ``LN_p(drop(O) + M_t)`` and the skip feature from that ``M_t``, as the
  official layer applies the modulation inside the LoRA branch; the frozen ``W O`` sees the undropped ``O``. In
  fc1/fc2 the task inputs are not dropped out (the fixture config's ``lora_dropout_applies_to``);
- drop path: one draw per call, so the shared stream, every task stream (after attention and after the MLP)
  and the prompt update are dropped independently (the fixture config's ``training_only_notes``);
- the token grid must be a multiple of the window (``SwinConfig.validate`` guarantees it): the official block
  with prompts has no padding path;
- activation checkpointing (``--activation-checkpointing``) is an MTLoRA feature and not offered here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

from benchmark.backbones import Features, SwinBackbone
from benchmark.method_api import MethodConfig, OfficialSupport, register_method
from benchmark.peft_tools import freeze, unfreeze_matching
from methods.mtlora import (
    SHARED_TARGETS,
    MTLoRALinear,
    StageOutput,
    _drop_path_add,
    _per_task,
    _rel_pos_bias,
)

TASK_TARGETS = ("attn.proj", "mlp.fc1", "mlp.fc2")  # the task-adapted layers of a stage's last block
FILTERS = ("dynamic", "static")
FILTER_KERNEL = 3  # the official kernel size (odd sizes work the same way, with padding k // 2)
FILTER_NORM_EPS = 1e-10  # added to the unbiased standard deviation of the generated kernel taps (official)


@dataclass(frozen=True)
class TADFormerConfig(MethodConfig):
    """TADFormer hyper-parameters. Defaults: the paper's largest row (shared r=64, scale 4, dynamic filter)."""

    ALIASES: ClassVar[dict[str, str]] = {"rank": "shared_rank"}  # --set rank=16 -> shared_rank=(16, 16, 16, 16)

    shared_rank: tuple[int, ...] = (64, 64, 64, 64)  # shared LoRA rank (and filter width), one per Swin stage
    shared_scale: float = 4.0  # delta W = scale * B @ A (a plain multiplier, not alpha / rank)
    lora_dropout: float = 0.05  # on the shared LoRA input, training only
    # "dynamic": the paper's DTF, one per task-adapted layer shared by the tasks (tadformer);
    # "static": one depth-wise 3x3 convolution per task and layer, as released (tadformer_release)
    task_filter: str = "dynamic"
    filter_kernel: int = FILTER_KERNEL  # odd spatial size of the filter kernels (3 officially)
    # non-LoRA backbone parameters left trainable (name substrings), as the official freezing does
    extra_trainable: tuple[str, ...] = ("patch_embed", "norm", "relative_position_bias_table", "prompt")

    def validate(self, tasks: Sequence[str]) -> None:
        if not self.shared_rank:
            raise ValueError("TADFormer shared_rank: give one rank per Swin stage, got an empty list")
        bad = [r for r in self.shared_rank if not isinstance(r, int) or isinstance(r, bool) or r <= 0]
        if bad:
            raise ValueError(f"TADFormer shared_rank: ranks must be positive integers, got {list(self.shared_rank)}")
        if not math.isfinite(self.shared_scale):
            raise ValueError(f"TADFormer shared_scale: expected a finite number, got {self.shared_scale}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TADFormer lora_dropout: expected a probability in [0, 1), got {self.lora_dropout}")
        if not isinstance(self.filter_kernel, int) or self.filter_kernel < 1 or self.filter_kernel % 2 == 0:
            raise ValueError(f"TADFormer filter_kernel: expected an odd positive size, got {self.filter_kernel}")
        if self.task_filter not in FILTERS:
            raise ValueError(f"TADFormer task_filter: {self.task_filter!r} is not one of {list(FILTERS)}")

    def validate_for_backbone(self, depths: Sequence[int]) -> None:
        if len(self.shared_rank) != len(depths):
            raise ValueError(
                f"TADFormer shared_rank: got {len(self.shared_rank)} ranks {list(self.shared_rank)}, "
                f"the backbone has {len(depths)} stages (one rank per stage)"
            )


@dataclass(frozen=True)
class TADFormerReleaseConfig(TADFormerConfig):
    """TADFormer as released: a static depth-wise 3x3 filter per task and task-adapted layer."""

    task_filter: str = "static"


# --------------------------------------------------------------------------- task filters


class StaticTaskFilter(nn.Module):
    """One task's filter in the released code: a depth-wise 3x3 convolution with bias (``conv2d``)."""

    def __init__(self, rank: int, kernel: int = FILTER_KERNEL) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(rank, rank, kernel, padding=kernel // 2, groups=rank, bias=True)


class FilterNorm(nn.Module):
    """The DTF's per-(channel, tap) scale ``std`` and shift ``mean`` of the normalised kernels."""

    def __init__(self, size: int, kernel: int = FILTER_KERNEL) -> None:
        super().__init__()
        self.std = nn.Parameter(torch.empty(size))
        self.mean = nn.Parameter(torch.empty(size))
        with torch.no_grad():  # official init: N(0, 1) * calculate_gain("relu") / kernel_size, and N(0, 1)
            self.std.normal_().mul_(math.sqrt(2.0) / kernel)
            self.mean.normal_()


class DynamicTaskFilter(nn.Module):
    """The paper's dynamic task filter: per-sample depth-wise k x k kernels (3 x 3 officially) generated from the
    pooled input.

    For ``a`` [n, r, h, w]: ``k = conv(mean_hw(a))`` [n, k*k*r]; per (sample, channel) the k*k taps are normalised
    ``(k - mean) / (std_unbiased + 1e-10)``, then ``k * std + mean`` per (channel, tap) (``chan_FilterNorm``);
    the output is each sample's cross-correlation with its own kernels, zero padding k // 2, no bias.
    """

    def __init__(self, rank: int, kernel: int = FILTER_KERNEL) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(rank, kernel * kernel * rank, 1)
        self.chan_FilterNorm = FilterNorm(kernel * kernel * rank, kernel)  # the official name  # noqa: N815

    def kernels(self, a: Tensor) -> Tensor:
        n, r = a.shape[:2]
        taps = self.kernel * self.kernel
        k = F.linear(a.mean(dim=(2, 3)), self.conv.weight.flatten(1), self.conv.bias).view(n, r, taps)
        k = (k - k.mean(-1, keepdim=True)) / (k.std(-1, keepdim=True) + FILTER_NORM_EPS)
        k = k.flatten(1) * self.chan_FilterNorm.std + self.chan_FilterNorm.mean
        return k.view(n * r, 1, self.kernel, self.kernel)

    def forward(self, a: Tensor) -> Tensor:
        n, r, h, w = a.shape
        out = F.conv2d(a.reshape(1, n * r, h, w), self.kernels(a), padding=self.kernel // 2, groups=n * r)
        return out.view(n, r, h, w)


# --------------------------------------------------------------------------- the LoRA'd linear


class TADFormerLinear(MTLoRALinear):
    """A frozen ``nn.Linear`` with a shared LoRA (``MTLoRALinear`` without task LoRA), plus TADFormer's parts.

    ``prompt_layernorm`` (attn.proj of every block, as officially; used only in task-adapted blocks) and, in
    task-adapted layers, ``lora_filter``: a ``DynamicTaskFilter`` shared by the tasks, or a ``ModuleDict`` of one
    ``StaticTaskFilter`` per task. The names are the official ones (``benchmark.official`` maps them 1:1).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scale: float,
        dropout: float,
        prompt_norm: bool,
        task_filter: str | None,
        tasks: Sequence[str],
        filter_kernel: int = FILTER_KERNEL,
    ) -> None:
        super().__init__(base, shared_rank=rank, shared_scale=scale, dropout=dropout)
        if prompt_norm:
            self.prompt_layernorm = nn.LayerNorm(self.in_features)
        self.task_names = tuple(tasks)
        self.lora_filter: nn.Module | None = None
        if task_filter == "dynamic":
            self.lora_filter = DynamicTaskFilter(rank, filter_kernel)
        elif task_filter == "static":
            self.lora_filter = nn.ModuleDict({t: StaticTaskFilter(rank, filter_kernel) for t in self.task_names})

    @property
    def task_adapted(self) -> bool:
        return self.lora_filter is not None

    def merge(self) -> bool:
        """Fold the shared LoRA into ``weight``; task-adapted layers stay unmerged (their streams need ``W``,
        ``A`` and ``B`` apart)."""
        if self.task_adapted:
            return False
        return super().merge()

    def base_and_shared(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``pre = W x + b``, the shared output ``pre + s B A drop(x)`` and ``drop(x)`` (all [..., out/in])."""
        self._check_mode()
        pre = F.linear(x, self.weight, self.bias)
        xd = self._dropout(x)
        shared = pre + (xd @ self.lora_shared_A.t()) @ (self.lora_shared_B * self.shared_scale).t()
        return pre, shared, xd

    def codes(self, u: Tensor) -> Tensor:
        """The rank-r activations ``A u``."""
        return u @ self.lora_shared_A.t()

    def expand(self, pre: Tensor, codes: Tensor) -> Tensor:
        """``pre + s B codes`` for task codes [T, ..., r] (``pre`` [..., out], shared by the tasks)."""
        b = (self.lora_shared_B * self.shared_scale).t()
        n_tasks = codes.shape[0]
        out = torch.baddbmm(
            pre.reshape(1, -1, pre.shape[-1]).expand(n_tasks, -1, -1), codes.reshape(n_tasks, -1, codes.shape[-1]),
            b.unsqueeze(0).expand(n_tasks, -1, -1),
        )  # fmt: skip
        return out.view(n_tasks, *pre.shape)

    def filter(self, a: Tensor, batched: bool = True) -> Tensor:
        """The task filter on codes ``a`` [T, n, r, h, w] (task t's rows through task t's filter)."""
        assert self.lora_filter is not None
        n_tasks, n, r, h, w = a.shape
        filt = self.lora_filter
        if isinstance(filt, DynamicTaskFilter):
            if not batched:
                return torch.stack([filt(a[i]) for i in range(n_tasks)])
            return filt(a.reshape(n_tasks * n, r, h, w)).view(a.shape)
        convs = [filt[t].conv2d for t in self.task_names]  # type: ignore[index]
        if not batched:
            return torch.stack([c(a[i]) for i, c in enumerate(convs)])
        # every task's depth-wise conv at once: tasks become channel groups
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs])
        x = a.permute(1, 0, 2, 3, 4).reshape(n, n_tasks * r, h, w)
        y = F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=n_tasks * r)
        return y.view(n, n_tasks, r, h, w).permute(1, 0, 2, 3, 4)


# --------------------------------------------------------------------------- the blocks


def _grid_filter(layer: TADFormerLinear, codes: Tensor, batched: bool) -> Tensor:
    """Filter token codes [T, B, H, W, r] on the full grid (fc1, fc2)."""
    y = layer.filter(codes.permute(0, 1, 4, 2, 3), batched)
    return y.permute(0, 1, 3, 4, 2)


def _window_filter(layer: TADFormerLinear, codes: Tensor, ws: int, batched: bool) -> Tensor:
    """Filter window codes [T, B*nW, ws*ws, r] per window (attn.proj), tokens row-major inside a window."""
    n_tasks, n, m, r = codes.shape
    y = layer.filter(codes.transpose(2, 3).reshape(n_tasks, n, r, ws, ws), batched)
    return y.reshape(n_tasks, n, r, m).transpose(2, 3)


def _attention(attn: nn.Module, tokens: Tensor, n_prompts: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Window attention over [prompts | patches] up to the output projection.

    Returns the heads-merged output O [B*nW, T+N, C] and the raw scores ``q k^T`` [B*nW, h, T+N, T+N].
    """
    b_, n, c = tokens.shape
    heads = attn.num_heads
    qkv = attn.qkv(tokens).reshape(b_, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    raw = q @ k.transpose(-2, -1)
    logits = raw * attn.scale
    p = n_prompts
    bias = F.pad(_rel_pos_bias(attn), (p, 0, p, 0))  # relative-position bias on the patch-patch block only
    logits = logits + bias
    if mask is not None:
        nw = mask.shape[0]
        full = F.pad(mask, (p, 0, p, 0))
        logits = (logits.view(-1, nw, heads, n, n) + full.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
    a = attn.attn_drop(attn.softmax(logits))
    return (a @ v).transpose(1, 2).reshape(b_, n, c), raw


@dataclass
class BlockOutput:
    shared: Tensor  # [B, H, W, C]
    prompts: Tensor  # [B, T, C]
    tasks: Tensor | None = None  # Z_t [T, B, H, W, C] (task-adapted blocks)
    skip: Tensor | None = None  # K_t [T, B, H, W, C] (task-adapted blocks)


def _block_forward(
    blk: SwinTransformerBlock, x: Tensor, prompts: Tensor, update_prompts: bool, task_adapted: bool, batched: bool
) -> BlockOutput:
    b, h, w, c = x.shape
    ws, shift = blk.window_size, blk.shift_size
    if h % ws[0] or w % ws[1]:
        raise ValueError(f"TADFormer: token grid {h}x{w} is not a multiple of the window {tuple(ws)}")
    has_shift = any(shift)
    n_prompts = prompts.shape[1]
    y = blk.norm1(x)
    if has_shift:
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = window_partition(y, ws).view(-1, ws[0] * ws[1], c)
    n_win = windows.shape[0] // b
    p = blk.norm1(prompts)
    p = p.unsqueeze(1).expand(b, n_win, n_prompts, c).reshape(b * n_win, n_prompts, c)
    o, raw = _attention(blk.attn, torch.cat([p, windows], dim=1), n_prompts, blk.attn_mask)

    def unwindow(t: Tensor) -> Tensor:  # [B'*nW, N, C'] -> [B', H, W, C']
        t = window_reverse(t.reshape(-1, ws[0], ws[1], t.shape[-1]), ws, h, w)
        return torch.roll(t, shifts=shift, dims=(1, 2)) if has_shift else t

    proj = blk.attn.proj
    if task_adapted:
        assert isinstance(proj, TADFormerLinear)
        pre, s, od = proj.base_and_shared(o)
    else:
        s = proj(o)
    s = blk.attn.proj_drop(s)
    x1 = x + blk.drop_path1(unwindow(s[:, n_prompts:]))
    mlp = blk.mlp
    n_s = blk.norm2(x1)
    if not task_adapted:
        out = x1 + blk.drop_path2(mlp(n_s))
    else:
        fc1, fc2 = mlp.fc1, mlp.fc2
        assert isinstance(fc1, TADFormerLinear) and isinstance(fc2, TADFormerLinear)
        pre1, s1, _ = fc1.base_and_shared(n_s)
        h_s = mlp.norm(mlp.drop1(mlp.act(s1)))
        pre2, s2, _ = fc2.base_and_shared(h_s)
        out = x1 + blk.drop_path2(mlp.drop2(s2))
    if update_prompts:
        p_a = s[:, :n_prompts].reshape(b, n_win, n_prompts, c).mean(1)
        prompts = prompts + blk.drop_path2(mlp(blk.norm2(p_a)))
    if not task_adapted:
        return BlockOutput(out, prompts)

    # ---- task streams (tasks stacked on a leading axis)
    heads = blk.attn.num_heads
    n_tok = ws[0] * ws[1]
    o_x = od[:, n_prompts:]  # [B*nW, N, C]: the LoRA branch's (dropped-out, in training) input, as officially
    g = F.gelu(raw[:, :, :n_prompts, n_prompts:])  # TPC scores [B*nW, h, T, N]: raw, unscaled, no bias/mask/softmax
    m = (g.permute(2, 0, 3, 1).unsqueeze(-1) * o_x.view(1, -1, n_tok, heads, c // heads)).flatten(-2)  # [T,B*nW,N,C]
    u = proj.prompt_layernorm(o_x + m)
    codes = _window_filter(proj, proj.codes(u), ws[0], batched)
    y_t = proj.expand(pre[:, n_prompts:], codes)  # [T, B*nW, N, C]
    y_t = blk.attn.proj_drop(y_t)
    z = _drop_path_add(x, _per_task(unwindow, y_t, batched), blk.drop_path1)  # [T, B, H, W, C]
    # skip feature: M_t held channel-major [B*nW, C, N] and read back as token-major [B*nW, N, C] (official layout)
    skip = _per_task(unwindow, m.transpose(-2, -1).contiguous().view(m.shape), batched)
    n_t = blk.norm2(z)
    c1 = _grid_filter(fc1, fc1.codes(n_t), batched)
    h_t = mlp.norm(mlp.drop1(mlp.act(fc1.expand(pre1, c1))))
    c2 = _grid_filter(fc2, fc2.codes(h_t), batched)
    m_t = mlp.drop2(fc2.expand(pre2, c2))
    z = _drop_path_add(z, m_t, blk.drop_path2)
    return BlockOutput(out, prompts, z, skip)


class TADFormerBackbone(nn.Module):
    """The frozen timm Swin of a ``SwinBackbone`` with TADFormer's parts; ``forward`` gives {task: 4 NCHW features}.

    Parameter names are those of ``SwinBackbone`` (``swin.layers...``) plus ``swin.task_prompts``,
    ``swin.layers.i.prompt_gate`` and ``swin.layers.i.downsample.task_prompts_up`` (timm's stage i+1 merging
    closes stage i).
    """

    def __init__(self, base: SwinBackbone, tasks: Sequence[str]) -> None:
        super().__init__()
        self.swin = base.swin
        self.cfg = base.cfg
        self.feature_channels = base.feature_channels
        self.tasks = tuple(tasks)
        self.batched = True  # False: filters and task projections one task at a time (identical results)

    @property
    def layers(self) -> nn.Module:
        return self.swin.layers

    def forward_stages(self, image: Tensor) -> tuple[Tensor, list[StageOutput]]:
        """Patch-embedding tokens [B, H, W, C] and every stage's shared stream and task features."""
        x = self.swin.patch_embed(image)
        patch_tokens = x
        prompts = self.swin.task_prompts.unsqueeze(0).expand(x.shape[0], -1, -1)
        layers = self.layers
        stages: list[StageOutput] = []
        for i, layer in enumerate(layers):
            last = len(layer.blocks) - 1
            final_stage = i + 1 == len(layers)
            merge = None if final_stage else layers[i + 1].downsample  # official: the merging ends stage i
            out = None
            for j, blk in enumerate(layer.blocks):
                update = not (final_stage and j == last)  # the last block's prompt update is never used
                out = _block_forward(blk, x, prompts, update, j == last, self.batched)
                x, prompts = out.shared, out.prompts
            assert out is not None and out.tasks is not None and out.skip is not None
            gate = torch.sigmoid(layer.prompt_gate)
            feats = gate * out.skip + (1.0 - gate) * out.tasks  # F_t
            if merge is not None:
                x = merge(x)
                feats = _per_task(merge, feats, self.batched)
                prompts = merge.task_prompts_up(prompts)
            stages.append(StageOutput(x, feats))
        return patch_tokens, stages

    def forward(self, image: Tensor) -> dict[str, Features]:
        _, stages = self.forward_stages(image)
        feats: dict[str, Features] = {t: [] for t in self.tasks}
        for st in stages:
            assert st.tasks is not None
            for k, t in enumerate(self.tasks):
                feats[t].append(st.tasks[k].permute(0, 3, 1, 2))
        return feats

    def lora_linears(self) -> Iterator[TADFormerLinear]:
        return (m for m in self.modules() if isinstance(m, TADFormerLinear))


# --------------------------------------------------------------------------- apply


def _trunc_normal_prompts(p: Tensor) -> None:
    # official: timm trunc_normal_(mean=1, std=1) with its default ABSOLUTE bounds [-2, 2]
    nn.init.trunc_normal_(p, mean=1.0, std=1.0, a=-2.0, b=2.0)


def _apply(model: nn.Module, cfg: TADFormerConfig) -> nn.Module:
    tasks = tuple(model.tasks)
    cfg.validate(tasks)
    base = model.backbone
    if isinstance(base, TADFormerBackbone):
        raise ValueError("TADFormer is already applied to this model")
    if not isinstance(base, SwinBackbone):
        raise ValueError(f"TADFormer needs a benchmark.backbones.SwinBackbone, got {type(base).__name__}")
    layers = base.layers
    depths = [len(layer.blocks) for layer in layers]
    cfg.validate_for_backbone(depths)
    freeze(base)
    swin = base.swin
    dims = base.cfg.stage_dims
    swin.task_prompts = nn.Parameter(torch.empty(len(tasks), dims[0]))
    _trunc_normal_prompts(swin.task_prompts.data)
    for i, layer in enumerate(layers):
        layer.prompt_gate = nn.Parameter(torch.zeros(1))  # official init 0: sigmoid = 0.5
        if i + 1 < len(layers):
            layers[i + 1].downsample.task_prompts_up = nn.Linear(dims[i], dims[i + 1], bias=False)
        for j, blk in enumerate(layer.blocks):
            adapted = j == depths[i] - 1
            for target in SHARED_TARGETS:
                parent_name, child = target.rsplit(".", 1)
                parent = blk.get_submodule(parent_name)
                lin = TADFormerLinear(
                    getattr(parent, child),
                    rank=cfg.shared_rank[i],
                    scale=cfg.shared_scale,
                    dropout=cfg.lora_dropout,
                    prompt_norm=target == "attn.proj",
                    task_filter=cfg.task_filter if adapted and target in TASK_TARGETS else None,
                    tasks=tasks,
                    filter_kernel=cfg.filter_kernel,
                )
                setattr(parent, child, lin)
    freeze(base)
    unfreeze_matching(base, cfg.extra_trainable)
    for m in base.modules():  # LoRA factors and filters are trainable, base weights stay frozen
        if isinstance(m, TADFormerLinear):
            m.weight.requires_grad_(False)
            if m.bias is not None:
                m.bias.requires_grad_(False)
            for name, p in m.named_parameters():
                if name.startswith("lora_"):
                    p.requires_grad_(True)
    for i in range(1, len(layers)):  # the patch-merging reductions stay frozen, their LayerNorm trains
        layers[i].downsample.reduction.weight.requires_grad_(False)
    model.backbone = TADFormerBackbone(base, tasks)
    return model


def config_from_fixture(config: Mapping[str, Any], lora_dropout: float | None = None) -> TADFormerConfig:
    """The method config a TADFormer parity fixture's ``config`` describes (``benchmark.official``).

    Every value is read from ``config``; anything this implementation cannot represent is a ValueError.
    ``lora_dropout`` overrides the training-only LoRA dropout (the gradient fixtures run without it).
    """

    def need(d: dict[str, Any], key: str, where: str) -> Any:
        if key not in d:
            raise ValueError(f"fixture config: missing field {where}{key!r}")
        return d[key]

    depths = [int(d) for d in need(config, "depths", "")]
    lora = dict(need(config, "lora", ""))
    rank = need(lora, "shared_rank", "lora.")
    ranks = [int(r) for r in rank] if isinstance(rank, (list, tuple)) else [int(rank)] * len(depths)
    scale = lora.get("shared_scale", 4.0)
    if isinstance(scale, (list, tuple)):
        if len(set(scale)) != 1:
            raise ValueError("fixture config: per-stage shared scales are not supported")
        scale = scale[0]
    unsupported = {
        "lora.task_specific_lora_matrices": (bool(lora.get("task_specific_lora_matrices", False)), False),
        "lora.patch_merging_lora": (bool(lora.get("patch_merging_lora", False)), False),
        "lora.lora_bias": (str(lora.get("lora_bias", "none")), "none"),
        "lora.shared_lora_layers": (sorted(lora.get("shared_lora_layers", SHARED_TARGETS)), sorted(SHARED_TARGETS)),
        "prompts.per_task_len": (int(dict(config.get("prompts", {})).get("per_task_len", 1)), 1),
    }
    filt = dict(need(config, "task_filter", ""))
    k = int(filt.get("kernel_size", FILTER_KERNEL))
    unsupported["task_filter.stride"] = (int(filt.get("stride", 1)), 1)
    unsupported["task_filter.padding"] = (int(filt.get("padding", k // 2)), k // 2)
    unsupported["task_filter.layers"] = (sorted(filt.get("layers", TASK_TARGETS)), sorted(TASK_TARGETS))
    last_blocks = [[d - 1] for d in depths]
    adapted = list(config.get("task_adapted_blocks", last_blocks))
    if len(adapted) != len(depths):
        raise ValueError(f"fixture config: task_adapted_blocks has {len(adapted)} stages, depths {len(depths)}")
    blocks = [[int(b) % d for b in stage] for stage, d in zip(adapted, depths, strict=True)]
    unsupported["task_adapted_blocks"] = (blocks, last_blocks)
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"fixture config: {key}={got!r} is not supported (expected {want!r})")
    kind = str(need(filt, "type", "task_filter."))
    if kind not in FILTERS:
        raise ValueError(f"fixture config: task_filter.type {kind!r} is not one of {list(FILTERS)}")
    noise = lora.get("lora_dropout_train_only", lora.get("lora_dropout", 0.0))
    cls = TADFormerConfig if kind == "dynamic" else TADFormerReleaseConfig
    cfg = cls(
        shared_rank=tuple(ranks),
        shared_scale=float(scale),
        lora_dropout=float(noise if lora_dropout is None else lora_dropout),
        task_filter=kind,
        filter_kernel=int(filt.get("kernel_size", FILTER_KERNEL)),
    )
    cfg.validate(tuple(need(config, "tasks", "")))
    return cfg


def set_batched(net: nn.Module, batched: bool) -> int:
    """Set :attr:`TADFormerBackbone.batched` on every TADFormer backbone in ``net``; returns how many."""
    found = [m for m in net.modules() if isinstance(m, TADFormerBackbone)]
    for m in found:
        m.batched = batched
    return len(found)


PAPER = (
    "Baek, Lee, Kim, Hong, Nam, Kim. TADFormer: task-adaptive dynamic transformer for efficient multi-task "
    "learning. CVPR 2025 (arXiv 2501.04293)"
)
# what TADFormer adds to the Swin: LoRA factors and filters ("lora_"), and the prompts, gates, prompt lifting and
# prompt LayerNorms ("prompt"). The official breakdown's "lora" field counts the first marker only.
ADAPTER_MARKERS = ("lora_", "prompt")
# prompt_layernorm exists in attn.proj of every block but only the task-adapted (last) blocks use it
NO_GRAD = (r"blocks\.\d+\.attn\.proj\.prompt_layernorm\.",)


# the official TADFormer code base's fixtures (a task filter); its state dict names the linears as MTLoRA's does
OFFICIAL = OfficialSupport(
    claims=lambda config: "task_filter" in config,
    config_from_fixture=config_from_fixture,
    wraps_linear=lambda module: isinstance(module, MTLoRALinear),
)


def _register(
    name: str,
    config: type[TADFormerConfig],
    description: str,
    configuration: str,
    reproduces: str,
    official: OfficialSupport | None = None,
) -> Callable[..., Any]:
    return register_method(
        name,
        config=config,
        paper=PAPER,
        adapter_markers=ADAPTER_MARKERS,
        no_grad_params=NO_GRAD,
        description=description,
        configuration=configuration,
        reproduces=reproduces,
        official=official,
    )


@_register(
    "tadformer",
    TADFormerConfig,
    "TADFormer: shared LoRA, task prompts with TPC, one dynamic task filter per layer (the paper's counts).",
    "shared LoRA rank 64 (scale 4, dropout 0.05) on qkv/proj/fc1/fc2, one prompt per task, dynamic task filters "
    "in each stage's last block, per-stage gates",
    "TADFormer (CVPR 2025) main table r=16/32/64 (--set rank=N): 3.56 / 4.78 / 7.38 M printed, exactly "
    "3,557,502 / 4,776,126 / 7,379,262 here; the paper selects the best validation Δm (--select best)",
    official=OFFICIAL,
)
def apply(model: nn.Module, cfg: TADFormerConfig) -> nn.Module:
    """TADFormer with the paper's dynamic task filter on a fresh MultiTaskModel."""
    return _apply(model, cfg)


@_register(
    "tadformer_release",
    TADFormerReleaseConfig,
    "TADFormer as released: static per-task depth-wise 3x3 task filters instead of the paper's dynamic filter.",
    "as tadformer, with the released code's static per-task depth-wise 3x3 filters",
    "none: the released code's form, whose counts (3,532,350 / 4,670,526 / 6,946,878 at r=16/32/64) no table prints",
)
def apply_release(model: nn.Module, cfg: TADFormerReleaseConfig) -> nn.Module:
    """TADFormer with the released code's static per-task filters on a fresh MultiTaskModel."""
    return _apply(model, cfg)
