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
recent mask (`allowed_keys`), which runs fused kernels that never keep the pattern: memory
grows linearly with length (plus the `[pos, pos]` boolean mask, one byte per entry), on CPU and CUDA.

Long prompts (an 8B model at 128k tokens) run `streamed_step` instead, whose device memory does not grow with
the number of layers: the teacher is prefilled in chunks against its own KV cache, and the student runs layer
by layer, chunk by chunk. That is exact because a streaming head is local: the output of layer `l` at the
queries `[i0, i1)` depends only on the layer's input at `[i0 - recent + 1, i1)` (the sink keys lie before the
student's start, among the teacher's keys, which are constants). So each layer's input is all the backward
pass keeps (in host memory, or on the device where the host has no room: `Plan.store`), and the backward
pass recomputes each layer one window at a time, scattering the input gradients back: one more forward pass,
as checkpointing costs, and only a chunk's activations on the device. (torch's checkpointing would recompute a
whole layer of 128k tokens at once; this is hand-written for the locality it cannot see.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from headlab.longpass import causal_attention
from headlab.runtime.attention import allowed_keys
from headlab.runtime.cache import Window
from headlab.runtime.fused import ModuleOps
from headlab.runtime.model import layer_forward
from headlab.runtime.weights import LayerModules, ModelModules

