"""The GPU path of the runtime: contiguous preallocated buffers, SDPA prefill, a static-shape decode step.

`StaticCache(mask, batch, d_head, max_length, ...)` allocates everything up front, so its bytes are
exactly `HeadMask.ideal_kv_bytes(max_length)`:
- full KV heads: `[batch, n_full, max_length, d_head]` keys and values, slot = position;
- streaming KV heads: `[batch, n_stream, window, d_head]`, `window = min(max_length, sink + recent)`:
  positions `< sink` keep their slot, later ones go to a ring (`sink + (pos - sink) % recent`).
  One `slot_pos` `[window]` (the position each slot holds, -1 = empty) serves every layer, since
  all layers store the same positions.

Prefill (`StaticLayer.prefill`, a chunk of `t` tokens after `start`): full heads write the chunk
into their buffer and attend over `[0, start + t)` with a bottom-right causal bias
(`torch.nn.attention.bias.causal_lower_right`, no materialised mask: flash attention on CUDA, with
the KV-head grouping done by the kernel); streaming heads attend over ring + chunk with a small
`[t, window + t]` mask, then keep the chunk's sink tokens and its last `recent` in the ring.

Decode (`StaticLayer.decode`, one token at the device-side position `cache.pos`): index_copy_
writes, a mask derived on the device, float32 softmax over the whole (static-shape) buffer: no
host synchronisation and no shape that depends on the position, so `CompressedLM` can capture the
whole step in a CUDA graph. On CUDA the decode attention is the split-KV Triton kernel of
`headlab.runtime.decode_kernel` (the same function as `grouped_attention`, which a `[rows, s]`
score matrix and two matmuls make slow when `s` is long); `DECODE_KERNEL = "eager"` turns it off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

DECODE_KERNEL = "auto"  # "auto": the Triton split-KV kernel on CUDA when Triton imports; "eager": grouped_attention


def decode_attention(query, keys, values, allowed, scaling: float) -> torch.Tensor:
    """`grouped_attention` with a 1-d `allowed` `[s]`, through the Triton kernel on CUDA (see `DECODE_KERNEL`)."""
    if DECODE_KERNEL == "auto" and query.is_cuda:
        try:
            from headlab.runtime.decode_kernel import split_kv_attention
        except ImportError:
            pass
        else:
            return split_kv_attention(query, keys, values, allowed, scaling)
    return grouped_attention(query, keys, values, allowed, scaling)


def grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eager attention of `query` `[batch, n_kv, rows, d_head]` over `keys`/`values` `[batch, n_kv, s, d_head]`;
    `allowed` broadcasts to `[rows, s]`. Float32 softmax, as Hugging Face's eager attention. Used for decode,
    where the rows are the group's query heads at one position (no GQA expansion, K and V read once)."""
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, values)


class StaticLayer:
    """One layer's buffers: full heads `full_kv` `[2, batch, n_full, max_length, d]` (keys, values; views
    `full_k`/`full_v`), streaming heads `stream_kv` `[2, batch, n_stream, window, d]` (`stream_k`/`stream_v`).
    Keys and values of a kind share one tensor so a decode step stores both with one write."""

    def __init__(self, batch: int, n_full: int, n_stream: int, d_head: int, max_length: int, window: int, dtype, device) -> None:
        def buf(n: int, slots: int) -> torch.Tensor:  # zeros: a masked slot must never hold NaN (0 * NaN = NaN)
            return torch.zeros(2, batch, n, slots, d_head, dtype=dtype, device=device)

        self.full_kv, self.stream_kv = buf(n_full, max_length), buf(n_stream, window)
        self.full_k, self.full_v = self.full_kv.unbind(0)
        self.stream_k, self.stream_v = self.stream_kv.unbind(0)
        self.n_full, self.n_stream = n_full, n_stream

    def nbytes(self) -> int:
        return self.full_kv.untyped_storage().nbytes() + self.stream_kv.untyped_storage().nbytes()


class ChunkPlan:
    """What every layer needs to prefill one chunk (computed once per chunk)."""

    def __init__(self, cache: "StaticCache", start: int, t: int) -> None:
        device = cache.device
        self.start, self.t = start, t
        q_pos = torch.arange(start, start + t, device=device)
        k_pos = torch.cat([cache.slot_pos, q_pos])
        q, k = q_pos[:, None], k_pos[None, :]
        self.stream_allowed = (k >= 0) & (k <= q) & ((k < cache.sink) | (q - k < cache.recent))  # [t, window + t]
        keep = (q_pos < cache.sink) | (q_pos >= start + t - cache.recent)
        self.keep = keep.nonzero().flatten()  # chunk offsets the ring keeps (distinct slots)
        kept = q_pos[self.keep]
        self.keep_slots = cache.slot_of(kept)
        self.kept_pos = kept


