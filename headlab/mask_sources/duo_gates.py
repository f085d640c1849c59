"""DuoAttention's gated attention and its loss: what the `duo` source trains.

Every KV head `j` of layer `l` gets a gate `alpha[l, j]`; each of its query heads' attention output is

    out = (1 - alpha) * streaming + alpha * full

where `streaming` attends to the first `sink` and the last `recent` keys only and `full` to every
earlier key (DuoAttention, Xiao et al. 2024). As the reference (`duo_attn/patch/llama.py`,
`llama_duo_attention_forward_two_way`), `full` is the *teacher's* attention output: the full model runs
first without gradients, and its per-layer attention outputs are mixed into the gated (student) run,
which computes only streaming attention. The loss is the mean squared distance between the final
hidden states (after the final norm) of the student and the teacher, summed over the feature axis'
mean and averaged over the labelled (answer) positions, plus `reg_weight` times the L1 norm of the
gates divided by their count (`duo_attn/loss.py`).

Why not TransformerLens hooks: mixing at `hook_z` would need the streaming pattern, i.e. every layer's
`[batch, head, pos, pos]` attention kept for the backward pass (gigabytes at a few thousand tokens on
this CPU, far more on a GPU at 32k). The layers here are the Lab's own transformers modules, run by the
compressed runtime's one forward pass (`headlab.runtime.model.layer_forward`, no weight copied, every
family it supports), and attention is torch's `scaled_dot_product_attention` with a boolean sink +
recent mask (`streaming_window_allowed`), which runs fused kernels that never keep the pattern: memory
grows linearly with length (plus the `[pos, pos]` boolean mask, one byte per entry), on CPU and CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from headlab.ablation.methods import streaming_window_allowed
from headlab.runtime.fused import ModuleOps
from headlab.runtime.model import layer_forward
from headlab.runtime.weights import LayerModules, ModelModules

Attend = Callable[[int, LayerModules, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Teacher:
    """The full model's run on `[batch, pos]` tokens. `hidden` `[batch, pos, d_model]` final-norm states; per layer,
    `attention[l]` `[batch, heads, pos - start, d_head]` its attention output at the student's positions and
    `keys[l]`/`values[l]` `[batch, kv_heads, start, d_head]` (rotated) at the positions before them."""

    hidden: torch.Tensor
    attention: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int


def run_layers(m: ModelModules, tokens: torch.Tensor, attend: Attend, start: int = 0, checkpointed: bool = False) -> torch.Tensor:
    """Embed `tokens` `[batch, t]` (at positions `start`..`start + t - 1`) and run every decoder layer with
    `attend(index, layer, q, k, v)` computing attention (`q` `[batch, heads, t, d_head]`, `k`/`v` `[batch, kv_heads,
    t, d_head]`, rotary applied) -> `[batch, heads, t, d_head]`; returns the final-norm hidden states `[batch, t, d_model]`.

    `checkpointed`: keep only each layer's input for the backward pass and run the layer again there
    (`torch.utils.checkpoint`, non-reentrant: gradients reach the gates `attend` reads): the same values and
    gradients, one layer's activations instead of every layer's, for one more forward pass."""
    ops, (batch, t) = ModuleOps(), tokens.shape
    x, delta = m.embed(tokens.to(m.device)), None
    tables = m.rotary_tables(x, torch.arange(start, start + t, device=m.device))
    for index, layer in enumerate(m.layers):
        def heads(h: torch.Tensor, index=index, layer=layer) -> torch.Tensor:
            q, k, v = layer.project(h, ops.norm)
            q, k = ops.rotary(q, k, *tables[layer.layer_type])
            return attend(index, layer, q, k, v).transpose(1, 2).reshape(batch, t, -1)

        if checkpointed:
            x, delta = checkpoint(layer_forward, layer, x, delta, heads, ops, m.parallel_residual, use_reentrant=False)
        else:
            x, delta = layer_forward(layer, x, delta, heads, ops, m.parallel_residual)
    return ops.add_norm(x, delta, m.final_norm)[1]


def sdpa(layer: LayerModules, q, k, v, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention (`allowed` None) or attention over the `allowed` `[q, k]` keys, grouped-query, at the layer's scale."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None, scale=layer.scaling,
                                          enable_gqa=q.shape[1] != k.shape[1])


@torch.no_grad()
def teacher(m: ModelModules, tokens: torch.Tensor, start: int) -> Teacher:
    """The full model on `tokens`, keeping what the student needs: the attention outputs from position `start` on
    (its `full` branch) and the keys and values before `start`."""
    full = Teacher(None, [], [], [], start)

    def attend(index, layer, q, k, v):
        out = sdpa(layer, q, k, v)
        full.attention.append(out[:, :, start:])
        full.keys.append(k[:, :, :start])
        full.values.append(v[:, :, :start])
        return out

    full.hidden = run_layers(m, tokens, attend)
    return full


def student(m: ModelModules, tokens: torch.Tensor, gates: torch.Tensor, full: Teacher, sink: int, recent: int,
            checkpointed: bool = False) -> torch.Tensor:
    """The gated run: `gates` `[n_layers, n_kv_heads]` (clamped to [0, 1]) mix each layer's streaming attention with
    the teacher's full attention; returns the final-norm hidden states `[batch, pos - full.start, d_model]`
    (`checkpointed`: see `run_layers`).

    Only positions from `full.start` on are computed. A query before `sink + recent` sees every earlier key even
    when streaming, so up to there the gated run equals the full one exactly, at every layer: with
    `full.start <= sink + recent` the teacher's keys and values stand in for those positions (an exact saving of
    `start / pos` of the work)."""
    t = tokens.shape[1]
    if full.start > sink + recent:
        raise ValueError(f"The student must start at or before sink + recent = {sink + recent}, not {full.start}.")
    allowed = streaming_window_allowed(t - full.start, t, sink, recent, m.device)
    group = m.n_heads // m.n_kv_heads

    def attend(index, layer, q, k, v):
        k, v = torch.cat([full.keys[index], k], dim=2), torch.cat([full.values[index], v], dim=2)
        alpha = gates[index].clamp(0, 1).repeat_interleave(group).view(1, -1, 1, 1).to(q.dtype)  # query head h reads KV head h // group
        return (1 - alpha) * sdpa(layer, q, k, v, allowed) + alpha * full.attention[index]

    return run_layers(m, tokens[:, full.start:], attend, full.start, checkpointed)


def losses(student_hidden: torch.Tensor, full: Teacher, labels: torch.Tensor, gates: torch.Tensor,
           reg_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(loss, distill, reg)`. distill: the squared error of the final hidden states, averaged over the feature axis,
    summed over the labelled positions (`labels` `[pos]` bool) and divided by their count (positions before the
    student's start count with error 0, as they are exactly 0); reg: mean |gate|; loss = distill + reg_weight * reg."""
    mine = labels[full.start:]
    diff = (student_hidden[:, mine].float() - full.hidden[:, full.start:][:, mine].float()).pow(2).mean(-1)
    distill = diff.sum() / (labels.sum() * student_hidden.shape[0])
    reg = gates.abs().sum() / gates.numel()
    return distill + reg_weight * reg, distill, reg
