"""Batched ablation scan: the effect of ablating each head on its own, many heads per forward pass.

Scoring heads by ablation (Ships, per-head damage) needs one ablated forward pass per head. Instead
of a Python loop over heads, the inputs are repeated once per head of a chunk along the batch axis
and one hook per layer ablates head i only in its own block of rows, so a chunk of k heads costs
one pass on a batch k times larger:

    rows  [block 0: inputs with head h0 ablated | block 1: inputs with h1 ablated | ...]

Two exact savings make the batched pass do less work than k plain passes:
- Prefix sharing: ablating head (l, h) changes nothing before block l. The intact model runs once,
  keeping the residual entering each block (and the keyword arguments each block gets: attention
  mask, rotary cos/sin, ...); a chunk whose lowest layer is l_min runs only blocks l_min..L-1, the
  final norm and the unembedding, on the repeated cached residual (`forward_from`). Chunks are
  contiguous runs of `heads` cut at layer boundaries where they can be, so little is recomputed.
- Positions: a measure that reads only the last position (`positions="last"`, as `last_token_kl`
  declares) gets the unembedding of the last position only, `[k, batch, 1, d_vocab]`.

Methods: any `headlab.ablation.AblationMethod`, applied through its own `hooks` with per-block
`Targets` (block i of the repeated batch ablates head i). `measure(logits)` turns the logits of one
chunk into one number per head; `measure` sees `[k, batch, pos, d_vocab]` so it can compare each
block with the intact run.
The baseline it is benchmarked against (`analyses/scan_benchmark.py`) is a plain loop: one full
`lab.model(...)` forward per head with `headlab.ablation`'s hooks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from transformers.cache_utils import Cache

from headlab.ablation.engine import method_state
from headlab.ablation.methods import DEFAULT_METHOD, AblationMethod, Targets, make_method
from headlab.activations import kl_divergence
from headlab.heads import Head, all_heads
from headlab.lab import Lab

LogitsMeasure = Callable[[torch.Tensor], torch.Tensor]  # logits [k, batch, pos, d_vocab] -> [k]
POSITIONS = ("all", "last")  # which positions' logits a measure reads
PASS_BUDGET_BYTES = 512 * 2**20  # largest logits + attention scores one chunk may produce
# On a CPU, passes of more token rows than this ran slower per row once their activations outgrew the
# cache (2-core EPYC, 32 MiB L3, 8 x 32 tokens, 6 layers: 9 heads per pass 15% faster than 27, 27% than 54).
CPU_ROWS_PER_PASS = 4096


def block_targets(heads: list[Head], batch: int, first_block: int = 0) -> Targets:
    """`Targets` ablating `heads[i]` only in the rows of block `first_block + i`: `[i * batch, (i + 1) * batch)`."""
    targets: Targets = {}
    for block, (layer, head) in enumerate(heads, first_block):
        targets.setdefault(layer, []).append((slice(block * batch, (block + 1) * batch), [head]))
    return targets


def heads_per_pass(lab: Lab, tokens: torch.Tensor, chunk: int | None = None, positions: str = "all") -> int:
    """`chunk` checked, or by default as many heads as keep one pass's logits and attention scores under the
    budget, at most 32 (on a CPU, at most `CPU_ROWS_PER_PASS` token rows).

    `positions`: "all" (the logits of every position) or "last" (only the last position's).
    """
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 heads per pass; got {chunk}.")
        return chunk
    batch, pos = tokens.shape
    out_pos = 1 if positions == "last" else pos
    per_head = 4 * batch * (out_pos * lab.info.d_vocab + 2 * lab.info.n_heads * pos * pos)  # logits + scores, pattern
    most = 32 if not str(lab.device).startswith("cpu") else min(32, CPU_ROWS_PER_PASS // (batch * pos))
    return max(1, min(most, PASS_BUDGET_BYTES // per_head))


def layer_chunks(heads: list[Head], size: int) -> list[list[Head]]:
    """`heads` in order, cut into chunks of <= `size` heads, each starting at a layer change where it can.

    A chunk costs blocks l_min..L-1 for each of its heads, so a chunk spanning fewer layers recomputes less.
    E.g. 9 heads per layer and `size` 32 gives chunks of 3 whole layers (27 heads).
    """
    runs: list[list[Head]] = []  # maximal runs of consecutive heads of one layer
    for head in heads:
        if runs and runs[-1][0][0] == head[0]:
            runs[-1].append(head)
        else:
            runs.append([head])
    chunks: list[list[Head]] = []
    for run in runs:
        for i in range(0, len(run), size):
            piece = run[i:i + size]
            if chunks and len(chunks[-1]) + len(piece) <= size:
                chunks[-1] += piece
            else:
                chunks.append(list(piece))
    return chunks


@dataclass
class Prefix:
    """The intact pass, kept for re-entry: the residual entering the start blocks and every later block's kwargs.

    Attributes:
        resid: `{layer: [batch, pos, d_model]}` the residual stream entering block `layer` (start layers only).
        kwargs: `{layer: {...}}` the keyword arguments the HF model passed to block `layer` (mask, rotary
            cos/sin, position ids), for every layer from the lowest start on.
        logits: `[batch, pos, d_vocab]` the intact logits.
    """

    resid: dict[int, torch.Tensor]
    kwargs: dict[int, dict]
    logits: torch.Tensor


@torch.no_grad()
def intact_prefix(lab: Lab, tokens: torch.Tensor, starts: set[int]) -> Prefix:
    """One plain forward of `tokens` `[batch, pos]`, capturing what `forward_from` needs to re-enter at `starts`."""
    resid: dict[int, torch.Tensor] = {}
    kwargs: dict[int, dict] = {}

    def capture(module: torch.nn.Module, args: tuple, kw: dict, layer: int) -> None:
        if layer in starts:
            resid[layer] = args[0] if args else kw["hidden_states"]
        kwargs[layer] = {k: v for k, v in kw.items() if k != "hidden_states" and not isinstance(v, Cache)}
        if "use_cache" in kwargs[layer]:  # the intact pass's KV cache is dropped: re-entry keeps none
            kwargs[layer]["use_cache"] = False

    blocks = lab.model.blocks
    handles = [blocks[layer].register_forward_pre_hook(partial(capture, layer=layer), with_kwargs=True)
               for layer in range(min(starts), len(blocks))]
    try:
        logits = lab.model(tokens, return_type="logits")
    finally:
        for handle in handles:
            handle.remove()
    return Prefix(resid, kwargs, logits)


def _repeat_rows(value, batch: int, k: int):
    """`value` with every batch-first tensor (`[batch, ...]`, 2-D or more) repeated k times, block-major.

    With batch > 1, tensors of first axis 1 (rotary cos/sin, position ids) broadcast and stay as they are."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch:
        return value.repeat(k, *[1] * (value.ndim - 1))
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_rows(v, batch, k) for v in value)
    if isinstance(value, dict):
        return {key: _repeat_rows(v, batch, k) for key, v in value.items()}
    return value


