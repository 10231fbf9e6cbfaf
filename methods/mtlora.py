"""MTLoRA (Agiza, Neseem, Reda, CVPR 2024): shared plus task-specific low-rank updates on a frozen Swin.

What it changes in the model (the official code after commit bf26b4b, docs/protocol.md 3.2-3.3 and 8.8):

- every ``attn.qkv``, ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` of every block gets a task-agnostic
  (shared) LoRA: ``y = W x + b + s * B A drop(x)``, with a constant scale ``s`` (4.0, *not* alpha / r)
  and LoRA dropout on the input of the shared branch only;
- ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` of the last block of each stage also get one task-specific
  LoRA per task: ``y_t = W x + b + s_t * B_t A_t u_t`` (the frozen ``W`` sees the *shared* input ``x``,
  there is no shared-LoRA term, and ``u_t`` is the task's own stream, or ``drop(x)`` where it has none).
  That block carries one residual stream per task from its attention projection on; each task stream
  then passes through the same patch merging as the shared stream and is what that task's decoder
  receives. The next stage only sees the shared stream;
- the base Swin is frozen except the patch embedding, every LayerNorm and the relative-position-bias
  tables; ``mtlora`` also trains the patch-merging reductions fully, ``mtlora_plus`` freezes them and
  gives them a shared LoRA (rank = the shared rank of the stage they close).

The per-task streams are computed with the tasks stacked on a leading axis ([T, B, ...]): the task
LoRAs are one batched matmul and window reversal, drop path and patch merging see the tasks folded
into the batch. ``MTLoRABackbone.batched = False`` switches to a per-task loop (reference path for tests).
Task-agnostic LoRA can be folded into the frozen weights for evaluation (``merged(model)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

from benchmark.backbones import FAMILIES, Features, SwinBackbone
from benchmark.lora_ops import fast_dropout, lora_linear
from benchmark.method_api import MethodConfig, OfficialSupport, register_method
from benchmark.peft_tools import freeze, unfreeze_matching

SHARED_TARGETS = FAMILIES.get("swin").lora_targets  # the Swin linears LoRA adapts: attn.qkv/proj, mlp.fc1/fc2
TASK_TARGETS = ("attn.proj", "mlp.fc1", "mlp.fc2")  # qkv is never task-specific in MTLoRA
PATCH_MERGING_MODES = ("full", "lora", "frozen")


@dataclass(frozen=True)
class MTLoRAConfig(MethodConfig):
    """MTLoRA hyper-parameters. Defaults: the paper's headline row (shared r=64, task r=4, scale 4)."""

    ALIASES: ClassVar[dict[str, str]] = {"rank": "shared_rank"}  # --set rank=16 -> shared_rank=(16, 16, 16, 16)

    shared_rank: tuple[int, ...] = (64, 64, 64, 64)  # task-agnostic LoRA rank, one per Swin stage
    task_rank: int = 4  # rank of every task-specific LoRA ...
    task_ranks: dict[str, int] = field(default_factory=dict)  # ... unless overridden here, per task
    shared_scale: float = 4.0  # delta W = scale * B @ A (a plain multiplier, not alpha / rank)
    task_scale: float = 4.0  # the official SCALE_PER_TASK defaults to the shared scale (4.0)
    task_scales: dict[str, float] = field(default_factory=dict)  # per-task overrides of task_scale
    lora_dropout: float = 0.05  # on the shared input of every LoRA'd linear, training only
    shared_targets: tuple[str, ...] = SHARED_TARGETS  # linears with shared LoRA, in every block
    task_targets: tuple[str, ...] = TASK_TARGETS  # linears with task LoRA, in the task blocks
    # block indices (per stage) with task LoRA; None = the last block of every stage (the official
    # placement). Only a stage's last block feeds the decoders: task LoRA elsewhere is inert, as officially.
    task_blocks: tuple[tuple[int, ...], ...] | None = None
    patch_merging: str = "full"  # reductions: "full" (trainable, mtlora), "lora" (mtlora_plus), "frozen"
    merging_rank: tuple[int, ...] | None = None  # LoRA rank per merging (stage it closes); None: shared_rank
    # non-LoRA backbone parameters left trainable (name substrings), as the official freezing does
    extra_trainable: tuple[str, ...] = ("patch_embed", "norm", "relative_position_bias_table")

    def validate(self, tasks: Sequence[str]) -> None:
        def positive_ranks(name: str, ranks: Sequence[int]) -> None:
            bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or r <= 0]
            if bad:
                raise ValueError(f"MTLoRA {name}: ranks must be positive integers, got {list(ranks)}")

        if not self.shared_rank:
            raise ValueError("MTLoRA shared_rank: give one rank per Swin stage, got an empty list")
        positive_ranks("shared_rank", self.shared_rank)
        positive_ranks("task_rank", [self.task_rank])
        positive_ranks("task_ranks", list(self.task_ranks.values()))
        if self.merging_rank is not None:
            positive_ranks("merging_rank", self.merging_rank)
        for name, per_task in (("task_ranks", self.task_ranks), ("task_scales", self.task_scales)):
            unknown = sorted(set(per_task) - set(tasks))
            if unknown:
                raise ValueError(f"MTLoRA {name}: {unknown} not among the model's tasks {list(tasks)}")
        for name, value in [("shared_scale", self.shared_scale), ("task_scale", self.task_scale)] + [
            (f"task_scales[{t}]", v) for t, v in self.task_scales.items()
        ]:
            if not math.isfinite(value):
                raise ValueError(f"MTLoRA {name}: expected a finite number, got {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MTLoRA lora_dropout: expected a probability in [0, 1), got {self.lora_dropout}")
        for name, targets, valid in (
            ("shared_targets", self.shared_targets, SHARED_TARGETS),
            ("task_targets", self.task_targets, TASK_TARGETS),
        ):
            unknown = sorted(set(targets) - set(valid))
            if unknown:
                raise ValueError(f"MTLoRA {name}: {unknown} not allowed; choose from {list(valid)}")
        if self.patch_merging not in PATCH_MERGING_MODES:
            raise ValueError(f"MTLoRA patch_merging: {self.patch_merging!r} is not one of {list(PATCH_MERGING_MODES)}")
        if self.task_blocks is not None and len(self.task_blocks) != len(self.shared_rank):
            raise ValueError(
                f"MTLoRA task_blocks: {len(self.task_blocks)} stage entries but shared_rank has "
                f"{len(self.shared_rank)} stages"
            )

    def validate_for_backbone(self, depths: Sequence[int]) -> None:
        """Checks that need the Swin geometry (number of stages, blocks per stage)."""
        n = len(depths)
        if len(self.shared_rank) != n:
            raise ValueError(
                f"MTLoRA shared_rank: got {len(self.shared_rank)} ranks {list(self.shared_rank)}, "
                f"the backbone has {n} stages (one rank per stage)"
            )
        if self.merging_rank is not None and len(self.merging_rank) != n - 1:
            raise ValueError(
                f"MTLoRA merging_rank: got {len(self.merging_rank)} ranks, the backbone has {n - 1} patch mergings"
            )
        for i, blocks in enumerate(self.task_blocks or ()):
            bad = [b for b in blocks if not -depths[i] <= b < depths[i]]
            if bad:
                raise ValueError(f"MTLoRA task_blocks: stage {i + 1} has {depths[i]} blocks, got indices {bad}")

    def stage_task_blocks(self, depths: Sequence[int]) -> list[set[int]]:
        """Non-negative block indices with task LoRA, per stage."""
        if self.task_blocks is None:
            return [{d - 1} for d in depths]
        return [{b % d for b in blocks} for blocks, d in zip(self.task_blocks, depths, strict=True)]

    def rank_of(self, task: str) -> int:
        return self.task_ranks.get(task, self.task_rank)

    def scale_of(self, task: str) -> float:
        return float(self.task_scales.get(task, self.task_scale))


