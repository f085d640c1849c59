"""Rotary embedding and attention over cache segments (eager math, so it matches the reference exactly).

A query group attends over several segments (cache pages, then the chunk being processed) without
concatenating keys: the scores of all segments are concatenated, one float32 softmax runs over
them (as Hugging Face's eager attention does), and each segment's values are weighted separately.
Grouped-query attention needs no `repeat_kv`: the `g` query heads of a KV head are folded into the
query axis. Which key a query may see is decided by absolute positions:
full heads `k <= q`; streaming heads also `k < sink or q - k < recent` (as
`headlab.ablation.streaming_window_allowed`). A segment may also carry its own `[q, s]` bool table
(the compensation token of `cache.StreamingKV`: one key per query).

Two family quirks live here, as transformers computes them: partial rotary (GPT-NeoX, Phi-3 with
`partial_rotary_factor`: only the first `cos.shape[-1]` channels of a head rotate) and Gemma 2's
attention-logit soft-capping (`tanh(scores / cap) * cap` before the mask).
"""
from __future__ import annotations

import torch

from headlab.runtime.cache import LayerCache, Segment, Window


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x` `[batch, heads, pos, d_head]`, `cos`/`sin` `[batch or 1, pos, d_rot]` -> rotated `x` (as HF's
    `apply_rotary_pos_emb`; with `d_rot < d_head` the first `d_rot` channels rotate and the rest pass, as GPT-NeoX's)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    d_rot = cos.shape[-1]
    if d_rot == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    x_rot, x_pass = x[..., :d_rot], x[..., d_rot:]
    return torch.cat([(x_rot * cos) + (rotate_half(x_rot) * sin), x_pass], dim=-1)


def soft_cap(scores: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's logit soft-capping `tanh(scores / cap) * cap` (identity when `cap` is None)."""
    if cap is None:
        return scores
    return torch.tanh(scores / cap) * cap


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Window | None) -> torch.Tensor:
    """`[q, k]` bool from positions `q_pos` `[q]`, `k_pos` `[k]`: causal, and inside the streaming `window` when given."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed = allowed & window.keeps(q_pos, k_pos)
    return allowed


def segmented_attention(query: torch.Tensor, q_pos: torch.Tensor, segments: list[Segment], scaling: float,
                        window: Window | None, softcap: float | None = None) -> torch.Tensor:
    """Attention of `query` `[batch, n_kv, group, q, d_head]` over `segments`.

    Each segment is `(keys [batch, n_kv, s, d_head], values [batch, n_kv, s, d_head], positions [s],
    valid [s] or [q, s] or None)`. Returns `[batch, n_kv, group, q, d_head]`.
    """
    batch, n_kv, group, n_q, d_head = query.shape
    flat_q = query.reshape(batch, n_kv, group * n_q, d_head)
    scores = []
    for keys, _, k_pos, valid in segments:
        s = soft_cap(torch.matmul(flat_q, keys.transpose(-1, -2)) * scaling, softcap)  # [batch, n_kv, group * q, s]
        allowed = allowed_keys(q_pos, k_pos, window)
        if valid is not None:
            allowed = allowed & (valid if valid.dim() == 2 else valid[None, :])
        s = s.view(batch, n_kv, group, n_q, -1).masked_fill(~allowed, float("-inf"))
        scores.append(s.view(batch, n_kv, group * n_q, -1))
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1, dtype=torch.float32).to(query.dtype)
    out = None
    start = 0
    for _, values, _, _ in segments:
        size = values.shape[2]
        part = torch.matmul(probs[..., start:start + size], values)
        out = part if out is None else out + part
        start += size
    return out.view(batch, n_kv, group, n_q, d_head)


def cached_attention(layer: LayerCache, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                     scaling: float, softcap: float | None = None) -> torch.Tensor:
    """One layer's attention through its paged cache (the "eager" path of `CompressedLM` and the
    `transformers.Cache` of `headlab.runtime.hf`), then the chunk is stored.

    `query` `[batch, n_heads, t, d_head]`, the chunk's rotated `keys` / `values` `[batch, n_kv_heads, t, d_head]` at
    positions `start .. start + t - 1` -> `[batch, n_heads, t, d_head]`.
    """
    batch, n_heads, t, d_head = query.shape
    group = n_heads // keys.shape[1]
    q_pos = torch.arange(start, start + t, device=query.device)
    out = torch.empty_like(query)
    heads = layer.heads
    for kv_idx, q_idx, store in ((heads.full_kv, heads.full_q, layer.full), (heads.stream_kv, heads.stream_q, layer.streaming)):
        if kv_idx.numel() == 0:
            continue
        kv_idx, q_idx = kv_idx.to(query.device), q_idx.to(query.device)
        k_part, v_part = keys[:, kv_idx], values[:, kv_idx]
        segments = store.segments(start) + [(k_part, v_part, q_pos, None)]
        if store.window is not None and store.window.compensate:
            segments.append(store.compensation(segments, q_pos))
        part = segmented_attention(query[:, q_idx].view(batch, kv_idx.numel(), group, t, d_head), q_pos, segments,
                                   scaling, store.window, softcap)
        out[:, q_idx] = part.reshape(batch, -1, t, d_head)
        store.append(k_part, v_part, start)
    return out