def forward_from(lab: Lab, prefix: Prefix, layer: int, k: int, last_only: bool = False) -> torch.Tensor:
    """Logits of blocks `layer`..L-1, final norm and unembedding on k copies of the intact residual entering `layer`.

    Returns `[k * batch, pos, d_vocab]` (`[k * batch, 1, d_vocab]` with `last_only`), rows block-major as
    `tokens.repeat(k, 1)`. Every TransformerLens hook inside those blocks fires as in a full forward.

    Not `lab.model(resid, start_at_layer=layer)`: TransformerLens 4.3's bridge still runs blocks 0..layer-1
    there and only discards their output (`_setup_start_at_layer`, `BlockBridge._maybe_inject_start_residual`),
    which saves nothing. Here the bridge's own blocks, `ln_final` and `unembed` are called directly with
    the kwargs captured from the intact pass.
    """
    batch = prefix.logits.shape[0]
    x = prefix.resid[layer].repeat(k, 1, 1)  # [k * batch, pos, d_model]
    for index in range(layer, len(lab.model.blocks)):
        out = lab.model.blocks[index](x, **_repeat_rows(prefix.kwargs[index], batch, k))
        x = out[0] if isinstance(out, tuple) else out
    if last_only:
        x = x[:, -1:]
    return lab.model.unembed(lab.model.ln_final(x))


def _reentry_is_exact(lab: Lab, prefix: Prefix) -> bool:
    """Whether `forward_from` the last block (in `prefix.resid`), on 2 copies, reproduces the intact logits.

    Guards other architectures: a logit soft-cap or another step between the last block and the
    unembedding that the bridge's `ln_final` / `unembed` do not cover.
    """
    got = forward_from(lab, prefix, len(lab.model.blocks) - 1, 2, last_only=True).float()
    want = prefix.logits[:, -1:].float().repeat(2, 1, 1)
    scale = float(want.abs().max())
    return float((got - want).abs().max()) <= max(1e-4, 8 * torch.finfo(lab.dtype).eps) * scale