@dataclass(frozen=True)
class MTLoRAPlusConfig(MTLoRAConfig):
    """MTLoRA+: the patch-merging reductions are frozen and get a shared LoRA instead."""

    patch_merging: str = "lora"


# --------------------------------------------------------------------------- the LoRA'd linear


class MTLoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a shared LoRA and, optionally, one LoRA per task.

    Keeps the wrapped layer's ``weight``/``bias`` (same names as timm's, so plain Swin checkpoints load
    unchanged); adds ``lora_shared_A`` [r, in], ``lora_shared_B`` [out, r], ``lora_tasks_A.<task>``
    and ``lora_tasks_B.<task>`` (the official names). ``forward`` gives the shared output;
    ``forward_tasks`` also the per-task outputs, stacked on a leading task axis.

    The shared LoRA is computed factored (``benchmark.lora_ops.lora_linear``: the low-rank product accumulated
    into the frozen GEMM's output, the scale folded into B) and its dropout mask is drawn as geometric gaps on
    the CPU (``fast_dropout``: the distribution of ``nn.Dropout``, a different random stream). ``form = "auto"``
    would also use the materialised/hybrid forms when dropout is off; it is not the default because its
    rounding moves one gradient of the official parity fixture just past the 1e-3 check (docs/perf.md).
    """

    form: str = "factored"  # benchmark.lora_ops.FORMS
    exact_unmerge = (
        True  # merge()/unmerge() restore the frozen weight bit for bit (benchmark.peft_tools.merge_for_eval)
    )

    def __init__(
        self,
        base: nn.Linear,
        shared_rank: int = 0,
        shared_scale: float = 4.0,
        task_ranks: Mapping[str, int] | None = None,
        task_scales: Mapping[str, float] | None = None,
        dropout: float = 0.0,
    ) -> None:
        nn.Module.__init__(self)  # reuse the base parameters instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.shared_rank = int(shared_rank)
        self.shared_scale = float(shared_scale)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        if self.shared_rank:
            self.lora_shared_A = nn.Parameter(w.new_empty(self.shared_rank, self.in_features))
            self.lora_shared_B = nn.Parameter(w.new_zeros(self.out_features, self.shared_rank))
        self.tasks: tuple[str, ...] = tuple(task_ranks or ())
        if self.tasks:
            assert task_ranks is not None
            scales = task_scales or {}
            self.task_scales = tuple(float(scales.get(t, shared_scale)) for t in self.tasks)
            self.lora_tasks_A = nn.ParameterDict(
                {t: nn.Parameter(w.new_empty(task_ranks[t], self.in_features)) for t in self.tasks}
            )
            self.lora_tasks_B = nn.ParameterDict(
                {t: nn.Parameter(w.new_zeros(self.out_features, task_ranks[t])) for t in self.tasks}
            )
        self.merged = False
        self._unmerged_weight: Tensor | None = None
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A as nn.Linear's default (kaiming uniform, a=sqrt(5)), B zero: the adapted layer starts as the base."""
        if self.shared_rank:
            nn.init.kaiming_uniform_(self.lora_shared_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_shared_B)
        for t in self.tasks:
            nn.init.kaiming_uniform_(self.lora_tasks_A[t], a=math.sqrt(5))
            nn.init.zeros_(self.lora_tasks_B[t])

    def _shared_delta(self, xd: Tensor) -> Tensor:
        # the official grouping, ((x A^T) B^T) * s: the per-task reference path keeps it
        return (xd @ self.lora_shared_A.t() @ self.lora_shared_B.t()) * self.shared_scale

    @property
    def dropout_p(self) -> float:
        return float(self.lora_dropout.p) if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def _dropout(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.dropout_p, self.training)

    def _check_mode(self) -> None:
        if self.merged and self.training:
            raise RuntimeError("MTLoRALinear is merged (evaluation only): call unmerge() before training")

    def forward(self, x: Tensor) -> Tensor:
        self._check_mode()
        if not self.shared_rank or self.merged:
            return F.linear(x, self.weight, self.bias)
        # the cheapest exact form for this width, rank and token count (benchmark.lora_ops)
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_shared_A,
            self.lora_shared_B,
            self.shared_scale,
            self.dropout_p,
            self.training,
            self.form,
            fast_dropout,
        )

    def stacked_task_factors(self) -> tuple[Tensor, Tensor]:
        """Task LoRA factors stacked: A [T, r, in], B [T, out, r] (smaller ranks zero-padded, which adds exact zeros)."""
        a = [self.lora_tasks_A[t] for t in self.tasks]
        b = [self.lora_tasks_B[t] for t in self.tasks]
        r = max(x.shape[0] for x in a)
        if any(x.shape[0] != r for x in a):
            a = [F.pad(x, (0, 0, 0, r - x.shape[0])) for x in a]
            b = [F.pad(x, (0, r - x.shape[1])) for x in b]
        return torch.stack(a), torch.stack(b)

    def task_factors(self) -> tuple[Tensor, Tensor]:
        """``A`` [T, r, in] and ``s_t B`` [T, out, r]: the task scales folded into the small B factors."""
        a, b = self.stacked_task_factors()
        if len(set(self.task_scales)) == 1:
            return a, b * self.task_scales[0]
        return a, b * b.new_tensor(self.task_scales).view(-1, 1, 1)

    def task_low_rank(
        self, x2: Tensor, x_tasks: Tensor | None, with_tasks: bool = True
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """For token rows ``x2`` [M, in]: the shared output, ``pre = W x + b`` and the task codes ``A_t u_t``
        [T, M, r] (``u_t`` as in :meth:`forward_tasks`; None unless ``with_tasks``)."""
        n_tasks = len(self.tasks)
        pre = F.linear(x2, self.weight, self.bias)  # [M, out], shared by the shared and every task output
        xd = self._dropout(x2)
        h_shared = h_tasks = None
        if with_tasks and x_tasks is None:  # one input for all: one GEMM against the shared and task A's
            a = self.stacked_task_factors()[0]
            parts = ([self.lora_shared_A] if self.shared_rank else []) + [a.reshape(-1, self.in_features)]
            h = xd @ torch.cat(parts).t()
            if self.shared_rank:
                h_shared, h = h[:, : self.shared_rank], h[:, self.shared_rank :]
            h_tasks = h.view(-1, n_tasks, a.shape[1]).transpose(0, 1)  # [T, M, r]
        else:
            if self.shared_rank:
                h_shared = xd @ self.lora_shared_A.t()
            if with_tasks:
                a = self.stacked_task_factors()[0]
                h_tasks = torch.bmm(x_tasks.reshape(n_tasks, -1, self.in_features), a.transpose(1, 2))
        shared = pre
        if h_shared is not None:
            shared = torch.addmm(pre, h_shared, (self.lora_shared_B * self.shared_scale).t())
        return shared, pre, h_tasks

    def forward_tasks(self, x: Tensor, x_tasks: Tensor | None = None, batched: bool = True) -> tuple[Tensor, Tensor]:
        """Shared output and per-task outputs [T, *x.shape].

        Task t: ``W x + b + s_t B_t A_t u_t`` with ``u_t = x_tasks[t]`` (no dropout), or the dropped-out
        shared input when ``x_tasks`` is None (the official behaviour of the attention projection).
        """
        if not self.tasks:
            raise RuntimeError("forward_tasks on an MTLoRALinear without task LoRA")
        self._check_mode()
        n_tasks = len(self.tasks)
        if x_tasks is not None and x_tasks.shape[0] != n_tasks:
            raise ValueError(f"x_tasks has {x_tasks.shape[0]} task entries, the layer has {n_tasks} tasks")
        x2 = x.reshape(-1, self.in_features)
        if not batched:  # reference: one task at a time, exactly as the official layer
            pre = F.linear(x2, self.weight, self.bias)
            xd = self._dropout(x2)
            shared = pre + self._shared_delta(xd) if self.shared_rank else pre
            outs = []
            for i, t in enumerate(self.tasks):
                u = xd if x_tasks is None else x_tasks[i].reshape(-1, self.in_features)
                d = u @ self.lora_tasks_A[t].t() @ self.lora_tasks_B[t].t() * self.task_scales[i]
                outs.append(pre + d)
            return shared.view(*x.shape[:-1], -1), torch.stack(outs).view(n_tasks, *x.shape[:-1], -1)
        shared, pre, h_tasks = self.task_low_rank(x2, x_tasks)
        assert h_tasks is not None
        b = self.task_factors()[1]
        # pre + s_t B_t h_t for every task in one batched GEMM that writes its output once
        tasks = torch.baddbmm(pre.unsqueeze(0).expand(n_tasks, -1, -1), h_tasks, b.transpose(1, 2))
        return shared.view(*x.shape[:-1], -1), tasks.view(n_tasks, *x.shape[:-1], -1)

    @torch.no_grad()
    def merge(self) -> bool:
        """Fold the shared LoRA into ``weight`` (evaluation). Layers with task LoRA stay unmerged: their task
        branches need the plain ``W x``. Returns whether this layer was merged."""
        if self.merged or not self.shared_rank or self.tasks:
            return False
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.add_((self.lora_shared_B @ self.lora_shared_A) * self.shared_scale)
        self.merged = True
        return True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact frozen weight kept by ``merge``."""
        if self.merged:
            assert self._unmerged_weight is not None
            self.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
            self.merged = False

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # checkpoints always hold the frozen weight, never the merged one
            assert self._unmerged_weight is not None
            destination[prefix + "weight"] = self._unmerged_weight

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.merged:
            raise RuntimeError("MTLoRALinear is merged: call unmerge() before loading a state dict")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        s += f", shared_rank={self.shared_rank}, shared_scale={self.shared_scale}"
        if self.tasks:
            ranks = {t: self.lora_tasks_A[t].shape[0] for t in self.tasks}
            s += f", task_ranks={ranks}, task_scales={dict(zip(self.tasks, self.task_scales, strict=True))}"
        return s + (", merged" if self.merged else "")


# --------------------------------------------------------------------------- the backbone with task streams


def _rel_pos_bias(attn: nn.Module) -> Tensor:
    area = attn.window_area
    bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(area, area, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


def _attention_before_proj(attn: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """timm's (non-fused) WindowAttention.forward up to, not including, the output projection."""
    b_, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b_, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q * attn.scale
    a = q @ k.transpose(-2, -1)
    a = a + _rel_pos_bias(attn)
    if mask is not None:
        nw = mask.shape[0]
        a = a.view(-1, nw, attn.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        a = a.view(-1, attn.num_heads, n, n)
    a = attn.attn_drop(attn.softmax(a))
    return (a @ v).transpose(1, 2).reshape(b_, n, -1)


# Token rows per chunk of the fused task MLP: T x rows x hidden floats of ~4 MB stay in the CPU caches.
TASK_MLP_CHUNK_BYTES = 4 * 2**20


class _TaskMLPCodes(torch.autograd.Function):
    """``A2_t act(pre1 + h1_t B1_t^T)`` for every task t: the fc2 task codes [T, M, r2] of a task MLP.

    The unfused path materialises the task hidden activations [T, M, 4C] (the largest tensors of MTLoRA: 154 MB
    per task block at Swin-T's first stage, 448 px, batch 2), passes over them about a dozen times and keeps two
    copies for backward. Here they only ever exist for a chunk of token rows, in cache, and backward recomputes
    them from ``pre1`` [M, 4C] and the rank-r codes: the same arithmetic, a fraction of the memory traffic.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        pre1: Tensor,
        h1: Tensor,
        b1: Tensor,
        a2: Tensor,
        approximate: str,
    ) -> Tensor:
        n_tasks, m, _ = h1.shape
        rows = _chunk_rows(n_tasks, pre1.shape[1], pre1.element_size())
        out = pre1.new_empty(n_tasks, m, a2.shape[1])
        b1t, a2t = b1.transpose(1, 2), a2.transpose(1, 2)
        for s in range(0, m, rows):
            e = min(m, s + rows)
            z = torch.bmm(h1[:, s:e], b1t).add_(pre1[s:e])  # pre1 + h1_t B1_t^T, [T, rows, 4C]
            out[:, s:e] = torch.bmm(F.gelu(z, approximate=approximate), a2t)
        ctx.save_for_backward(pre1, h1, b1, a2)
        ctx.approximate = approximate  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre1, h1, b1, a2 = ctx.saved_tensors  # type: ignore[attr-defined]
        approximate = ctx.approximate  # type: ignore[attr-defined]
        n_tasks, m, _ = h1.shape
        rows = _chunk_rows(n_tasks, pre1.shape[1], pre1.element_size())
        # Backward runs outside autocast: under AMP the saved activations are fp16 / bf16 while the factors are
        # fp32 parameters, so the products run in the activations' dtype, as autocast ran them in forward, and
        # the factors' gradients accumulate in their own dtype (fp32) over the chunks. Without AMP all casts are
        # no-ops.
        dt = pre1.dtype
        h1, grad, b1c, a2c = h1.to(dt), grad.to(dt), b1.to(dt), a2.to(dt)
        g_pre, g_h1 = torch.empty_like(pre1), torch.empty_like(h1)
        g_b1, g_a2 = torch.zeros_like(b1), torch.zeros_like(a2)
        b1t = b1c.transpose(1, 2)
        for s in range(0, m, rows):
            e = min(m, s + rows)
            z = torch.bmm(h1[:, s:e], b1t).add_(pre1[s:e])  # recomputed
            g = grad[:, s:e]
            _acc_bmm(g_a2, g.transpose(1, 2), F.gelu(z, approximate=approximate))
            g_z = torch.ops.aten.gelu_backward(torch.bmm(g, a2c), z, approximate=approximate)
            torch.sum(g_z, 0, out=g_pre[s:e])
            g_h1[:, s:e] = torch.bmm(g_z, b1c)
            _acc_bmm(g_b1, g_z.transpose(1, 2), h1[:, s:e])
        return g_pre, g_h1, g_b1, g_a2, None


def _acc_bmm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` (batched) in ``acc``'s dtype; fused when the dtypes agree."""
    if a.dtype == acc.dtype:
        acc.baddbmm_(a, b)
    else:
        acc.add_(torch.bmm(a, b))


def _chunk_rows(n_tasks: int, hidden: int, itemsize: int) -> int:
    return max(16, TASK_MLP_CHUNK_BYTES // max(1, n_tasks * hidden * itemsize))


def _fusable_task_mlp(mlp: nn.Module) -> bool:
    """Both MLP linears carry task LoRA and act is a plain GELU with nothing else between the linears."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    plain = all(
        isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0.0) for m in (mlp.drop1, mlp.norm)
    )
    return (
        plain
        and type(mlp.act) is nn.GELU
        and isinstance(fc1, MTLoRALinear)
        and isinstance(fc2, MTLoRALinear)
        and bool(fc1.tasks)
        and fc1.tasks == fc2.tasks
    )


def _fused_task_mlp(mlp: nn.Module, n: Tensor, n_tasks: Tensor | None) -> tuple[Tensor, Tensor]:
    """The batched MLP of a task block without materialising the task hidden activations (_TaskMLPCodes).

    Shared: ``fc2(act(fc1(n)))``; task t: ``W2 z + b2 + s2_t B2_t A2_t act(W1 n + b1 + s1_t B1_t A1_t u_t)``
    with ``z`` the shared hidden activation, exactly as the unfused path computes them.
    """
    fc1, fc2 = mlp.fc1, mlp.fc2
    fc1._check_mode()
    fc2._check_mode()
    lead = n.shape[:-1]
    s1, pre1, h1 = fc1.task_low_rank(n.reshape(-1, fc1.in_features), n_tasks)
    assert h1 is not None
    b1 = fc1.task_factors()[1]
    a2, b2 = fc2.task_factors()
    codes = _TaskMLPCodes.apply(pre1, h1, b1, a2, mlp.act.approximate)  # [T, M, r2]
    o, pre2, _ = fc2.task_low_rank(mlp.act(s1), None, with_tasks=False)
    o_tasks = torch.baddbmm(pre2.unsqueeze(0).expand(len(fc2.tasks), -1, -1), codes, b2.transpose(1, 2))
    return o.view(*lead, -1), o_tasks.view(len(fc2.tasks), *lead, -1)


def _is_identity(m: nn.Module) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and m.p == 0.0)


def _drop_path_add(base: Tensor, x: Tensor, drop_path: nn.Module) -> Tensor:
    """``base + DropPath(x)`` for task streams x [T, B, ...] (one draw per task and sample, as ``_per_task`` with
    timm's ``drop_path``: same draws, same scaling), in one pass over memory instead of two or three."""
    if isinstance(drop_path, nn.Identity) or not drop_path.training or getattr(drop_path, "drop_prob", 0.0) == 0.0:
        return base + x
    if type(drop_path) is not DropPath:
        return base + _per_task(drop_path, x, True)
    keep = 1.0 - drop_path.drop_prob
    mask = x.new_empty(x.shape[0] * x.shape[1], *([1] * (x.ndim - 2))).bernoulli_(keep)
    if keep > 0.0 and drop_path.scale_by_keep:
        mask.div_(keep)
    return torch.addcmul(base, x, mask.view(x.shape[0], x.shape[1], *([1] * (x.ndim - 2))))


def _per_task(fn: Callable[[Tensor], Tensor], x: Tensor, batched: bool) -> Tensor:
    """Apply a per-sample op to task streams [T, B, ...]: tasks folded into the batch, or one at a time."""
    if batched:
        return fn(x.flatten(0, 1)).unflatten(0, (x.shape[0], -1))
    return torch.stack([fn(xt) for xt in x])


def _task_block_forward(blk: SwinTransformerBlock, x: Tensor, batched: bool) -> tuple[Tensor, Tensor | None]:
    """One Swin block that carries task streams (official SwinTransformerBlock.forward with lora=True).

    ``x``: shared input [B, H, W, C]. Returns the shared output and the task outputs [T, B, H, W, C]
    (None when the block's MLP has no task branch, in which case the official block returns none).
    """
    b, h, w, c = x.shape
    ws, shift = blk.window_size, blk.shift_size
    has_shift = any(shift)
    shortcut = x
    y = blk.norm1(x)
    if has_shift:
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h, pad_w = (ws[0] - h % ws[0]) % ws[0], (ws[1] - w % ws[1]) % ws[1]
    y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = y.shape[1], y.shape[2]
    windows = window_partition(y, ws).view(-1, ws[0] * ws[1], c)
    a = _attention_before_proj(blk.attn, windows, blk.attn_mask)

    def unwindow(t: Tensor) -> Tensor:  # [nW*B', N, C'] -> [B', H, W, C']
        t = window_reverse(t.view(-1, ws[0], ws[1], t.shape[-1]), ws, hp, wp)[:, :h, :w, :].contiguous()
        return torch.roll(t, shifts=shift, dims=(1, 2)) if has_shift else t

    proj = blk.attn.proj
    h_tasks = None
    if batched and isinstance(proj, MTLoRALinear) and proj.tasks and _is_identity(blk.attn.proj_drop):
        # Window reversal and the shift are per-token permutations, so they commute with the task LoRA:
        # unwindow(pre + h_t B_t^T) = unwindow(pre) + unwindow(h_t) B_t^T. Reversing ``pre`` once and the rank-r
        # codes h_t replaces T reversals of [M, C] task outputs.
        proj._check_mode()
        s, pre, codes = proj.task_low_rank(a.reshape(-1, c), None)
        assert codes is not None
        n_tasks, r = codes.shape[0], codes.shape[-1]
        pre_u = unwindow(pre.view(a.shape)).reshape(1, -1, c)
        codes_u = unwindow(codes.reshape(n_tasks * a.shape[0], a.shape[1], r)).reshape(n_tasks, -1, r)
        b_t = proj.task_factors()[1]
        t = torch.baddbmm(pre_u.expand(n_tasks, -1, -1), codes_u, b_t.transpose(1, 2)).view(n_tasks, *x.shape)
        # official: h_t = shortcut + DropPath(proj_t), one drop-path draw per task and sample
        h_tasks = _drop_path_add(shortcut, t, blk.drop_path1)
        s = s.view(a.shape)
    elif isinstance(proj, MTLoRALinear) and proj.tasks:
        s, t = proj.forward_tasks(a, None, batched)
        t = blk.attn.proj_drop(t)
        # official: h_t = shortcut + DropPath(proj_t), one drop-path draw per task and sample
        h_tasks = shortcut + _per_task(lambda z: blk.drop_path1(unwindow(z)), t, batched)
    else:
        s = proj(a)
    x = shortcut + blk.drop_path1(unwindow(blk.attn.proj_drop(s)))

    mlp = blk.mlp
    n = blk.norm2(x)
    n_tasks = blk.norm2(h_tasks) if h_tasks is not None else None
    if batched and _fusable_task_mlp(mlp):
        o, o_tasks = _fused_task_mlp(mlp, n, n_tasks)
        out = x + blk.drop_path2(mlp.drop2(o))
        o_tasks = mlp.drop2(o_tasks)
        if h_tasks is None:
            return out, _per_task(blk.drop_path2, o_tasks, batched)
        return out, _drop_path_add(h_tasks, o_tasks, blk.drop_path2)
    if isinstance(mlp.fc1, MTLoRALinear) and mlp.fc1.tasks:
        z, z_tasks = mlp.fc1.forward_tasks(n, n_tasks, batched)
    else:
        z, z_tasks = mlp.fc1(n), None

    def act(t: Tensor) -> Tensor:
        return mlp.norm(mlp.drop1(mlp.act(t)))

    z = act(z)
    z_tasks = act(z_tasks) if z_tasks is not None else None
    if isinstance(mlp.fc2, MTLoRALinear) and mlp.fc2.tasks:
        o, o_tasks = mlp.fc2.forward_tasks(z, z_tasks, batched)
        o_tasks = mlp.drop2(o_tasks)
    else:
        o, o_tasks = mlp.fc2(z), None
    out = x + blk.drop_path2(mlp.drop2(o))
    if o_tasks is None:
        return out, None
    o_tasks = _per_task(blk.drop_path2, o_tasks, batched)
    # official quirk kept: without task streams from the attention there is no residual on the task output
    return out, (o_tasks if h_tasks is None else h_tasks + o_tasks)


def _task_region(
    blk: SwinTransformerBlock, merge: nn.Module | None, x: Tensor, batched: bool
) -> tuple[Tensor, Tensor | None]:
    """A stage's task-carrying block and the merging of its task streams, as one function: checkpointed as one
    region, only its input ``x`` is kept (not also the four task streams between block and merging, which are
    36.8 MB at stage 1, 448 px, batch 2). The shared stream is merged by the caller."""
    out, tasks = _task_block_forward(blk, x, batched)
    if merge is not None and tasks is not None:
        tasks = _per_task(merge, tasks, batched)
    return out, tasks


@dataclass
class StageOutput:
    shared: Tensor  # [B, H, W, C], the stream that feeds the next stage (after merging)
    tasks: Tensor | None  # [T, B, H, W, C] task streams after merging, None: the tasks use ``shared``


def set_activation_checkpointing(net: nn.Module, stages: bool | frozenset[int]) -> int:
    """Set :attr:`MTLoRABackbone.checkpoint` on every MTLoRA backbone in ``net``; returns how many there are."""
    found = [m for m in net.modules() if isinstance(m, MTLoRABackbone)]
    for m in found:
        m.checkpoint = stages
    return len(found)


class MTLoRABackbone(nn.Module):
    """The frozen timm Swin of a ``SwinBackbone`` with MTLoRA layers; ``forward`` gives {task: 4 NCHW features}.

    Parameter names are those of ``SwinBackbone`` (``swin.layers...``) plus the LoRA parameters.
    """

    def __init__(self, base: SwinBackbone, tasks: Sequence[str], task_blocks: Sequence[set[int]]) -> None:
        super().__init__()
        self.swin = base.swin
        self.cfg = base.cfg
        self.feature_channels = base.feature_channels
        self.tasks = tuple(tasks)
        self.task_blocks = [set(b) for b in task_blocks]
        self.batched = True  # False: per-task reference loop (identical results, slower)
        # True: recompute each block's activations in backward (torch.utils.checkpoint) instead of keeping them;
        # the same values and gradients (random draws are replayed), a fraction of the memory, ~1/3 more compute.
        # A set of 0-based stage indices: only those stages' blocks (the first stage holds the largest
        # activations for a sixth of the compute: most of the saving for a fraction of the recomputation)
        self.checkpoint: bool | frozenset[int] = False

    @property
    def layers(self) -> nn.Module:
        return self.swin.layers

    def _checkpointed(self, stage: int) -> bool:
        on = self.checkpoint is True or (not isinstance(self.checkpoint, bool) and stage in self.checkpoint)
        return on and self.training and torch.is_grad_enabled()

    def _run(self, stage: int, fn: Callable[..., Any], *args: Any) -> Any:
        if self._checkpointed(stage):
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_stages(self, image: Tensor) -> tuple[Tensor, list[StageOutput]]:
        """Patch-embedding tokens [B, H, W, C] and every stage's shared and task streams."""
        x = self.swin.patch_embed(image)
        patch_tokens = x
        layers = self.layers
        stages: list[StageOutput] = []
        for i, layer in enumerate(layers):
            tasks = None
            last = len(layer.blocks) - 1
            merge = layers[i + 1].downsample if i + 1 < len(layers) else None  # official: the merging ends stage i
            for j, blk in enumerate(layer.blocks):
                if j == last and j in self.task_blocks[i]:
                    x, tasks = self._run(i, _task_region, blk, merge, x, self.batched)
                else:
                    # a non-last block's task outputs are discarded by the official stage loop, so skip them
                    x = self._run(i, blk, x)
            if merge is not None:
                x = merge(x)
            stages.append(StageOutput(x, tasks))
        return patch_tokens, stages

    def forward(self, image: Tensor) -> dict[str, Features]:
        _, stages = self.forward_stages(image)
        feats: dict[str, Features] = {t: [] for t in self.tasks}
        for st in stages:
            for k, t in enumerate(self.tasks):
                f = st.shared if st.tasks is None else st.tasks[k]
                feats[t].append(f.permute(0, 3, 1, 2))
        return feats

    def lora_linears(self) -> Iterator[MTLoRALinear]:
        return (m for m in self.modules() if isinstance(m, MTLoRALinear))

    def merge(self) -> int:
        """Fold the shared LoRA into the frozen weights for evaluation; returns the number of merged layers."""
        return sum(m.merge() for m in self.lora_linears())

    def unmerge(self) -> None:
        for m in self.lora_linears():
            m.unmerge()


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate with the task-agnostic LoRA folded into the frozen weights; restores them on exit."""
    backbones = [m for m in model.modules() if isinstance(m, MTLoRABackbone)]
    if not backbones:
        raise ValueError("merged(): the model has no MTLoRA backbone")
    for bb in backbones:
        bb.merge()
    try:
        yield model
    finally:
        for bb in backbones:
            bb.unmerge()


# --------------------------------------------------------------------------- apply


def _apply(model: nn.Module, cfg: MTLoRAConfig) -> nn.Module:
    tasks = tuple(model.tasks)
    cfg.validate(tasks)
    base = model.backbone
    if isinstance(base, MTLoRABackbone):
        raise ValueError("MTLoRA is already applied to this model")
    if not isinstance(base, SwinBackbone):
        raise ValueError(f"MTLoRA needs a benchmark.backbones.SwinBackbone, got {type(base).__name__}")
    depths = [len(layer.blocks) for layer in base.layers]
    cfg.validate_for_backbone(depths)
    task_blocks = cfg.stage_task_blocks(depths)
    freeze(base)
    task_ranks = {t: cfg.rank_of(t) for t in tasks}
    task_scales = {t: cfg.scale_of(t) for t in tasks}
    for i, layer in enumerate(base.layers):
        for j, blk in enumerate(layer.blocks):
            for target in SHARED_TARGETS:
                shared = target in cfg.shared_targets
                with_tasks = j in task_blocks[i] and target in cfg.task_targets
                if not (shared or with_tasks):
                    continue
                parent_name, child = target.rsplit(".", 1)
                parent = blk.get_submodule(parent_name)
                lora = MTLoRALinear(
                    getattr(parent, child),
                    shared_rank=cfg.shared_rank[i] if shared else 0,
                    shared_scale=cfg.shared_scale,
                    task_ranks=task_ranks if with_tasks else None,
                    task_scales=task_scales,
                    dropout=cfg.lora_dropout,
                )
                setattr(parent, child, lora)
        if i + 1 < len(base.layers) and cfg.patch_merging == "lora":
            merge = base.layers[i + 1].downsample  # closes stage i: official layer_idx = i
            rank = cfg.merging_rank[i] if cfg.merging_rank is not None else cfg.shared_rank[i]
            merge.reduction = MTLoRALinear(
                merge.reduction, shared_rank=rank, shared_scale=cfg.shared_scale, dropout=cfg.lora_dropout
            )
    unfreeze_matching(base, cfg.extra_trainable)
    if cfg.patch_merging == "full":
        unfreeze_matching(base, ("downsample.reduction",))
    for m in base.modules():  # LoRA factors are trainable, base weights stay frozen
        if isinstance(m, MTLoRALinear):
            m.weight.requires_grad_(False)
            if m.bias is not None:
                m.bias.requires_grad_(False)
            for name, p in m.named_parameters():
                if name.startswith("lora_"):
                    p.requires_grad_(True)
    model.backbone = MTLoRABackbone(base, tasks, task_blocks)
    return model


PAPER = "Agiza, Neseem, Reda. MTLoRA: a low-rank adaptation approach for efficient multi-task learning. CVPR 2024"
# The shared branch of the last block's fc2 in the last stage only feeds the shared stream, which no decoder
# uses (the official model leaves it without gradient too, see the parity fixture README section 2).
NO_GRAD = (r"layers\.3\.blocks\.\d+\.mlp\.fc2\.lora_shared_",)


# --------------------------------------------------------------------------- the official code base's fixtures


def _need(config: Mapping[str, Any], key: str, where: str = "") -> Any:
    if key not in config:
        raise ValueError(f"fixture config: missing field {where}{key!r}")
    return config[key]


def _per_stage(value: Any, n: int, name: str) -> tuple[int, ...]:
    vals = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(vals) != n:
        raise ValueError(f"fixture config: {name} has {len(vals)} entries for {n} stages")
    return tuple(int(v) for v in vals)


def config_from_fixture(config: Mapping[str, Any], lora_dropout: float | None = None) -> MTLoRAConfig:
    """The MTLoRA / MTLoRA+ config an official parity fixture's ``config`` describes (``benchmark.official``).

    Every value is read from ``config``; anything this implementation cannot represent is a ValueError.
    ``lora_dropout`` overrides the training-only LoRA dropout (the gradient fixtures run without it).
    """
    n = len(_need(config, "depths"))
    lora = dict(_need(config, "lora"))
    if str(lora.get("lora_bias", "none")) != "none":
        raise ValueError(f"fixture config: lora.lora_bias {lora['lora_bias']!r} is not supported")
    train_noise = lora.get("lora_dropout_train_only", lora.get("lora_dropout", 0.0))
    task_rank = lora.get("task_rank", 4)
    task_scale = lora.get("task_scale", lora.get("shared_scale", 4.0))
    plus = bool(lora.get("patch_merging_lora", False))
    variant = str(config.get("variant", ""))
    if variant and variant.replace(" ", "").upper().startswith("MTLORA+") != plus:
        raise ValueError(f"fixture config: variant {variant!r} disagrees with lora.patch_merging_lora={plus}")
    merging_rank = None
    if plus:
        pm = lora.get("patch_merging_lora_rank", 0)
        if pm not in (0, None, [], ()):
            merging_rank = _per_stage(pm, n - 1, "lora.patch_merging_lora_rank")
    shared_scale = lora.get("shared_scale", 4.0)
    if isinstance(shared_scale, (list, tuple)):
        if len(set(shared_scale)) != 1:
            raise ValueError("fixture config: per-stage shared scales are not supported")
        shared_scale = shared_scale[0]
    fields: dict[str, Any] = dict(
        shared_rank=_per_stage(_need(lora, "shared_rank"), n, "lora.shared_rank"),
        task_rank=int(task_rank) if not isinstance(task_rank, Mapping) else 4,
        task_ranks={t: int(r) for t, r in task_rank.items()} if isinstance(task_rank, Mapping) else {},
        shared_scale=float(shared_scale),
        task_scale=float(task_scale) if not isinstance(task_scale, Mapping) else float(shared_scale),
        task_scales={t: float(s) for t, s in task_scale.items()} if isinstance(task_scale, Mapping) else {},
        lora_dropout=float(train_noise if lora_dropout is None else lora_dropout),
        shared_targets=tuple(lora.get("shared_lora_layers", SHARED_TARGETS)),
        task_targets=tuple(lora.get("task_lora_layers", TASK_TARGETS)),
        task_blocks=(
            tuple(tuple(int(b) for b in blocks) for blocks in lora["task_lora_blocks"])
            if "task_lora_blocks" in lora
            else None
        ),
        merging_rank=merging_rank,
    )
    return (MTLoRAPlusConfig if plus else MTLoRAConfig)(**fields)


OFFICIAL = OfficialSupport(
    # the official MTLoRA code base's fixtures (no TADFormer task filter)
    claims=lambda config: "task_filter" not in config,
    config_from_fixture=config_from_fixture,
    wraps_linear=lambda module: isinstance(module, MTLoRALinear),
)


@register_method(
    "mtlora",
    config=MTLoRAConfig,
    paper=PAPER,
    adapter_markers=("lora_",),
    identity_at_init=True,
    no_grad_params=NO_GRAD,
    activation_checkpointing=set_activation_checkpointing,
    official=OFFICIAL,
    configuration="shared LoRA rank 64 (scale 4, dropout 0.05) on qkv/proj/fc1/fc2, task LoRA rank 4 in each "
    "stage's last block, trainable patch merging, norms and relative-position tables",
    reproduces="MTLoRA (CVPR 2024) Table 1 r=16/32/64 (--set rank=N): 4.95 / 6.08 / 8.34 M printed, exactly "
    "4,953,146 / 6,083,642 / 8,344,634 here",
)
def apply(model: nn.Module, cfg: MTLoRAConfig) -> nn.Module:
    """MTLoRA on a fresh MultiTaskModel: frozen Swin + shared/task LoRA, trainable patch merging."""
    return _apply(model, cfg)


@register_method(
    "mtlora_plus",
    config=MTLoRAPlusConfig,
    paper=PAPER,
    adapter_markers=("lora_",),
    identity_at_init=True,
    no_grad_params=NO_GRAD,
    activation_checkpointing=set_activation_checkpointing,
    description="MTLoRA+: MTLoRA with frozen patch-merging reductions that get a shared LoRA instead.",
    configuration="as mtlora, with frozen patch-merging reductions that get a shared LoRA instead",
    reproduces="none printed: the official code's MTLoRA+ variant (3,469,370 / 4,664,378 / 7,054,394 at r=16/32/64)",
)
def apply_plus(model: nn.Module, cfg: MTLoRAPlusConfig) -> nn.Module:
    """MTLoRA+: as MTLoRA, with frozen patch-merging reductions that get a shared LoRA."""
    return _apply(model, cfg)
