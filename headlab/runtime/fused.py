"""Fused elementwise pieces of the CUDA decode step (torch.compile), to cut the step's kernel count.

A decode step at batch 1 is ~60 small kernels per layer besides the matrix products; in a CUDA
graph each still costs a microsecond or two. These functions compute what the family's modules do
(its norm with the family's convention, `weights.NORM_KINDS`: Llama's RMSNorm `w * x.to(dtype)`,
Gemma's `x * (1 + w)` in float32, OLMo 2's `w * x` in float32, GPT-NeoX's LayerNorm; the residual
add folded into the next norm; SiLU * up) in one kernel each; the attention of all KV heads, RoPE
of the step's query and key included, is one Triton launch (`decode_kernel`), and at batch 1 every
matrix product one Triton matrix-vector launch (`gemv_kernel`: no split-K reduce, a gated MLP's
SiLU * up read inside the down projection; `MATMUL = "cublas"` keeps torch's, as batches above 1
always do). `FusedOps` hands them to the runtime's one layer function (`model.layer_forward`) in
place of the modules, which `ModuleOps` calls: used only on CUDA in the "sdpa" path's decode step
(`CompressedLM(fuse=True)`); the tests run them uncompiled on the CPU against the modules.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from headlab.runtime.attention import apply_rotary

MATMUL = "auto"  # "auto": the decode step's matrix products as `gemv_kernel` on CUDA when Triton imports; "cublas": F.linear


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str) -> torch.Tensor:
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "rms":
        return weight * h.to(x.dtype)
    if kind == "rms_1p":
        return (h * (1.0 + weight.float())).to(x.dtype)
    return (weight * h).to(x.dtype)  # "rms_f32"


def _add_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str):
    x = x + delta
    return x, _norm(x, weight, bias, eps, kind)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


FUNCTIONS = {"norm": _norm, "add_norm": _add_norm, "silu_mul": _silu_mul}


@functools.cache
def compiled(name: str):
    # One graph per distinct input shape (batch size, norm width): allow that many recompiles.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(FUNCTIONS[name], dynamic=False, fullgraph=True)


@functools.cache
def _gemv_module():
    try:
        from headlab.runtime import gemv_kernel
    except ImportError:
        return None
    return gemv_kernel


def triton_gemv(x: torch.Tensor, weight: torch.Tensor):
    """`gemv_kernel` when `MATMUL` is "auto", `x` is on CUDA, Triton imports and the kernel takes this product, else None."""
    kernel = _gemv_module() if MATMUL == "auto" and x.is_cuda else None
    return kernel if kernel is not None and kernel.supports(x, weight) else None


def is_silu(act) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation") or act is F.silu


def norm_eps(module) -> float:
    for name in ("variance_epsilon", "eps"):
        if getattr(module, name, None) is not None:
            return float(getattr(module, name))
    return 1e-6


class ModuleOps:
    """The family's own modules: the CPU path and every prefill."""

    fused = False

    @staticmethod
    def norm(module, x: torch.Tensor) -> torch.Tensor:
        return x if module is None else module(x)

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A matrix product of packed weights (`weights.PackedLayer`)."""
        return F.linear(x, weight, bias)

    @staticmethod
    def apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A projection module of the family (q/k/v, o_proj, the MLP's)."""
        return module(x)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, module) -> tuple[torch.Tensor, torch.Tensor]:
        """`x + delta` (delta None: x) and its norm (module None: itself)."""
        if delta is not None:
            x = x + delta
        return x, self.norm(module, x)

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @staticmethod
    def mlp(layer, h: torch.Tensor) -> torch.Tensor:
        return layer.mlp(h)


class FusedOps(ModuleOps):
    """The compiled functions of this module in place of the norms, RoPE and the gated MLP's activation (CUDA decode
    step); `kind` is the family's `norm_kind`."""

    fused = True

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def norm(self, module, x: torch.Tensor) -> torch.Tensor:
        if module is None:
            return x
        return compiled("norm")(x, module.weight, getattr(module, "bias", None), norm_eps(module), self.kind)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, module) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is None or module is None:
            return super().add_norm(x, delta, module)
        return compiled("add_norm")(x, delta, module.weight, getattr(module, "bias", None), norm_eps(module), self.kind)

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernel = triton_gemv(x, weight)
        return F.linear(x, weight, bias) if kernel is None else kernel.linear(x, weight, bias)

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if type(module) is nn.Linear:  # exactly: a subclass (quantized, LoRA) may compute something else
            return self.linear(x, module.weight, module.bias)
        return module(x)

    def mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        """A gated MLP from one packed gate/up product (or the family's fused `gate_up_proj`); others as the module.
        With the matrix-vector kernel and SiLU, the down projection reads `[gate | up]` and applies SiLU * up itself."""
        packed = layer.packed
        if packed is not None and packed.gate_up is not None:
            gate_up = self.linear(h, packed.gate_up, packed.gate_up_bias)
        elif len(layer.gate_up) == 1:
            gate_up = self.apply(layer.gate_up[0], h)
        elif len(layer.gate_up) == 2:
            gate_up = None
            gate, up = self.apply(layer.gate_up[0], h), self.apply(layer.gate_up[1], h)
        else:
            return layer.mlp(h)
        down = layer.down
        if gate_up is not None and is_silu(layer.act) and type(down) is nn.Linear:
            kernel = triton_gemv(gate_up[..., :down.in_features], down.weight)
            if kernel is not None:
                return kernel.linear(gate_up, down.weight, down.bias, gated=True)
        if gate_up is not None:
            gate, up = gate_up.chunk(2, dim=-1)
        act = compiled("silu_mul") if is_silu(layer.act) else (lambda g, u: layer.act(g) * u)
        return self.apply(down, act(gate, up))