Attend = Callable[[int, LayerModules, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Teacher:
    """The full model's run on `[batch, pos]` tokens. `hidden` `[batch, pos, d_model]` final-norm states; per layer,
    `attention[l]` `[batch, pos - start, heads, d_head]` its attention output at the student's positions (kept on
    `Plan.store`) and `keys[l]`/`values[l]` `[batch, kv_heads, start, d_head]` (rotated) at the positions before them."""

    hidden: torch.Tensor
    attention: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    start: int

    def attention_rows(self, index: int, p0: int, p1: int, device) -> torch.Tensor:
        """Layer `index`'s attention output at absolute positions `[p0, p1)` -> `[batch, heads, p1 - p0, d_head]`."""
        return self.attention[index][:, p0 - self.start:p1 - self.start].to(device, non_blocking=True).transpose(1, 2)


@dataclass(frozen=True)
class Plan:
    """How a training step runs: `streamed` (else the plain autograd pass), `chunk` tokens at a time, the per-layer
    tensors the backward pass reads kept on `store` (the model's device, or "cpu": host memory)."""

    streamed: bool = False
    chunk: int | None = None
    store: str | None = None


def run_layer(m: ModelModules, index: int, x: torch.Tensor, delta: torch.Tensor | None, tables: dict, attend: Attend,
              ops: ModuleOps) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder layer `index` on `x + delta` `[batch, t, d_model]` (rotary `tables` of its positions), attention computed
    by `attend(index, layer, q, k, v)` (`q` `[batch, heads, t, d_head]`, `k`/`v` `[batch, kv_heads, t, d_head]`, rotary
    applied) -> `[batch, heads, t, d_head]`. Returns `(x, delta)` as `layer_forward`."""
    layer, (batch, t, _) = m.layers[index], x.shape

    def heads(h: torch.Tensor) -> torch.Tensor:
        q, k, v = layer.project(h, ops)
        q, k = ops.rotary(q, k, *tables[layer.layer_type])
        return attend(index, layer, q, k, v).transpose(1, 2).reshape(batch, t, -1)

    return layer_forward(layer, x, delta, heads, ops, m.parallel_residual)


def run_layers(m: ModelModules, tokens: torch.Tensor, attend: Attend, start: int = 0) -> torch.Tensor:
    """Embed `tokens` `[batch, t]` (at positions `start`..`start + t - 1`) and run every decoder layer (`run_layer`);
    returns the final-norm hidden states `[batch, t, d_model]`."""
    ops, t = ModuleOps(), tokens.shape[1]
    x, delta = m.embed(tokens.to(m.device)), None
    tables = m.rotary_tables(x, torch.arange(start, start + t, device=m.device))
    for index in range(m.n_layers):
        x, delta = run_layer(m, index, x, delta, tables, attend, ops)
    return ops.add_norm(x, delta, m.final_norm)[1]


def sdpa(layer: LayerModules, q, k, v, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention (`allowed` None) or attention over the `allowed` `[q, k]` keys, grouped-query, at the layer's scale."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None, scale=layer.scaling,
                                          enable_gqa=q.shape[1] != k.shape[1])


@torch.no_grad()
def teacher(m: ModelModules, tokens: torch.Tensor, start: int, plan: Plan = Plan()) -> Teacher:
    """The full model on `tokens`, keeping what the student needs: the attention outputs from position `start` on
    (its `full` branch) and the keys and values before `start`. With `plan.chunk`, prefilled `chunk` tokens at a time
    against a KV cache (`[batch, kv_heads, pos, d_head]` per layer: memory = the KV cache + one chunk's activations)."""
    batch, n = tokens.shape
    chunk, store = plan.chunk or n, plan.store or m.device
    if chunk < start:
        raise ValueError(f"The teacher's chunk ({chunk} tokens) must hold the {start} positions before the student's start.")
    full = Teacher(None, [], [], [], start)
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    hidden = []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)

        def attend(index, layer, q, k, v, c0=c0, c1=c1):
            if chunk < n:  # earlier chunks' keys are needed: keep them in the cache
                if len(cache) == index:
                    cache.append((k.new_empty(batch, k.shape[1], n, k.shape[3]), v.new_empty(batch, v.shape[1], n, v.shape[3])))
                cache[index][0][:, :, c0:c1], cache[index][1][:, :, c0:c1] = k, v
                k, v = cache[index][0][:, :, :c1], cache[index][1][:, :, :c1]
            out = causal_attention(q, k, v, layer.scaling)  # [batch, heads, c1 - c0, d_head]
            if c0 == 0:
                full.keys.append(k[:, :, :start].clone())
                full.values.append(v[:, :, :start].clone())
                full.attention.append(out.new_empty(batch, n - start, out.shape[1], out.shape[3], device=store))
            full.attention[index][:, max(c0, start) - start:c1 - start] = out[:, :, max(start - c0, 0):].transpose(1, 2)
            return out

        hidden.append(run_layers(m, tokens[:, c0:c1], attend, start=c0))
    full.hidden = torch.cat(hidden, dim=1)
    return full


def gated_attention(gates: torch.Tensor, full: Teacher, sink: int, recent: int, p0: int) -> Attend:
    """The student's `attend` for queries at absolute positions `[p0, p0 + t)` whose keys are the teacher's before
    `full.start` and their own: `(1 - alpha) * streaming + alpha * full` per KV head's query heads."""
    window = Window(sink, recent)

    def attend(index, layer, q, k, v):
        t, device = q.shape[2], q.device
        q_pos = torch.arange(p0, p0 + t, device=device)
        k_pos = torch.cat([torch.arange(full.start, device=device), q_pos])
        k, v = torch.cat([full.keys[index], k], dim=2), torch.cat([full.values[index], v], dim=2)
        group = q.shape[1] // k.shape[1]
        alpha = gates[index].clamp(0, 1).repeat_interleave(group).view(1, -1, 1, 1).to(q.dtype)  # query head h reads KV head h // group
        streaming = sdpa(layer, q, k, v, allowed_keys(q_pos, k_pos, window))
        return (1 - alpha) * streaming + alpha * full.attention_rows(index, p0, p0 + t, device).to(q.dtype)

    return attend


def student(m: ModelModules, tokens: torch.Tensor, gates: torch.Tensor, full: Teacher, sink: int, recent: int) -> torch.Tensor:
    """The gated run: `gates` `[n_layers, n_kv_heads]` (clamped to [0, 1]) mix each layer's streaming attention with
    the teacher's full attention; returns the final-norm hidden states `[batch, pos - full.start, d_model]`.

    Only positions from `full.start` on are computed. A query before `sink + recent` sees every earlier key even
    when streaming, so up to there the gated run equals the full one exactly, at every layer: with
    `full.start <= sink + recent` the teacher's keys and values stand in for those positions (an exact saving of
    `start / pos` of the work)."""
    _check_start(full, sink, recent)
    return run_layers(m, tokens[:, full.start:], gated_attention(gates, full, sink, recent, full.start), full.start)


def _check_start(full: Teacher, sink: int, recent: int) -> None:
    if not sink <= full.start <= sink + recent:
        raise ValueError(f"The student must start between sink = {sink} and sink + recent = {sink + recent}, not at {full.start}.")


def _windows(t: int, chunk: int, recent: int) -> Iterator[tuple[int, int, int]]:
    """`(w0, i0, i1)` per chunk of `t` student positions: the chunk `[i0, i1)` and the first input its queries read."""
    for i0 in range(0, t, chunk):
        yield max(0, i0 - recent + 1), i0, min(t, i0 + chunk)


def layer_window(m: ModelModules, index: int, x: torch.Tensor, p0: int, attend: Attend) -> torch.Tensor:
    """Layer `index` on its input `x` `[batch, s, d_model]` at absolute positions `[p0, p0 + s)` -> the next layer's
    input `[batch, s, d_model]` (rows whose window reaches before `p0` are wrong; callers drop them)."""
    tables = m.rotary_tables(x, torch.arange(p0, p0 + x.shape[1], device=x.device))
    out, delta = run_layer(m, index, x, None, tables, attend, ModuleOps())
    return out + delta


def streamed_step(m: ModelModules, sample, gates: torch.Tensor, sink: int, recent: int, reg_weight: float,
                  plan: Plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step layer by layer, `plan.chunk` positions at a time (see the module docstring): accumulates the
    gradient into `gates.grad` as `losses(...)[0].backward()` would and returns the detached `(loss, distill, reg)`.
    Device memory: the teacher's KV cache during its prefill, then ~6 `[batch, pos, d_model]` tensors and one
    window's activations; `plan.store` keeps each layer's input and the teacher's attention outputs."""
    tokens, labels = sample.tokens.to(m.device), sample.labels.to(m.device)
    full = teacher(m, tokens, min(sink + recent, tokens.shape[1] - 1), plan)
    _check_start(full, sink, recent)
    windows = list(_windows(tokens.shape[1] - full.start, plan.chunk, recent))
    attends = [gated_attention(gates, full, sink, recent, full.start + w0) for w0, _, _ in windows]
    inputs = []
    with torch.no_grad():
        x = m.embed(tokens[:, full.start:])
        for index in range(m.n_layers):
            inputs.append(x.to(plan.store))
            out = torch.empty_like(x)
            for (w0, i0, i1), attend in zip(windows, attends):
                out[:, i0:i1] = layer_window(m, index, x[:, w0:i1], full.start + w0, attend)[:, i0 - w0:]
            x = out
    x.requires_grad_(True)
    loss, distill, reg = losses(ModuleOps().norm(m.final_norm, x), full, labels, gates, reg_weight)
    loss.backward()
    grad = x.grad
    for index in reversed(range(m.n_layers)):
        x, inputs[index] = inputs[index].to(m.device), None
        grad_in = torch.zeros_like(x)
        for (w0, i0, i1), attend in zip(windows, attends):
            piece = x[:, w0:i1].detach().requires_grad_(True)
            torch.autograd.backward(layer_window(m, index, piece, full.start + w0, attend)[:, i0 - w0:], grad[:, i0:i1])
            grad_in[:, w0:i1] += piece.grad
        grad = grad_in
    return loss.detach(), distill.detach(), reg.detach()


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
