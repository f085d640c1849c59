"""One decode step's attention for a whole layer in one Triton launch (split-KV flash-decoding), full and streaming heads together.

The CUDA implementation of `static.decode_reference`. A layer's KV heads live in two buffers
(`static.StaticLayer`): full heads `[batch, n_full, max_length, d]` (slot = position) and streaming
heads `[batch, n_stream, window, d]` (sink slots, then a ring). One launch covers both: its 1-d
grid is every (batch, full head, split of `chunk` slots) followed by every (batch, streaming head,
split), so a step reads exactly the keys and values the cache holds, once, and nothing else:
- per KV head, the slots to read are `[0, pos]` (full) or `[0, min(pos + 1, window))` (streaming:
  positions fill slots in order, and the ring holds exactly the sink and the last `recent`), read
  off the device position `pos`, so the shapes never change and the step can be a CUDA graph;
- the new token's key and value (`slot` = `pos`, or its ring slot) come from the step's own
  `key`/`value`, and the program holding split 0 of each head stores them: appending and attending
  are the same launch (no separate cache write, no mask vector, no gather or merge of heads);
- RoPE of the step's query and key (transformers' rotate-half form, partial rotary included) is
  applied as each program loads them, given this position's cos/sin: no rotary kernel either;
- each program keeps an online-softmax partial (max, sum, weighted values, float32; Dao et al.
  2023, "Flash-Decoding"), and a second small kernel combines a head's partials and writes the
  output directly in query-head order, `[batch, n_kv, group, d]` = `[batch, n_heads, d]`.
The `group` query heads of a KV head are the rows of one `tl.dot`, so K and V are read once per
KV head (GQA); float32 inputs multiply in full float32 ("ieee", not tf32). Optional logit soft-capping (Gemma 2: `cap * tanh(s / cap)`). Imported only on
CUDA with Triton present (and by the Triton interpreter, `TRITON_INTERPRET=1`, in tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Keys per block, programs to aim for (two per SM), the fewest keys a program reads (`min_chunk`: at short contexts
# fewer, longer splits leave the combine less to merge; 256 measured 14.0 -> 12.4 us a layer alone at 8k, 2 full +
# 6 streaming heads, neutral at 32k and 128k, but within 1% in whole steps at batch 1 and 4, on an H100, 2026-12-07,
# so not the default), warps, pipeline stages (None: 3 at batch 1, else 2). Chosen
# on an H100, 2026-12-05 (analyses/runtime_benchmark.py --microbench): fewer, longer splits than 4 programs per SM
# leave the combine less to merge (at 528 it took 8-20 us a layer); a third stage keeps more loads in flight at
# batch 1 (8 full heads at 128k: 1.08x the floor against 1.14x) but costs a third at batch 16 (1.53x against 1.14x).
CONFIG = {"block_n": 64, "programs": 264, "min_chunk": 64, "num_warps": 4, "num_stages": None}
COMBINE_BLOCK = 128  # partials merged per iteration of the combine kernel, at most


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _rotated(x, x_ptrs_partner, inside, cos, sin, sign):
    """RoPE of `x` (`[..., D]`) as transformers' `x * cos + rotate_half(x) * sin`, float32, in `x`'s dtype: the
    partner channel (`c + D_ROT/2` or `c - D_ROT/2`) is loaded through `x_ptrs_partner`; channels past D_ROT pass."""
    partner = tl.load(x_ptrs_partner, mask=inside, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * cos + sign * partner * sin).to(x.dtype)


@triton.jit
def _locate(pid, pos, fk_ptr, fv_ptr, sk_ptr, sv_ptr, n_full, n_stream, full_splits, stream_splits, window, sink, recent,
            sfb, sfh, sfn, ssb, ssh, ssn):
    """Program `pid`'s batch row `b`, head place `j` in `order` (full heads first), split, key/value bases, slot stride,
    slots held and the step's own slot."""
    per_batch_full = n_full * full_splits
    per_batch = per_batch_full + n_stream * stream_splits
    b = pid // per_batch
    r = pid % per_batch
    if r < per_batch_full:  # a full head: slots 0..pos, the new token at slot pos
        j = r // full_splits
        split = r % full_splits
        k_base = fk_ptr + b.to(tl.int64) * sfb + j.to(tl.int64) * sfh
        v_base = fv_ptr + b.to(tl.int64) * sfb + j.to(tl.int64) * sfh
        stride_n = sfn
        length = pos + 1
        new_slot = pos
    else:  # a streaming head: the sink, then the ring of the last `recent` positions
        r = r - per_batch_full
        j = n_full + r // stream_splits
        split = r % stream_splits
        k_base = sk_ptr + b.to(tl.int64) * ssb + (j - n_full).to(tl.int64) * ssh
        v_base = sv_ptr + b.to(tl.int64) * ssb + (j - n_full).to(tl.int64) * ssh
        stride_n = ssn
        length = tl.minimum(pos + 1, window)
        new_slot = tl.where(pos < sink, pos, sink + (pos - sink) % recent)
    return b, j, split, k_base, v_base, stride_n, length, new_slot


