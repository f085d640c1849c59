"""The decode step's matrix products at 1-4 tokens as one Triton launch each: no split-K, each weight read once.

A decode step at batch 1-4 multiplies a few rows by every weight matrix of the model, so it is bound by
reading the weights once. cuBLAS picks split-K for most of the 8B shapes (a second, reduce kernel
per product) and runs the square `o_proj` at ~0.7 of the copy bandwidth. Here one program owns
`block_n` output features and walks the whole reduction dimension with a `[rows, block_n, block_k]`
float32 multiply-and-accumulate on the CUDA cores (summed once at the end): every program reads its
rows of the weight once for all input rows, all programs resident at once (no tail wave), the output
and bias written directly. On an H100 (analyses/README.md, the matrix-product table) this reads the
8B model's products 3-12% faster than cuBLAS at one row. Optionally the input is a gated MLP's
`gate | up` product and the kernel computes `silu(gate) * up` as it reads it (rounded to the input
dtype as `F.silu(gate) * up` is), so the activation is no kernel of its own.

At most 4 rows (`MAX_ROWS`, `supports`): at 16 the multiply-and-accumulate on CUDA cores (16 per
weight element) would outlast the read, and a `tl.dot` form for 2-16 rows measured no faster than
cuBLAS (its gated form recomputed SiLU for 16 padded rows in every program: 5x slower), so 5 rows
and more stay with cuBLAS. 2-4 rows are exact (tests) but not yet timed on a GPU: the decode step
gives them to this kernel only with `fused.GEMV_ROWS` raised (`runtime_benchmark.py --gemv-rows 4`).
Imported only on CUDA with Triton present (and by the Triton interpreter, `TRITON_INTERPRET=1`, in
tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Output features per program, reduction elements per iteration, warps, pipeline stages; by input rows (1, or 2-4
# padded to 4). One row: on an H100 (2026-12-07, analyses/runtime_benchmark.py --microbench) within 1% of the best of
# GEMV_CONFIGS for every 8B shape. Four rows: not yet timed on a GPU (the accumulator kept at one row's size, a
# quarter of the reduction block; `--microbench gemv` times the alternatives).
CONFIGS = {1: {"block_n": 8, "block_k": 512, "num_warps": 4, "num_stages": 3},
           4: {"block_n": 8, "block_k": 128, "num_warps": 4, "num_stages": 3}}
MAX_ROWS = 4  # at 16 rows the float32 multiply-and-accumulate on CUDA cores would outlast the weights' read


@triton.jit
def _load_input(x_ptr, row, offs, mask, K, GATED: tl.constexpr):
    """Columns `offs` `[BLOCK_K]` of the input rows `row` `[BLOCK_M]` (where `mask` `[BLOCK_M, BLOCK_K]`): `x` `[M, K]`,
    or `silu(gate) * up` from `[gate | up]` `[M, 2K]`."""
    if GATED:
        ptrs = x_ptr + row[:, None] * (2 * K) + offs[None, :]
        gate = tl.load(ptrs, mask=mask, other=0.0)
        up = tl.load(ptrs + K, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    return tl.load(x_ptr + row[:, None] * K + offs[None, :], mask=mask, other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    feats = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    row = tl.arange(0, BLOCK_M)  # input rows (tokens)
    ks = tl.arange(0, BLOCK_K)
    inside, real = feats < N, row < M
    w_ptrs = w_ptr + feats.to(tl.int64)[:, None] * K + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = (k0 + ks) < K
        w = tl.load(w_ptrs + k0, mask=inside[:, None] & in_k[None, :], other=0.0)  # [BLOCK_N, BLOCK_K], read once
        x = _load_input(x_ptr, row, k0 + ks, real[:, None] & in_k[None, :], K, GATED)  # [BLOCK_M, BLOCK_K]
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]  # summed once at the end
    y = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + feats, mask=inside, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row[:, None] * N + feats[None, :], y.to(y_ptr.dtype.element_ty),
             mask=real[:, None] & inside[None, :])


def supports(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether `linear` takes this product: at most `max_rows` (and `MAX_ROWS`) rows (tokens), a contiguous weight of
    the input's dtype."""
    return (x.numel() <= min(max_rows, MAX_ROWS) * x.shape[-1] and weight.is_contiguous() and weight.dtype == x.dtype
            and weight.device == x.device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
           **config) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for `x` `[..., K]` of at most `MAX_ROWS` rows, `weight` `[N, K]` (contiguous);
    `gated`: `x` is `[..., 2K]` = `[gate | up]` and the product is `F.linear(F.silu(gate) * up, weight, bias)`."""
    n, k = weight.shape
    rows = x.numel() // max(x.shape[-1], 1)
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"linear: 1 to {MAX_ROWS} rows expected, not {tuple(x.shape)}: use F.linear.")
    if x.shape[-1] != (2 * k if gated else k):
        raise ValueError(f"linear: input width {x.shape[-1]} does not match the weight's {k}{' (x2, gated)' if gated else ''}.")
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else weight  # a stand-in pointer, never read
    block_m = triton.next_power_of_2(rows)
    cfg = {**CONFIGS[1 if rows == 1 else MAX_ROWS], **config}
    _gemv_kernel[(triton.cdiv(n, cfg["block_n"]),)](x2, weight, b, y, rows, n, k, HAS_BIAS=bias is not None,
                                                    GATED=gated, BLOCK_M=block_m, BLOCK_N=cfg["block_n"],
                                                    BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"],
                                                    num_stages=cfg["num_stages"])
    return y.view(*x.shape[:-1], n)
