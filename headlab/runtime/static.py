"""The GPU path of the runtime: contiguous preallocated buffers, SDPA prefill, a static-shape decode step.

`StaticCache(layout, batch, d_head, max_length, ...)` (`layout` from `cache.layer_layout`: each layer's
full KV heads and its streaming `Window`) allocates everything up front, so its bytes are exactly
`HeadMask.ideal_kv_bytes(max_length)` when no layer is a sliding-window layer and without compensation:
- full KV heads: `[batch, n_full, max_length, d_head]` keys and values, slot = position;
- streaming KV heads: `[batch, n_stream, window, d_head]`, `window = min(max_length, sink + recent)`:
  positions `< sink` keep their slot, later ones go to a ring (`sink + (pos - sink) % recent`).
  One `Ring` per distinct `Window` (the mask's, a sliding-window layer's) holds `slot_pos`
  `[window]` (the position each slot holds, -1 = empty) for every layer using it, since they all
  store the same positions. With `Window.compensate` the buffer has one more slot, `window`, holding
  the mean of the evicted keys and values (RazorAttention's compensation token; `cache` module),
  and the layer keeps their float32 sums `evicted_sums` `[2, batch, n_stream, d_head]`.

Prefill (a chunk of `t` tokens after `start`): full heads write the chunk into their buffer and
attend over `[0, start + t)` with a bottom-right causal bias
(`torch.nn.attention.bias.causal_lower_right`, no materialised mask: flash attention on CUDA, with
the KV-head grouping done by the kernel); streaming heads attend over ring + chunk with a small
`[t, window + t]` mask (plus, compensated, one mean key per query on a diagonal), then keep the
chunk's sink tokens and its last `recent` in the ring. Gemma 2's logit soft-capping, which SDPA
lacks, goes through `grouped_attention` in blocks of queries (`masked_attention`).

Decode (`StaticCache.decode`, one token at the device-side position `cache.pos`, all of a layer's
KV heads in model order): rotate the token's query and key (RoPE), store its keys and values (full heads at slot `pos`, streaming
heads at their ring slot) and attend, each KV head over the slots it holds: no host
synchronisation and no shape that depends on the position, so `CompressedLM` can capture the whole
step in a CUDA graph. On CUDA this is one launch of the split-KV Triton kernel of
`headlab.runtime.decode_kernel` for full and streaming heads together (plus a combine), reading
exactly the bytes held; elsewhere, or with `DECODE_KERNEL = "eager"`, `decode_reference`: index_copy_
writes and `grouped_attention` with masks derived on the device (the same function).

A model sharded over several devices (`layer_devices`): each layer's buffers live on its layer's device, and each
device keeps its own copy of the little shared state (`DeviceState`: the position `pos`, the rings' `slot_pos`),
updated by the same calls, so no layer reads a tensor of another device. The first device's state is also
`StaticCache.pos` / `.slots` / `.rings`, the whole state on one device.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from headlab.runtime.attention import apply_rotary, soft_cap
from headlab.runtime.cache import Window, evicted_means

DECODE_KERNEL = "auto"  # "auto": the Triton kernel on CUDA when Triton imports; "eager": decode_reference


def triton_decode():
    """`decode_kernel.decode_layer` when `DECODE_KERNEL` is "auto" and Triton imports, else None."""
    if DECODE_KERNEL != "auto":
        return None
    try:
        from headlab.runtime.decode_kernel import decode_layer
    except ImportError:
        return None
    return decode_layer


def grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scaling: float,
                      softcap: float = 0.0) -> torch.Tensor:
    """Eager attention of `query` `[batch, n_kv, rows, d_head]` over `keys`/`values` `[batch, n_kv, s, d_head]`;
    `allowed` broadcasts to `[rows, s]`. Float32 softmax, as Hugging Face's eager attention; `softcap` > 0 caps the
    scores at `softcap * tanh(s / softcap)` (Gemma 2). Used for decode, where the rows are the group's query heads at
    one position (no GQA expansion, K and V read once)."""
    scores = soft_cap(torch.matmul(query, keys.transpose(-1, -2)) * scaling, softcap or None)  # 0: no cap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, values)


def masked_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
                     scaling: float, softcap: float = 0.0, block: int = 512) -> torch.Tensor:
    """Prefill attention of `query` `[batch, n_q, t, d]` over `keys`/`values` `[batch, n_kv, s, d]` -> `[batch, n_q, t, d]`;
    `allowed` `[t, s]` bool, or None for causal with the queries at the last `t` positions. SDPA (causal: flash on CUDA,
    the KV-head grouping done by the kernel; masked: the few keys repeated per query head); with `softcap`, which SDPA
    lacks, `grouped_attention` on `block` queries at a time (the scores of one block only)."""
    t, s = query.shape[2], keys.shape[2]
    group = query.shape[1] // keys.shape[1]
    if not softcap:
        if allowed is None:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=causal_lower_right(t, s), scale=scaling,
                                                  enable_gqa=True)
        return F.scaled_dot_product_attention(query, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1),
                                              attn_mask=allowed, scale=scaling)
    if allowed is None:
        allowed = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
    batch, n_kv, d = keys.shape[0], keys.shape[1], query.shape[-1]
    rows = query.view(batch, n_kv, group, t, d)
    out = torch.empty_like(rows)
    for i in range(0, t, block):  # a KV head's query heads as rows: [batch, n_kv, group * b, d]
        q = rows[:, :, :, i:i + block]
        b = q.shape[3]
        part = grouped_attention(q.reshape(batch, n_kv, group * b, d), keys, values, allowed[i:i + block].repeat(group, 1),
                                 scaling, softcap)
        out[:, :, :, i:i + block] = part.view(batch, n_kv, group, b, d)
    return out.view_as(query)


class Ring:
    """The slots of one streaming `Window` in a buffer of `min(max_length, sink + recent)`, and the position each holds
    (`slot_pos`, -1 = empty), shared by every layer whose streaming heads use this window."""

    def __init__(self, window: Window, max_length: int, device) -> None:
        self.window = window
        self.size = min(max_length, window.size)
        self.slot_pos = torch.full((self.size,), -1, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        """Buffer slots per streaming head: the ring, and the compensation token's slot when compensated."""
        return self.size + int(self.window.compensate)


