"""Fused elementwise pieces of the CUDA decode step (torch.compile), to cut the step's kernel count.

A decode step at batch 1 is ~60 small kernels per layer besides the matrix products; in a CUDA
graph each still costs a microsecond or two. These functions compute what the Llama modules do
(RMSNorm with a float32 variance, RoPE and the split into full / streaming heads, their merge,
the residual add folded into the next norm, SiLU * up) in one kernel each. Used only on CUDA in the
"sdpa" path's decode step (`CompressedLM(fuse=True)`); the CPU path calls the modules themselves.
"""
from __future__ import annotations

import functools

import torch

from headlab.runtime.attention import apply_rotary


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def _rotary_split(q, k, v, cos, sin, full_q, full_kv, stream_q, stream_kv):
    """RoPE on `q`/`k`, then each split into its full-head and streaming-head parts (one fused kernel or two):
    `(q_full, kv_full, q_stream, kv_stream)`, keys and values stacked `[2, batch, n, 1, d]` as the cache stores them."""
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return (q.index_select(1, full_q), torch.stack([k.index_select(1, full_kv), v.index_select(1, full_kv)]),
            q.index_select(1, stream_q), torch.stack([k.index_select(1, stream_kv), v.index_select(1, stream_kv)]))


def _merge_heads(out_full: torch.Tensor, out_stream: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Full and streaming heads' outputs `[batch, n, 1, d]` -> `[batch, 1, n_heads * d]` in query-head order (o_proj's input)."""
    out = torch.cat([out_full, out_stream], dim=1).index_select(1, index)
    return out.transpose(1, 2).reshape(out.shape[0], 1, -1)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


FUNCTIONS = {"rms_norm": _rms_norm, "add_rms_norm": _add_rms_norm, "rotary_split": _rotary_split,
             "merge_heads": _merge_heads, "silu_mul": _silu_mul}


@functools.cache
def compiled(name: str):
    # One graph per distinct head split (how many KV heads of a layer are full): allow that many recompiles.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(FUNCTIONS[name], dynamic=False, fullgraph=True)


def is_silu(act) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation") or act is torch.nn.functional.silu


def norm_eps(module) -> float:
    return float(getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or 1e-6)
