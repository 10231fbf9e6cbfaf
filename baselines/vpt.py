"""Visual Prompt Tuning (Jia et al., ECCV 2022) for a windowed Swin: learned key/value prompt tokens per block.

How prompts enter the windows (our design for Swin; ViT's "prepend to the sequence" does not fit windowed
attention). A prompted block owns ``num_prompts`` learned tokens of the block's width. Inside every window of that
block (shifted windows included), the prompts are projected by the block's own frozen ``qkv`` and their keys and
values are *prepended* to the window's keys and values; their queries are dropped. So:

* each real token attends to its window's tokens *and* to the prompts (prompts are attended to);
* prompts never attend to anything and produce no output: attention returns exactly the window's tokens, so the
  token grid, the window partition/reverse, the cyclic shift and patch merging never see a prompt;
* prompt keys get no relative-position bias (they have no position) and are visible from every window: the
  shifted-window mask gets zero-filled columns for them, so the -100 mask between shifted regions is untouched;
* the same prompts are shared by all windows of a block (one set per block, broadcast over windows and batch).

Prompts live in the block's post-LayerNorm input space (they are fed to ``qkv`` directly, like tokens after
``norm1``). ``vpt_shallow`` prompts only the first block of stage 1 (the layer where VPT-shallow inserts its prompts;
since our prompts never propagate, that is the only block they reach); ``vpt_deep`` gives every block its own
prompts. The backbone stays frozen; prompts and decoders train. Parameter names end in ``attn.prompt``.

Defaults are MTLoRA's Table 1 rows (copied from Polyhistor): 50 prompt tokens, and each task its own prompts
(``per_task``: the backbone runs once per task, ``benchmark.peft_tools.PerTaskBackbone``). 50 is the only token count whose
parameter count lands on the printed 2.57 M (shallow) and 3.43 M (deep) with the Table 1 decoder base. One set of
prompts shared by all tasks is ``per_task=false``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from torch import Tensor, nn

from benchmark.method_api import MethodConfig, register_method
from benchmark.peft_tools import freeze, tune_per_task


@dataclass(frozen=True)
class VPTConfig(MethodConfig):
    num_prompts: int = 50  # prompt tokens per prompted block (shared by all its windows); 50 as Table 1
    per_task: bool = True  # each task its own prompts (Table 1); false: one set shared by all tasks

    def validate(self, tasks: Sequence[str] = ()) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")


class PromptedWindowAttention(WindowAttention):
    """timm ``WindowAttention`` whose windows also attend to learned prompt keys/values.

    Instances are made by re-classing an existing ``WindowAttention`` (``_add_prompts``), which keeps every
    pretrained parameter name; the only new parameter is ``prompt`` ``[num_prompts, dim]``. The attention math is
    timm's unfused path (the one the backbone uses to match the official Swin), extended by the prompt columns.
    """

    prompt: nn.Parameter

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, _ = x.shape
        P = self.prompt.shape[0]
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B_, h, N, d]
        _, pk, pv = self.qkv(self.prompt).reshape(P, 3, h, -1).permute(1, 2, 0, 3).unbind(0)  # [h, P, d]
        k = torch.cat([pk.unsqueeze(0).expand(B_, -1, -1, -1), k], dim=2)  # [B_, h, P + N, d]
        v = torch.cat([pv.unsqueeze(0).expand(B_, -1, -1, -1), v], dim=2)

        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B_, h, N, P + N]: queries are window tokens only
        attn = attn + F.pad(self._get_rel_pos_bias(), (P, 0))  # no position bias towards prompts
        if mask is not None:
            num_win = mask.shape[0]
            mask = F.pad(mask, (P, 0))  # prompts are visible from every (shifted) window
            attn = attn.view(-1, num_win, h, N, P + N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, h, N, P + N)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


def _add_prompts(attn: WindowAttention, num_prompts: int) -> None:
    dim = attn.qkv.in_features
    ref = attn.qkv.weight
    prompt = torch.empty(num_prompts, dim, device=ref.device, dtype=ref.dtype)
    # VPT's init: uniform(-v, v) with v = sqrt(6 / (3 * patch^2 + dim)), a Xavier bound over the patch fan-in
    bound = math.sqrt(6.0 / (3 * 4 * 4 + dim))
    nn.init.uniform_(prompt, -bound, bound)
    attn.__class__ = PromptedWindowAttention
    attn.prompt = nn.Parameter(prompt)


def _apply_vpt(model: nn.Module, cfg: VPTConfig, deep: bool) -> nn.Module:
    cfg.validate()
    freeze(model.backbone)
    attns = [m for m in model.backbone.modules() if isinstance(m, WindowAttention)]  # block order
    if not attns:
        raise ValueError("VPT: the backbone has no Swin WindowAttention modules")
    for attn in attns if deep else attns[:1]:
        _add_prompts(attn, cfg.num_prompts)
    if cfg.per_task:
        tune_per_task(model)
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model


@register_method(
    "vpt_shallow",
    config=VPTConfig,
    paper="Jia et al., ECCV 2022",
    adapter_markers=("prompt",),
    description="VPT-shallow (Jia et al., ECCV 2022): learned key/value prompts in every window of the first block.",
    configuration="50 prompt tokens per task at the first block (num_prompts=50 per_task=true); "
    "shared form: per_task=false",
    reproduces="MTLoRA Table 1 'VPT-shallow' (from Polyhistor): 2.57 M printed, with the Table 1 decoder base",
)
def apply_shallow(model: nn.Module, cfg: VPTConfig) -> nn.Module:
    return _apply_vpt(model, cfg, deep=False)


@register_method(
    "vpt_deep",
    config=VPTConfig,
    paper="Jia et al., ECCV 2022",
    adapter_markers=("prompt",),
    description="VPT-deep (Jia et al., ECCV 2022): learned key/value prompts in every window of every Swin block.",
    configuration="50 prompt tokens per task in every block (num_prompts=50 per_task=true); "
    "shared form: per_task=false",
    reproduces="MTLoRA Table 1 'VPT-deep' (from Polyhistor): 3.43 M printed, with the Table 1 decoder base",
)
def apply_deep(model: nn.Module, cfg: VPTConfig) -> nn.Module:
    return _apply_vpt(model, cfg, deep=True)