class StaticLayer:
    """One layer's buffers: full heads `full_kv` `[2, batch, n_full, max_length, d]` (keys, values; views
    `full_k`/`full_v`), streaming heads `stream_kv` `[2, batch, n_stream, ring.slots, d]` (`stream_k`/`stream_v`),
    built from the layer's row of the layout, `full` `[n_kv_heads]` bool, and its `Ring`. `full_heads`/`stream_heads`
    are the model's KV-head indices held by each buffer, in buffer order; `order` `[n_kv_heads]` int32 is both, full
    first. Keys and values of a kind share one tensor so a decode step stores both with one write."""

    def __init__(self, batch: int, full: torch.Tensor, ring: Ring, d_head: int, max_length: int, dtype, device) -> None:
        self.device = torch.device(device)

        def buf(n: int, slots: int) -> torch.Tensor:  # zeros: a masked slot must never hold NaN (0 * NaN = NaN)
            return torch.zeros(2, batch, n, slots, d_head, dtype=dtype, device=device)

        full = torch.as_tensor(full, dtype=torch.bool).cpu()
        self.ring = ring
        self.full_heads = torch.nonzero(full).flatten().to(device)
        self.stream_heads = torch.nonzero(~full).flatten().to(device)
        self.order = torch.cat([self.full_heads, self.stream_heads]).to(torch.int32)
        self.n_full, self.n_stream = self.full_heads.numel(), self.stream_heads.numel()
        self.full_kv, self.stream_kv = buf(self.n_full, max_length), buf(self.n_stream, ring.slots)
        self.full_k, self.full_v = self.full_kv.unbind(0)
        self.stream_k, self.stream_v = self.stream_kv.unbind(0)
        self.evicted_sums = (torch.zeros(2, batch, self.n_stream, d_head, dtype=torch.float32, device=device)
                             if ring.window.compensate and self.n_stream else None)

    def nbytes(self) -> int:
        extra = self.evicted_sums.untyped_storage().nbytes() if self.evicted_sums is not None else 0
        return self.full_kv.untyped_storage().nbytes() + self.stream_kv.untyped_storage().nbytes() + extra