@triton.jit
def _rope(q, k_new, q_rows, k_row, rows, cols, cos_ptr, sin_ptr, G: tl.constexpr, D: tl.constexpr,
          D_ROT: tl.constexpr):
    """The step's RoPE here, not in a kernel of its own: `q` `[BLOCK_G, D]` and `k_new` `[D]` rotated by this
    position's cos/sin `[D_ROT]` (the partner channels re-read through `q_rows` / `k_row`)."""
    half: tl.constexpr = D_ROT // 2
    rotates = cols < D_ROT
    partner = tl.where(rotates, tl.where(cols < half, cols + half, cols - half), cols)
    cos = tl.load(cos_ptr + cols, mask=rotates, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + cols, mask=rotates, other=0.0).to(tl.float32)
    sign = tl.where(cols < half, -1.0, 1.0)
    q = _rotated(q, q_rows + partner[None, :], rows[:, None] < G, cos[None, :], sin[None, :], sign[None, :])
    return q, _rotated(k_new, k_row + partner, cols < D, cos, sin, sign)


@triton.jit
def _attend_block(q, k_new, v_new, k_base, v_base, stride_n, n0, end, new_slot, cols, m_i, l_i, acc, scale, softcap,
                  SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over slots `n0 .. n0 + BLOCK_N` (below `end`), the step's own slot from `k_new`/`v_new`, not the
    cache: the running max `m_i`, sum `l_i` `[BLOCK_G]` (log2 units) and output `acc` `[BLOCK_G, D]`, updated."""
    offs = n0 + tl.arange(0, BLOCK_N)
    inside = offs < end
    is_new = offs == new_slot
    from_cache = inside & (offs != new_slot)
    ptrs = offs.to(tl.int64)[:, None] * stride_n + cols[None, :]
    k = tl.load(k_base + ptrs, mask=from_cache[:, None], other=0.0)
    k = tl.where(is_new[:, None], k_new[None, :], k)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [BLOCK_G, BLOCK_N]
    if SOFTCAP:
        s = softcap * _tanh(s / softcap)
    s = tl.where(inside[None, :], s * 1.4426950408889634, float("-inf"))  # log2 units: exp2 below
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + ptrs, mask=from_cache[:, None], other=0.0)
    v = tl.where(is_new[:, None], v_new[None, :], v)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _partial_kernel(q_ptr, kn_ptr, vn_ptr, fk_ptr, fv_ptr, sk_ptr, sv_ptr, order_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr,
                    cos_ptr, sin_ptr, n_kv, n_full, n_stream, full_splits, stream_splits, max_splits, chunk, window, sink,
                    recent, scale, softcap,
                    sqb, sqh, sqg, skb, skh, svb, svh, sfb, sfh, sfn, ssb, ssh, ssn,
                    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                    SOFTCAP: tl.constexpr, D_ROT: tl.constexpr, PRECISION: tl.constexpr):
    pos = tl.load(pos_ptr).to(tl.int32)
    b, j, split, k_base, v_base, stride_n, length, new_slot = _locate(
        tl.program_id(0), pos, fk_ptr, fv_ptr, sk_ptr, sv_ptr, n_full, n_stream, full_splits, stream_splits, window, sink,
        recent, sfb, sfh, sfn, ssb, ssh, ssn)
    h = tl.load(order_ptr + j)  # the KV head's index in the model (query heads h * G ... h * G + G - 1)
    rows = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, D)
    q_rows = q_ptr + b * sqb + h * sqh + rows[:, None] * sqg
    q = tl.load(q_rows + cols[None, :], mask=rows[:, None] < G, other=0.0)
    k_new = tl.load(kn_ptr + b * skb + h * skh + cols)
    v_new = tl.load(vn_ptr + b * svb + h * svh + cols)
    if D_ROT > 0:
        q, k_new = _rope(q, k_new, q_rows, kn_ptr + b * skb + h * skh, rows, cols, cos_ptr, sin_ptr, G, D, D_ROT)
    if split == 0:  # append: the only program that writes this head's slot (the others never read it)
        tl.store(k_base + new_slot.to(tl.int64) * stride_n + cols, k_new)
        tl.store(v_base + new_slot.to(tl.int64) * stride_n + cols, v_new)
    m_i = tl.full([BLOCK_G], -1e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    for n0 in range(start, end, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, k_new, v_new, k_base, v_base, stride_n, n0, end, new_slot, cols, m_i, l_i, acc,
                                      scale, softcap, SOFTCAP, BLOCK_N, PRECISION)
    base = ((b * n_kv + j) * max_splits + split) * BLOCK_G
    real = rows < G  # the padding rows of the dot are never read back: not stored
    tl.store(acc_ptr + (base + rows[:, None]) * D + cols[None, :], acc, mask=real[:, None])
    tl.store(m_ptr + base + rows, m_i, mask=real)
    tl.store(l_ptr + base + rows, l_i, mask=real)


@triton.jit
def _combine_kernel(acc_ptr, m_ptr, l_ptr, order_ptr, out_ptr, n_kv, n_full, full_splits, stream_splits, max_splits,
                    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
    bj = tl.program_id(0)  # batch * n_kv + j (j: the head's place in `order`, full heads first)
    g = tl.program_id(1)
    b = bj // n_kv
    j = bj % n_kv
    h = tl.load(order_ptr + j)
    n_splits = tl.where(j < n_full, full_splits, stream_splits)
    cols = tl.arange(0, D)
    m_run = tl.full([1], -1e30, dtype=tl.float32)
    l_run = tl.zeros([1], dtype=tl.float32)
    acc_run = tl.zeros([D], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):  # the partials in blocks, merged online (log2 units, as written)
        splits = s0 + tl.arange(0, BLOCK_S)
        inside = splits < n_splits
        idx = (bj * max_splits + splits) * BLOCK_G + g
        m = tl.load(m_ptr + idx, mask=inside, other=-1e30)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        w = tl.where(inside, tl.exp2(m - m_new), 0.0)
        alpha = tl.exp2(m_run - m_new)
        l_run = l_run * alpha + tl.sum(tl.load(l_ptr + idx, mask=inside, other=0.0) * w, axis=0)
        acc = tl.load(acc_ptr + idx[:, None] * D + cols[None, :], mask=inside[:, None], other=0.0)
        acc_run = acc_run * alpha + tl.sum(acc * w[:, None], axis=0)
        m_run = m_new
    tl.store(out_ptr + ((b * n_kv + h) * G + g) * D + cols, (acc_run / l_run).to(out_ptr.dtype.element_ty))


def plan(batch: int, n_full: int, n_stream: int, max_length: int, window: int, programs: int, block_n: int,
         min_chunk: int = 0) -> tuple[int, int, int]:
    """`(chunk, full_splits, stream_splits)`: slots per program (a multiple of `block_n`, at least `min_chunk`) so that
    about `programs` programs share the longest buffer's slots, and the splits of each kind of head. Static for a cache."""
    heads, slots = (n_full, max_length) if n_full else (n_stream, window)
    splits = max(1, min(triton.cdiv(slots, max(block_n, min_chunk)), triton.cdiv(programs, batch * heads)))
    chunk = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    return chunk, triton.cdiv(max_length, chunk) if n_full else 0, triton.cdiv(window, chunk) if n_stream else 0


def decode_layer(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, full_kv: torch.Tensor, stream_kv: torch.Tensor,
                 order: torch.Tensor, pos: torch.Tensor, sink: int, recent: int, scaling: float, softcap: float = 0.0,
                 rotary: tuple[torch.Tensor, torch.Tensor] | None = None, **config) -> torch.Tensor:
    """Append the step's keys and values to a layer's cache and attend, every KV head in one launch (+ a combine).

    `query` `[batch, n_kv, group, d]` (last dim contiguous), `key`/`value` `[batch, n_kv, d]` (this token's),
    `full_kv` `[2, batch, n_full, max_length, d]` and `stream_kv` `[2, batch, n_stream, window, d]` (keys, values;
    contiguous), `order` `[n_kv]` int32 (the model's KV-head indices, full heads then streaming, in buffer order),
    `pos` `[1]` long on the device (this token's position). `rotary`: this position's `(cos, sin)` (`d_rot` values
    each, any leading ones), applied to `query` and `key` inside the launch; None: they are rotated already.
    Returns `[batch, n_kv, group, d]` in model order."""
    batch, n_kv, group, d = query.shape
    _, _, n_full, max_length, _ = full_kv.shape
    n_stream, window = stream_kv.shape[2], stream_kv.shape[3]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("decode_layer needs the last dim of query, key and value contiguous.")
    config = {**CONFIG, **config}
    chunk, full_splits, stream_splits = plan(batch, n_full, n_stream, max_length, window, config["programs"], config["block_n"],
                                             config["min_chunk"])
    max_splits = max(full_splits, stream_splits)
    block_g = max(16, triton.next_power_of_2(group))
    acc = torch.empty(batch, n_kv, max_splits, block_g, d, dtype=torch.float32, device=query.device)
    m = torch.empty(batch, n_kv, max_splits, block_g, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    fk, fv = full_kv.unbind(0) if n_full else stream_kv.unbind(0)  # a stand-in pointer where a kind has no head
    sk, sv = stream_kv.unbind(0) if n_stream else (fk, fv)
    cos, sin = (t.reshape(-1) for t in rotary) if rotary is not None else (query, query)  # stand-ins, never read
    d_rot = cos.numel() if rotary is not None else 0
    if d_rot % 2 or d_rot > d or (rotary is not None and (cos.stride(0) != 1 or sin.stride(0) != 1)):
        raise ValueError(f"decode_layer: rotary tables of {d_rot} channels (contiguous, even, at most d_head={d}) expected.")
    grid = (batch * (n_full * full_splits + n_stream * stream_splits),)
    _partial_kernel[grid](
        query, key, value, fk, fv, sk, sv, order, pos, acc, m, l, cos, sin,
        n_kv, n_full, n_stream, full_splits, stream_splits, max_splits, chunk, window, sink, recent,
        float(scaling), float(softcap or 1.0),
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        fk.stride(0), fk.stride(1), fk.stride(2), sk.stride(0), sk.stride(1), sk.stride(2),
        G=group, BLOCK_G=block_g, D=d, BLOCK_N=config["block_n"], SOFTCAP=bool(softcap), D_ROT=d_rot, PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"] or (3 if batch == 1 else 2))
    out = torch.empty(batch, n_kv, group, d, dtype=query.dtype, device=query.device)
    block_s = min(COMBINE_BLOCK, max(2, triton.next_power_of_2(max_splits)))  # most heads: one iteration
    _combine_kernel[(batch * n_kv, group)](acc, m, l, order, out, n_kv, n_full, full_splits, stream_splits, max_splits,
                                          G=group, BLOCK_G=block_g, D=d, BLOCK_S=block_s, num_warps=4 if block_s <= 32 else 8)
    return out
