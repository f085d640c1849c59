"""The compressed KV cache: per layer, full KV heads keep every token, streaming KV heads keep sink + recent.

Both kinds store keys (already rotated at their absolute position, as Hugging Face does) and values
in fixed-size pages allocated on first use and written in place, so no step copies the cache:
- `FullKV`: slot = position; grows one page at a time without bound.
- `StreamingKV`: `sink + recent` slots; positions `< sink` stay in their slot, later positions go
  to a ring buffer (`sink + (pos - sink) % recent`), overwriting the oldest.
`segments(length)` hands attention views of the pages (no copy) with each slot's absolute position
and whether it holds a token yet. Memory held = allocated pages (`nbytes`), which equals the ideal
(`HeadMask.ideal_kv_bytes`) whenever the stored token count is a multiple of the page size.

Which heads stream, and with which `Window`, is decided per layer by `layer_layout`: the mask's
streaming heads use `(mask.sink, mask.recent)`; every head of a model's own sliding-window layer
(Gemma 2/3, Mistral and Phi-3 with `sliding_window`, Qwen with `use_sliding_window`) streams with
`sink=0, recent=sliding_window`, which is exactly what transformers' sliding mask lets it see
(key k for query q when `q - k < sliding_window`), whatever the mask says about it.

Compensation (RazorAttention, Tang et al. 2024, `Window.compensate`): a streaming head also attends
to one extra token whose key and value are the mean of the keys (rotated, as cached) and values it
has evicted: for the query at position q, of positions `sink <= p <= q - recent`. `StreamingKV`
keeps their float32 sums; a chunk's queries each get their own mean (`compensation`), so the result
does not depend on the chunk size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab import validate

# (keys [batch, n_kv, slots, d_head], values [batch, n_kv, slots, d_head], positions [slots], valid [slots] / [q, slots] / None)
Segment = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class Window:
    """What a streaming KV head keeps: the first `sink` positions and the last `recent` (the query's own included);
    with `compensate`, one more token holding the mean of the positions it evicted."""

    sink: int
    recent: int
    compensate: bool = False

    def __post_init__(self) -> None:
        validate.window(self.sink, self.recent)

    @property
    def size(self) -> int:
        return self.sink + self.recent

    def slot_of(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sink, pos, self.sink + (pos - self.sink) % self.recent)

    def keeps(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """`[q, k]` bool: key position `k_pos` is inside the window of query position `q_pos` (causality aside)."""
        return (k_pos[None, :] < self.sink) | (q_pos[:, None] - k_pos[None, :] < self.recent)

    def evicted(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """`[q, k]` bool: key `k_pos` has left query `q_pos`'s window (`sink <= k <= q - recent`)."""
        return (k_pos[None, :] >= self.sink) & (k_pos[None, :] <= q_pos[:, None] - self.recent)

    def n_evicted(self, q_pos: torch.Tensor) -> torch.Tensor:
        """How many positions query `q_pos` `[q]` has evicted: `max(0, q - recent - sink + 1)`."""
        return (q_pos - self.recent - self.sink + 1).clamp(min=0)


def head_layout(mask, layer: int, sliding: int | None, compensate: bool = False) -> tuple[torch.Tensor, Window]:
    """`(full [n_kv_heads] bool, window of the streaming heads)` of `layer`, whose own sliding window is `sliding`
    (None: a full-attention layer; see the module's docstring)."""
    if sliding is None:
        return mask.full[layer].clone(), Window(mask.sink, mask.recent, compensate)
    return torch.zeros(mask.n_kv_heads, dtype=torch.bool), Window(0, int(sliding))


def layer_layout(mask, sliding_windows: list[int | None], compensate: bool = False) -> list[tuple[torch.Tensor, Window]]:
    """`head_layout` of every layer, given each layer's own sliding window."""
    return [head_layout(mask, layer, sliding, compensate) for layer, sliding in enumerate(sliding_windows)]


def evicted_means(sums: torch.Tensor, take: torch.Tensor, count: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's compensation token: the float32 `sums` `[2, batch, n_kv, d]` of the positions evicted before the
    held ones, plus the held `keys`/`values` `[batch, n_kv, s, d]` that query evicted (`take` `[t, s]` 0/1), over its
    `count` `[t]` of evicted positions. Returns the means `[2, batch, n_kv, t, d]` (in the keys' dtype) and the sums
    of the last query `[2, batch, n_kv, d]` (the next chunk's `sums`)."""
    held = torch.stack([keys, values]).to(torch.float32)
    per_query = sums[:, :, :, None] + torch.einsum("qs,kbnsd->kbnqd", take, held)
    means = (per_query / count.clamp(min=1).to(torch.float32)[:, None]).to(keys.dtype)
    return means, per_query[:, :, :, -1].contiguous()


@dataclass(frozen=True)
class HeadGroups:
    """One layer's KV heads split by the mask, and the query heads that read each part (GQA order)."""

    full_kv: torch.Tensor  # [n_full] KV-head indices
    full_q: torch.Tensor  # [n_full * group] query-head indices, KV head by KV head
    stream_kv: torch.Tensor
    stream_q: torch.Tensor

    @classmethod
    def of(cls, full: torch.Tensor, group: int) -> "HeadGroups":
        full_kv, stream_kv = torch.nonzero(full).flatten(), torch.nonzero(~full).flatten()

        def queries(kv: torch.Tensor) -> torch.Tensor:
            return (kv[:, None] * group + torch.arange(group)[None, :]).flatten()

        return cls(full_kv, queries(full_kv), stream_kv, queries(stream_kv))

    def to(self, device) -> "HeadGroups":
        return HeadGroups(*(t.to(device) for t in (self.full_kv, self.full_q, self.stream_kv, self.stream_q)))


class PagedKV:
    """Keys and values of `n_kv` KV heads of one layer in pages of `page_size` slots (`capacity` slots at most)."""

    window: Window | None = None

    def __init__(self, batch: int, n_kv: int, d_head: int, page_size: int, capacity: int | None,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, not {page_size}.")
        self.batch, self.n_kv, self.d_head, self.page_size, self.capacity = batch, n_kv, d_head, page_size, capacity
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []  # page i: [batch, n_kv, page_len(i), d_head]
        self.values: list[torch.Tensor] = []

    def page_len(self, index: int) -> int:
        if self.capacity is None:
            return self.page_size
        return min(self.page_size, self.capacity - index * self.page_size)

    def _ensure_pages(self, n_pages: int) -> None:
        while len(self.keys) < n_pages:  # zeros, not empty: a masked slot must never hold NaN
            shape = (self.batch, self.n_kv, self.page_len(len(self.keys)), self.d_head)
            self.keys.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=self.dtype, device=self.device))

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store `keys`/`values` `[batch, n_kv, t, d_head]` at distinct `slots` `[t]` (a CPU long tensor)."""
        if self.n_kv == 0 or slots.numel() == 0:
            return
        pages = slots // self.page_size
        self._ensure_pages(int(pages.max()) + 1)
        for page in torch.unique(pages).tolist():
            chosen = pages == page
            offsets = (slots[chosen] - page * self.page_size).to(self.keys[page].device)
            where = chosen.to(keys.device)
            self.keys[page][:, :, offsets] = keys[:, :, where]
            self.values[page][:, :, offsets] = values[:, :, where]

    def positions(self, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute position held by each slot `[s]` after `length` tokens, and whether it holds one."""
        raise NotImplementedError

    def segments(self, length: int) -> list[Segment]:
        """Views of the allocated pages with their slots' positions, after `length` tokens were stored."""
        out = []
        for index, (k, v) in enumerate(zip(self.keys, self.values)):
            slots = torch.arange(index * self.page_size, index * self.page_size + k.shape[2])
            pos, valid = self.positions(slots, length)
            used = int(valid.nonzero().max()) + 1 if valid.any() else 0
            if used:
                device = k.device
                out.append((k[:, :, :used], v[:, :, :used], pos[:used].to(device), valid[:used].to(device)))
        return out

    def nbytes(self) -> int:
        """Bytes held by the key and value pages."""
        return sum(t.untyped_storage().nbytes() for t in self.keys + self.values)


class FullKV(PagedKV):
    """Every token, slot = position."""

    def __init__(self, batch, n_kv, d_head, page_size, dtype, device) -> None:
        super().__init__(batch, n_kv, d_head, page_size, None, dtype, device)

    def positions(self, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return slots, slots < length

    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Store the tokens at positions `start .. start + t - 1` (`keys` `[batch, n_kv, t, d_head]`)."""
        self.write(torch.arange(start, start + keys.shape[2]), keys, values)


class StreamingKV(PagedKV):
    """The first `sink` tokens and a ring buffer of the last `recent` ones (and, with `window.compensate`, the float32
    sums `evicted_sums` `[2, batch, n_kv, d_head]` of the keys and values that left the window)."""

    def __init__(self, batch, n_kv, d_head, page_size, window: Window, dtype, device) -> None:
        super().__init__(batch, n_kv, d_head, page_size, window.size, dtype, device)
        self.window = window
        self.evicted_sums = (torch.zeros(2, batch, n_kv, d_head, dtype=torch.float32, device=device)
                        if window.compensate and n_kv else None)

    def positions(self, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        sink, recent = self.window.sink, self.window.recent
        ring = slots - sink
        written = length - sink  # tokens that went to the ring so far (may be <= 0)
        laps = torch.div(written - 1 - ring, recent, rounding_mode="floor")
        ring_pos = sink + ring + recent * laps
        pos = torch.where(slots < sink, slots, ring_pos)
        valid = torch.where(slots < sink, slots < length, laps >= 0)
        return pos, valid

    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Keep, of positions `start .. start + t - 1`, the sink ones and the last `recent`."""
        pos = torch.arange(start, start + keys.shape[2])
        keep = (pos < self.window.sink) | (pos >= start + keys.shape[2] - self.window.recent)
        where = keep.nonzero().flatten()
        dev = keys.device
        self.write(self.window.slot_of(pos[keep]), keys[:, :, where.to(dev)], values[:, :, where.to(dev)])

    def compensation(self, segments: list[Segment], q_pos: torch.Tensor) -> Segment:
        """The compensation token of each query `q_pos` `[t]` as a segment (one key per query, `valid` `[t, t]`
        diagonal), from `segments` = this store's pages + the chunk, before the chunk is appended. Updates the
        running sums to those of the chunk's last query."""
        keys, values = (torch.cat([s[i] for s in segments], dim=2) for i in (0, 1))
        k_pos = torch.cat([s[2] for s in segments])
        valid = torch.cat([s[3] if s[3] is not None else torch.ones_like(s[2], dtype=torch.bool) for s in segments])
        # The pages hold exactly the positions not yet summed (the ring keeps the last `recent`), so
        # query q's evicted set is the running sums plus the held positions that q has evicted.
        take = (self.window.evicted(q_pos, k_pos) & valid[None, :]).to(torch.float32)  # [t, s]
        count = self.window.n_evicted(q_pos)
        means, self.evicted_sums = evicted_means(self.evicted_sums, take, count, keys, values)
        diagonal = torch.eye(len(q_pos), dtype=torch.bool, device=q_pos.device) & (count > 0)[:, None]
        return means[0], means[1], q_pos, diagonal

    def nbytes(self) -> int:
        return super().nbytes() + (self.evicted_sums.untyped_storage().nbytes() if self.evicted_sums is not None else 0)


class LayerCache:
    """One layer's cache: `full` for its full KV heads, `streaming` for the others (either may have 0 heads), and which
    query heads read each (`heads`)."""

    def __init__(self, full_row: torch.Tensor, window: Window, group: int, batch: int, d_head: int, page_size: int,
                 dtype: torch.dtype, device) -> None:
        self.heads = HeadGroups.of(full_row, group)
        n_full = self.heads.full_kv.numel()
        self.full = FullKV(batch, n_full, d_head, page_size, dtype, device)
        self.streaming = StreamingKV(batch, full_row.numel() - n_full, d_head, page_size, window, dtype, device)

    def nbytes(self) -> int:
        return self.full.nbytes() + self.streaming.nbytes()


class CompressedCache:
    """All layers' caches and the number of tokens seen (`length`); `layout` is `layer_layout(...)`; `device` one device,
    or each layer's `[n_layers]` (a sharded model: each layer's pages on its layer's device)."""

    def __init__(self, layout: list[tuple[torch.Tensor, Window]], group: int, batch: int, d_head: int, page_size: int,
                 dtype: torch.dtype, device) -> None:
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * len(layout)
        self.layers = [LayerCache(full, window, group, batch, d_head, page_size, dtype, d)
                       for (full, window), d in zip(layout, devices, strict=True)]
        self.batch = batch
        self.length = 0

    def nbytes(self) -> int:
        """Bytes held by all key and value pages right now."""
        return sum(layer.nbytes() for layer in self.layers)