class RingPlan:
    """What the layers of one `Ring` need to prefill a chunk at positions `q_pos` `[t]` (from `start`)."""

    def __init__(self, ring: Ring, q_pos: torch.Tensor, start: int, t: int) -> None:
        w = ring.window
        k_pos = torch.cat([ring.slot_pos, q_pos])
        held = k_pos >= 0
        self.allowed = held[None, :] & (k_pos[None, :] <= q_pos[:, None]) & w.keeps(q_pos, k_pos)  # [t, size + t]
        keep = (q_pos < w.sink) | (q_pos >= start + t - w.recent)
        self.keep = keep.nonzero().flatten()  # chunk offsets the ring keeps (distinct slots)
        self.kept_pos = q_pos[self.keep]
        self.keep_slots = w.slot_of(self.kept_pos)
        if w.compensate:  # query i's own mean key sits at column size + t + i
            self.take = (w.evicted(q_pos, k_pos) & held[None, :]).to(torch.float32)  # [t, size + t]
            self.count = w.n_evicted(q_pos)
            diagonal = torch.eye(t, dtype=torch.bool, device=q_pos.device) & (self.count > 0)[:, None]
            self.allowed = torch.cat([self.allowed, diagonal], dim=1)


class ChunkPlan:
    """What every layer needs to prefill one chunk (computed once per chunk): a `RingPlan` per ring, keyed by
    `(device, window)`."""

    def __init__(self, cache: "StaticCache", start: int, t: int) -> None:
        self.start, self.t = start, t
        self.rings = {}
        for device, state in cache.states.items():
            q_pos = torch.arange(start, start + t, device=device)
            self.rings.update({(device, window): RingPlan(ring, q_pos, start, t) for window, ring in state.rings.items()})


class DeviceState:
    """What the layers on one device share: the position of the next token `pos` `[1]`, `slots` `[max_length]`
    (0, 1, ...), one `Ring` per streaming window, and the decode step's ring slot per window (`step_slots`)."""

    def __init__(self, device: torch.device, max_length: int) -> None:
        self.device = device
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_length, device=device)
        self.rings: dict[Window, Ring] = {}
        self.step_slots: dict[Window, torch.Tensor] = {}

    def ring(self, window: Window, max_length: int) -> Ring:
        if window not in self.rings:
            self.rings[window] = Ring(window, max_length, self.device)
        return self.rings[window]


