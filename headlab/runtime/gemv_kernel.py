"""The decode step's matrix products as Triton matrix-vector kernels: one launch per product, no split-K.

A decode step multiplies a handful of rows (batch x 1 token) by every weight matrix of the model, so
it is bound by reading the weights once. cuBLAS picks split-K for most of the 8B shapes at batch 1
(a second, reduce kernel per product) and runs the square `o_proj` at about half the bandwidth
(analyses/README.md, the profile of issue 12). Here one program owns `block_n` output features and
walks the whole reduction dimension: every program reads its rows of the weight once, all of them
resident at once (no tail wave), and writes its outputs directly, bias included.
- one row: multiply-and-accumulate on the CUDA cores (a `[block_n, block_k]` float32 accumulator,
  summed once at the end);
- 2..16 rows (`DOT`): `tl.dot` on the tensor cores with the rows padded to 16.
Optionally the input is a gated MLP's `gate | up` product and the kernel computes `silu(gate) * up`
as it reads it (rounded to the input dtype as `F.silu(gate) * up` is), so the activation is no
kernel of its own. Float32 inputs multiply in full float32 ("ieee"). Imported only on CUDA with
Triton present (and by the Triton interpreter, `TRITON_INTERPRET=1`, in tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per row count ("1": batch 1, "many": 2-16): output features per program, reduction elements per iteration, warps,
# pipeline stages. Chosen on an H100 (analyses/runtime_benchmark.py --microbench, the matrix-vector table).
CONFIG = {"1": {"block_n": 8, "block_k": 512, "num_warps": 4, "num_stages": 3},
          "many": {"block_n": 16, "block_k": 256, "num_warps": 4, "num_stages": 3}}
MAX_ROWS = 16


@triton.jit
def _load_input(x_ptr, offs, row_mask, K, GATED: tl.constexpr):
    """The input's columns `offs` for the rows in `row_mask`'s shape: `x`, or `silu(gate) * up` from `[gate | up]`."""
    if GATED:
        gate = tl.load(x_ptr + offs, mask=row_mask, other=0.0)
        up = tl.load(x_ptr + offs + K, mask=row_mask, other=0.0)
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    return tl.load(x_ptr + offs, mask=row_mask, other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sxm, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    ms = tl.arange(0, BLOCK_M)  # input rows (DOT), else one
    ks = tl.arange(0, BLOCK_K)
    inside = rows < N
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    if DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = (k0 + ks) < K
        w = tl.load(w_ptrs + k0, mask=inside[:, None] & in_k[None, :], other=0.0)
        if DOT:
            x = _load_input(x_ptr + ms[:, None] * sxm, (k0 + ks)[None, :], (ms[:, None] < M) & in_k[None, :], K, GATED)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        else:
            x = _load_input(x_ptr, k0 + ks, in_k, K, GATED)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]  # [BLOCK_N, BLOCK_K], summed once at the end
    if DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=inside, other=0.0).to(tl.float32)[None, :]
    ys = tl.arange(0, BLOCK_M if DOT else 1)
    tl.store(y_ptr + ys[:, None] * N + rows[None, :], y.to(y_ptr.dtype.element_ty), mask=(ys[:, None] < M) & inside[None, :])


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes this product: at most `MAX_ROWS` rows, a contiguous weight of the input's dtype."""
    rows = x.numel() // x.shape[-1]
    return 1 <= rows <= MAX_ROWS and weight.is_contiguous() and weight.dtype == x.dtype and weight.device == x.device


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
           **config) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for `x` `[..., K]` with at most 16 rows, `weight` `[N, K]` (contiguous);
    `gated`: `x` is `[..., 2K]` = `[gate | up]` and the product is `F.linear(F.silu(gate) * up, weight, bias)`."""
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if x2.shape[-1] != (2 * k if gated else k):
        raise ValueError(f"linear: input width {x2.shape[-1]} does not match the weight's {k}{' (x2, gated)' if gated else ''}.")
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else weight  # a stand-in pointer, never read
    cfg = {**CONFIG["1" if rows == 1 else "many"], **config}
    grid = (triton.cdiv(n, cfg["block_n"]),)
    _gemv_kernel[grid](x2, weight, b, y, rows, n, k, x2.stride(0), HAS_BIAS=bias is not None, GATED=gated, DOT=rows > 1,
                       BLOCK_M=max(16, triton.next_power_of_2(rows)) if rows > 1 else 1, BLOCK_N=cfg["block_n"],
                       BLOCK_K=cfg["block_k"], PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.view(*lead, n)
