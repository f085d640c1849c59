"""The batch-1 decode step's matrix products as one Triton matrix-vector launch each: no split-K.

A decode step at batch 1 multiplies one row by every weight matrix of the model, so it is bound by
reading the weights once. cuBLAS picks split-K for most of the 8B shapes (a second, reduce kernel
per product) and runs the square `o_proj` at ~0.7 of the copy bandwidth. Here one program owns
`block_n` output features and walks the whole reduction dimension with a `[block_n, block_k]`
float32 multiply-and-accumulate on the CUDA cores (summed once at the end): every program reads its
rows of the weight once, all programs resident at once (no tail wave), the output and bias written
directly. On an H100 (analyses/README.md, the matrix-product table) this reads the 8B model's
products 3-12% faster than cuBLAS. Optionally the input is a gated MLP's `gate | up` product and
the kernel computes `silu(gate) * up` as it reads it (rounded to the input dtype as
`F.silu(gate) * up` is), so the activation is no kernel of its own.

Batch 1 only; more rows stay with cuBLAS (`supports`). Two forms for several rows were measured on
an H100 and lost: a `tl.dot` version for 4 or 16 rows was no faster than cuBLAS (slower for
gate/up) and its gated form recomputed SiLU over every row in every program (5x slower); this
kernel with a rows dimension (`[rows, block_n, block_k]`, each weight element read once for 4
rows) took 1.15-1.34x cuBLAS's time per product at its best configuration (1.18-1.80x at the
shipped one) and made the batch-4 step at 8k 10.3-11.5 ms against cuBLAS's 6.75-7.9 ms
(2026-12-07, analyses/README.md). Imported only on CUDA with Triton present (and by the Triton
interpreter, `TRITON_INTERPRET=1`, in tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Output features per program, reduction elements per iteration, warps, pipeline stages: on an H100 (2026-12-07,
# analyses/runtime_benchmark.py --microbench) within 1% of the best of GEMV_CONFIGS for every 8B shape.
CONFIG = {"block_n": 8, "block_k": 512, "num_warps": 4, "num_stages": 3}


@triton.jit
def _load_input(x_ptr, offs, row_mask, K, GATED: tl.constexpr):
    """The input's columns `offs` (where `row_mask`): `x`, or `silu(gate) * up` from `[gate | up]`."""
    if GATED:
        gate = tl.load(x_ptr + offs, mask=row_mask, other=0.0)
        up = tl.load(x_ptr + offs + K, mask=row_mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    return tl.load(x_ptr + offs, mask=row_mask, other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    ks = tl.arange(0, BLOCK_K)
    inside = rows < N
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = (k0 + ks) < K
        w = tl.load(w_ptrs + k0, mask=inside[:, None] & in_k[None, :], other=0.0)
        x = _load_input(x_ptr, k0 + ks, in_k, K, GATED)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]  # [BLOCK_N, BLOCK_K], summed once at the end
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=inside)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes this product: one row (batch 1, one token), a contiguous weight of the input's dtype."""
    return x.numel() == x.shape[-1] and weight.is_contiguous() and weight.dtype == x.dtype and weight.device == x.device


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
           **config) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for one row `x` `[..., K]` (leading dims all 1), `weight` `[N, K]` (contiguous);
    `gated`: `x` is `[..., 2K]` = `[gate | up]` and the product is `F.linear(F.silu(gate) * up, weight, bias)`."""
    n, k = weight.shape
    if x.numel() != x.shape[-1]:
        raise ValueError(f"linear: one row expected (batch 1, one token), not {tuple(x.shape)}: use F.linear.")
    if x.shape[-1] != (2 * k if gated else k):
        raise ValueError(f"linear: input width {x.shape[-1]} does not match the weight's {k}{' (x2, gated)' if gated else ''}.")
    x1 = x.reshape(-1).contiguous()
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else weight  # a stand-in pointer, never read
    cfg = {**CONFIG, **config}
    _gemv_kernel[(triton.cdiv(n, cfg["block_n"]),)](x1, weight, b, y, n, k, HAS_BIAS=bias is not None, GATED=gated,
                                                    BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.view(*x.shape[:-1], n)