class StaticCache:
    """All layers' preallocated buffers, the tokens seen (`length` on the host, `pos` on the device); layer l's buffers
    on `layer_devices[l]` (default: all on `device`)."""

    def __init__(self, layout: list[tuple[torch.Tensor, Window]], batch: int, d_head: int, max_length: int,
                 dtype: torch.dtype, device, layer_devices: list | None = None) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, not {max_length}.")
        self.max_length = int(max_length)
        self.batch, self.device = batch, torch.device(device)
        devices = [torch.device(d) for d in (layer_devices or [device] * len(layout))]
        self.states = {self.device: DeviceState(self.device, self.max_length)}
        for d in devices:
            self.states.setdefault(d, DeviceState(d, self.max_length))
        self.layers = [StaticLayer(batch, full, self.states[d].ring(window, self.max_length), d_head, self.max_length,
                                   dtype, d) for (full, window), d in zip(layout, devices, strict=True)]
        first = self.states[self.device]
        self.pos, self.slots, self.rings = first.pos, first.slots, first.rings  # position of the next token, ...
        self.length = 0

    def nbytes(self) -> int:
        """Bytes held by all key and value buffers (fixed at allocation)."""
        return sum(layer.nbytes() for layer in self.layers)

    def restart(self) -> None:
        """Empty the cache in place for a new sequence: every ring slot empty, position 0, evicted sums zero. The
        buffers (and so a decode graph captured on them) stay; their old keys and values are never read again
        (prefill reads full slots `[0, end)` and ring slots marked held, decode reads `[0, pos]`)."""
        for state in self.states.values():
            state.pos.zero_()
            for ring in state.rings.values():
                ring.slot_pos.fill_(-1)
        for layer in self.layers:
            if layer.evicted_sums is not None:
                layer.evicted_sums.zero_()
        self.length = 0

    def check_room(self, t: int) -> None:
        if self.length + t > self.max_length:
            raise ValueError(f"The cache was allocated for max_length={self.max_length} tokens; it holds {self.length} "
                             f"and {t} more do not fit: reset() and pass a larger max_length.")

    # --- prefill -----------------------------------------------------------------------------

    def plan(self, start: int, t: int) -> ChunkPlan:
        return ChunkPlan(self, start, t)

    def finish_chunk(self, plan: ChunkPlan) -> None:
        """After every layer stored the chunk: the rings' slots now hold the kept positions."""
        for device, state in self.states.items():
            for window, ring in state.rings.items():
                ring_plan = plan.rings[(device, window)]
                ring.slot_pos.index_copy_(0, ring_plan.keep_slots, ring_plan.kept_pos)
        self.length = plan.start + plan.t
        for state in self.states.values():
            state.pos.fill_(self.length)

    def hold(self, context: int) -> None:
        """Set the bookkeeping as a prefill of `context` tokens leaves it (each ring's `slot_pos`: the sink and the last
        `recent` positions; `pos`, `length`), without touching the buffers (`benchmark.synthetic_prefill`)."""
        self.check_room(context - self.length)
        for state in self.states.values():
            held = torch.arange(context, device=state.device)
            for window, ring in state.rings.items():
                kept = held[(held < window.sink) | (held >= context - window.recent)]
                ring.slot_pos.fill_(-1)
                ring.slot_pos.index_copy_(0, window.slot_of(kept), kept)
            state.pos.fill_(context)
        self.length = context

    def prefill_full(self, layer: StaticLayer, query, keys, values, plan: ChunkPlan, scaling: float,
                     softcap: float = 0.0) -> torch.Tensor:
        """`query` `[batch, n_full * group, t, d]`, chunk `keys`/`values` `[batch, n_full, t, d]` -> `[batch, n_full * group, t, d]`."""
        end = plan.start + plan.t
        layer.full_k[:, :, plan.start:end] = keys
        layer.full_v[:, :, plan.start:end] = values
        return masked_attention(query, layer.full_k[:, :, :end], layer.full_v[:, :, :end], None, scaling, softcap)

    def prefill_stream(self, layer: StaticLayer, query, keys, values, plan: ChunkPlan, scaling: float,
                       softcap: float = 0.0) -> torch.Tensor:
        """Streaming heads: attend over ring + chunk (+ each query's compensation token), then store the chunk's kept
        tokens in the ring."""
        ring_plan, size = plan.rings[(layer.device, layer.ring.window)], layer.ring.size
        all_k = torch.cat([layer.stream_k[:, :, :size], keys], dim=2)  # size + t keys: small
        all_v = torch.cat([layer.stream_v[:, :, :size], values], dim=2)
        if layer.evicted_sums is not None:
            means, sums = evicted_means(layer.evicted_sums, ring_plan.take, ring_plan.count, all_k, all_v)
            layer.evicted_sums.copy_(sums)
            all_k, all_v = torch.cat([all_k, means[0]], dim=2), torch.cat([all_v, means[1]], dim=2)
        out = masked_attention(query, all_k, all_v, ring_plan.allowed, scaling, softcap)
        layer.stream_k.index_copy_(2, ring_plan.keep_slots, keys.index_select(2, ring_plan.keep))
        layer.stream_v.index_copy_(2, ring_plan.keep_slots, values.index_select(2, ring_plan.keep))
        return out

    # --- decode (static shapes, device position) -----------------------------------------------

    def begin_step(self) -> dict[Window, torch.Tensor]:
        """Before the layers of a decode step: each ring's slot of `pos` `[1]` (and its `slot_pos` records it), on every
        device (`DeviceState.step_slots`); returns the first device's `{window: slot}`."""
        for state in self.states.values():
            state.step_slots = {window: window.slot_of(state.pos) for window in state.rings}
            for window, ring in state.rings.items():
                ring.slot_pos.index_copy_(0, state.step_slots[window], state.pos)
        return self.states[self.device].step_slots

    def end_step(self) -> None:
        for state in self.states.values():
            state.pos.add_(1)

    @contextlib.contextmanager
    def rewound(self):
        """A decode step run inside leaves no trace (each warm-up step before a CUDA graph capture): the position is
        put back and, with the compensation token, the streaming buffers and evicted sums too (the step overwrote the
        evicted token the real step must add). Other writes are idempotent (the same token to the same slot)."""
        pos = self.pos.clone()
        saved = [(layer.stream_kv.clone(), layer.evicted_sums.clone()) if layer.evicted_sums is not None else None
                 for layer in self.layers]
        yield
        self.pos.copy_(pos)
        for layer, state in zip(self.layers, saved):
            if state is not None:
                layer.stream_kv.copy_(state[0])
                layer.evicted_sums.copy_(state[1])

    def decode(self, layer: StaticLayer, query, key, value, scaling: float, softcap: float = 0.0,
               rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One token (after `begin_step`), every KV head of `layer`: `query` `[batch, n_kv, group, d]` (a KV head's query
        heads as rows), `key`/`value` `[batch, n_kv, d]` -> `[batch, n_kv, group, d]`, in model head order; the cache now
        holds the token. `rotary`: this position's `(cos, sin)` `[1, 1, d_rot]` when `query` and `key` are not rotated
        yet (the Triton kernel rotates them as it loads them)."""
        state = self.states[layer.device]
        window, slot = layer.ring.window, state.step_slots[layer.ring.window]
        if layer.evicted_sums is not None:
            self.compensate(layer, slot)
        kernel = triton_decode() if query.is_cuda else None
        if kernel is not None:  # streaming heads read slots [0, min(pos + 1, ring.slots)): the compensation slot once
            return kernel(query, key, value, layer.full_kv, layer.stream_kv, layer.order, state.pos, window.sink,  # one was evicted
                          window.recent, scaling, softcap, rotary=rotary)
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key.unsqueeze(2), *rotary).squeeze(2)
        return self.decode_reference(layer, query, key, value, slot, scaling, softcap)

    def compensate(self, layer: StaticLayer, slot: torch.Tensor) -> None:
        """Before `pos` overwrites its ring slot: add the position it evicts (`pos - recent`, when `>= sink`) to the
        layer's sums and write the mean of all evicted positions to the compensation slot."""
        w, size, pos = layer.ring.window, layer.ring.size, self.states[layer.device].pos
        evicts = (pos - w.recent >= w.sink).to(torch.float32)  # [1]
        layer.evicted_sums.add_(layer.stream_kv.index_select(3, slot)[:, :, :, 0].float() * evicts)
        mean = layer.evicted_sums / w.n_evicted(pos).clamp(min=1).to(torch.float32)
        layer.stream_kv[:, :, :, size].copy_(mean)

    def decode_reference(self, layer: StaticLayer, query, key, value, slot, scaling: float, softcap: float = 0.0) -> torch.Tensor:
        """`decode` in eager torch: index_copy_ writes, then `grouped_attention` per kind with masks derived on the device."""
        kv = torch.stack([key, value]).unsqueeze(3)  # [2, batch, n_kv, 1, d]
        ring, state = layer.ring, self.states[layer.device]
        stream_allowed = ring.slot_pos >= 0
        if ring.window.compensate:
            stream_allowed = torch.cat([stream_allowed, ring.window.n_evicted(state.pos) > 0])
        out = torch.empty_like(query)
        for heads, buf, at, allowed in ((layer.full_heads, layer.full_kv, state.pos, state.slots <= state.pos),
                                        (layer.stream_heads, layer.stream_kv, slot, stream_allowed)):
            if heads.numel():
                buf.index_copy_(3, at, kv.index_select(2, heads))
                out.index_copy_(1, heads, grouped_attention(query.index_select(1, heads), buf[0], buf[1], allowed, scaling, softcap))
        return out