class StaticCache:
    """All layers' preallocated buffers, the tokens seen (`length` on the host, `pos` on the device)."""

    def __init__(self, mask, batch: int, d_head: int, max_length: int, dtype: torch.dtype, device) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, not {max_length}.")
        self.sink, self.recent, self.max_length = mask.sink, mask.recent, int(max_length)
        self.window = min(self.max_length, mask.sink + mask.recent)
        self.batch, self.device = batch, torch.device(device)
        self.layers = [
            StaticLayer(batch, int(mask.full[layer].sum()), mask.n_kv_heads - int(mask.full[layer].sum()), d_head,
                        self.max_length, self.window, dtype, device)
            for layer in range(mask.n_layers)
        ]
        self.slot_pos = torch.full((self.window,), -1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # position of the next token
        self.slots = torch.arange(self.max_length, device=device)
        self.length = 0

    def nbytes(self) -> int:
        """Bytes held by all key and value buffers (fixed at allocation)."""
        return sum(layer.nbytes() for layer in self.layers)

    def slot_of(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sink, pos, self.sink + (pos - self.sink) % self.recent)

    def check_room(self, t: int) -> None:
        if self.length + t > self.max_length:
            raise ValueError(f"The cache was allocated for max_length={self.max_length} tokens; it holds {self.length} "
                             f"and {t} more do not fit: reset() and pass a larger max_length.")

    # --- prefill -----------------------------------------------------------------------------

    def plan(self, start: int, t: int) -> ChunkPlan:
        return ChunkPlan(self, start, t)

    def finish_chunk(self, plan: ChunkPlan) -> None:
        """After every layer stored the chunk: the ring's slots now hold the kept positions."""
        self.slot_pos.index_copy_(0, plan.keep_slots, plan.kept_pos)
        self.length = plan.start + plan.t
        self.pos.fill_(self.length)

    def prefill_full(self, layer: StaticLayer, query, keys, values, plan: ChunkPlan, scaling: float) -> torch.Tensor:
        """`query` `[batch, n_full * group, t, d]`, chunk `keys`/`values` `[batch, n_full, t, d]` -> `[batch, n_full * group, t, d]`."""
        end = plan.start + plan.t
        layer.full_k[:, :, plan.start:end] = keys
        layer.full_v[:, :, plan.start:end] = values
        return F.scaled_dot_product_attention(
            query, layer.full_k[:, :, :end], layer.full_v[:, :, :end], attn_mask=causal_lower_right(plan.t, end),
            scale=scaling, enable_gqa=True)

    def prefill_stream(self, layer: StaticLayer, query, keys, values, plan: ChunkPlan, scaling: float) -> torch.Tensor:
        """Streaming heads: attend over ring + chunk, then store the chunk's kept tokens in the ring."""
        group = query.shape[1] // keys.shape[1]
        all_k = torch.cat([layer.stream_k, keys], dim=2).repeat_interleave(group, dim=1)  # window + t keys: small
        all_v = torch.cat([layer.stream_v, values], dim=2).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, all_k, all_v, attn_mask=plan.stream_allowed, scale=scaling)
        layer.stream_k.index_copy_(2, plan.keep_slots, keys.index_select(2, plan.keep))
        layer.stream_v.index_copy_(2, plan.keep_slots, values.index_select(2, plan.keep))
        return out

    # --- decode (static shapes, device position) -----------------------------------------------

    def begin_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Before the layers of a decode step: the stream slot of `pos`, and the full / streaming key masks."""
        slot = self.slot_of(self.pos)
        self.slot_pos.index_copy_(0, slot, self.pos)
        return slot, self.slots <= self.pos, self.slot_pos >= 0

    def end_step(self) -> None:
        self.pos.add_(1)

    def decode(self, layer: StaticLayer, q_full, kv_full, q_stream, kv_stream, step, scaling: float):
        """One token: `q_*` `[batch, n_kv, group, d]`, `kv_*` `[2, batch, n_kv, 1, d]` (keys, values) -> outputs like `q_*`."""
        slot, full_allowed, stream_allowed = step
        out_full = out_stream = None
        if layer.n_full:
            layer.full_kv.index_copy_(3, self.pos, kv_full)
            out_full = decode_attention(q_full, layer.full_k, layer.full_v, full_allowed, scaling)
        if layer.n_stream:
            layer.stream_kv.index_copy_(3, slot, kv_stream)
            out_stream = decode_attention(q_stream, layer.stream_k, layer.stream_v, stream_allowed, scaling)
        return out_full, out_stream