def plan_passes(lab: Lab, tokens: torch.Tensor, heads: list[Head], chunk: int | None, positions: str,
                shared_prefix: bool) -> tuple[list[list[Head]], Prefix | None]:
    """The chunks of `heads` one pass each ablates, and the intact prefix they re-enter (None: full passes).

    Falls back to full passes, with a warning, where re-entering the model at a block does not reproduce its logits.
    """
    if shared_prefix:
        chunks = layer_chunks(heads, heads_per_pass(lab, tokens, chunk, positions))
        prefix = intact_prefix(lab, tokens, {min(l for l, _ in part) for part in chunks} | {lab.info.n_layers - 1})
        if _reentry_is_exact(lab, prefix):
            return chunks, prefix
        warnings.warn(f"{lab.info.name}: re-entering the model at a block does not reproduce its logits; "
                      "the scan runs full forward passes instead.", RuntimeWarning, stacklevel=3)
    # full forward passes put out every position's logits: budget for them all
    return layer_chunks(heads, heads_per_pass(lab, tokens, chunk, "all")), None


@torch.no_grad()
def ablation_scan(
    lab: Lab,
    tokens: torch.Tensor,
    measure: LogitsMeasure,
    *,
    method: str | AblationMethod = DEFAULT_METHOD,
    method_params: dict | None = None,
    heads: list[Head] | None = None,
    reference: torch.Tensor | None = None,
    chunk: int | None = None,
    positions: str | None = None,
    shared_prefix: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> torch.Tensor:
    """`measure` with each head of `heads` (default: every head) ablated on its own, batched, prefix shared.

    Args:
        tokens: `[batch, pos]` inputs (one length, no padding).
        measure: logits `[k, batch, pos, d_vocab]` of k ablated copies -> `[k]` values; called once per
            chunk, chunks in `heads` order.
        method, method_params: the ablation method (a name with its parameters, or an `AblationMethod`).
        reference: tokens whose per-head mean output `mean` ablation uses (default `tokens`).
        chunk: heads per pass (default: as many as keep the logits and scores under 512 MiB, <= 32).
        positions: "all", or "last" (the measure reads only the last position, so it gets
            `[k, batch, 1, d_vocab]`); default: `measure.positions` if it has one, else "all".
        shared_prefix: False runs every chunk as a full forward of the repeated batch (no prefix
            sharing; for comparison). True falls back to that, with a warning, where re-entering
            the model at a block does not reproduce its logits.
    Returns:
        `[n_layers, n_heads]` values (NaN for heads not scanned).
    """
    method = make_method(method, **(method_params or {}))
    positions = positions or getattr(measure, "positions", "all")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}; got {positions!r}.")
    info = lab.info
    heads = heads if heads is not None else all_heads(info)
    state = method_state(lab, method, reference if reference is not None else tokens)
    tokens = tokens.to(lab.device)
    batch = tokens.shape[0]
    chunks, prefix = plan_passes(lab, tokens, heads, chunk, positions, shared_prefix)
    out = torch.full((info.n_layers, info.n_heads), float("nan"))
    done = 0
    for part in chunks:
        with lab.model.hooks(fwd_hooks=method.hooks(lab, block_targets(part, batch), state)):
            if prefix is not None:
                logits = forward_from(lab, prefix, min(l for l, _ in part), len(part), positions == "last")
            else:
                logits = lab.model(tokens.repeat(len(part), 1), return_type="logits")
                logits = logits[:, -1:] if positions == "last" else logits
        values = measure(logits.view(len(part), batch, *logits.shape[1:]).float())
        for (layer, head), value in zip(part, values.tolist()):
            out[layer, head] = value
        done += len(part)
        if progress is not None:
            progress(done / len(heads), f"scanned {done} of {len(heads)} heads")
    return out


def last_token_kl(intact_logits: torch.Tensor) -> LogitsMeasure:
    """A `measure`: KL(intact || ablated) of the next-token distribution at the last position, mean over the batch.

    `intact_logits` `[batch, pos, d_vocab]` from the unablated model on the same tokens.
    """
    intact = torch.log_softmax(intact_logits[:, -1].float(), dim=-1)  # [batch, vocab]

    def measure(logits: torch.Tensor) -> torch.Tensor:
        return kl_divergence(intact, logits[:, :, -1]).mean(-1)  # [k, batch] -> [k]

    measure.positions = "last"  # reads only the last position: the scan unembeds only that one
    return measure
