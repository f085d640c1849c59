"""The plain Hugging Face modules of a Llama-style causal LM, unwrapped from TransformerLens' bridge.

`lab.hf_model` is the same `LlamaForCausalLM` the `TransformerBridge` runs, but the bridge has
replaced its submodules by hook-carrying wrappers that keep the original under
`_original_component`. The runtime calls the originals (`nn.Linear`, RMSNorm, rotary embedding)
directly, so no TransformerLens hook ever runs and a bare transformers model works the same.
No weight is copied. `pack_layer` packs a layer's q/k/v and gate/up weights into one matrix each
for the CUDA decode step (one matrix-vector product instead of three or two): the Parameters keep
their identity and values, and their storage becomes row blocks of the packed matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """The original module behind any number of TransformerLens bridge wrappers (itself if none)."""
    while "_original_component" in getattr(module, "_modules", {}):
        module = module._modules["_original_component"]
    return module


@dataclass
class LayerModules:
    """One decoder layer's original modules."""

    input_norm: nn.Module
    q_proj: nn.Linear  # d_model -> n_heads * d_head
    k_proj: nn.Linear  # d_model -> n_kv_heads * d_head
    v_proj: nn.Linear
    o_proj: nn.Linear  # n_heads * d_head -> d_model
    post_norm: nn.Module
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """`[batch, pos, d_model]` -> `[batch, pos, d_model]` (gated MLP, as `LlamaMLP`)."""
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class ModelModules:
    """Everything the runtime needs from a Llama-style `*ForCausalLM`, plus its shape."""

    embed: nn.Embedding
    layers: list[LayerModules]
    final_norm: nn.Module
    lm_head: nn.Linear
    rotary: nn.Module  # forward(x, position_ids [batch, pos]) -> (cos, sin) [batch, pos, d_head]
    n_heads: int
    n_kv_heads: int
    d_head: int
    scaling: float
    name: str

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device


SUPPORTED = "Llama-style decoder (LlamaForCausalLM and relatives: q/k/v/o projections, RoPE, gated MLP, no q/k norm)"


def model_modules(hf_model: nn.Module) -> ModelModules:
    """Collect the original modules of a Llama-style `*ForCausalLM` (bridged or not)."""
    hf_model = unwrap(hf_model)
    config = hf_model.config
    base = unwrap(hf_model.model)
    layers = []
    for layer in base.layers:
        layer = unwrap(layer)
        attn, mlp = unwrap(layer.self_attn), unwrap(layer.mlp)
        if "q_norm" in attn._modules or "k_norm" in attn._modules:
            raise NotImplementedError(f"{type(hf_model).__name__} normalizes q/k per head; the runtime supports a {SUPPORTED}.")
        layers.append(LayerModules(
            input_norm=unwrap(layer.input_layernorm), q_proj=unwrap(attn.q_proj), k_proj=unwrap(attn.k_proj),
            v_proj=unwrap(attn.v_proj), o_proj=unwrap(attn.o_proj), post_norm=unwrap(layer.post_attention_layernorm),
            gate_proj=unwrap(mlp.gate_proj), up_proj=unwrap(mlp.up_proj), down_proj=unwrap(mlp.down_proj), act=mlp.act_fn,
        ))
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and getattr(config, "layer_types", None):
        if any(t != "full_attention" for t in config.layer_types):
            raise NotImplementedError("The model has sliding-window layers; the runtime supports full-attention layers only.")
    return ModelModules(
        embed=unwrap(base.embed_tokens), layers=layers, final_norm=unwrap(base.norm), lm_head=unwrap(hf_model.lm_head),
        rotary=unwrap(base.rotary_emb), n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads, d_head=d_head,
        scaling=d_head ** -0.5, name=getattr(config, "_name_or_path", "") or type(hf_model).__name__,
    )


@dataclass(frozen=True)
class PackedLayer:
    """One layer's projections that read the same input, each group as one matrix (row blocks in order)."""

    qkv: torch.Tensor  # [(n_heads + 2 * n_kv_heads) * d_head, d_model]: q_proj, k_proj, v_proj rows
    qkv_bias: torch.Tensor | None
    qkv_sizes: tuple[int, int, int]
    gate_up: torch.Tensor  # [2 * d_mlp, d_model]: gate_proj, up_proj rows
    gate_up_bias: torch.Tensor | None


def _already_packed(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The packed matrix when `tensors` are already consecutive row blocks of one storage (packed before), else None."""
    first = tensors[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage.data_ptr() or not t.is_contiguous() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.detach().new_empty(0).set_(storage, first.storage_offset(), (rows, *first.shape[1:]))


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)`, after which each tensor's data is its row block of the result (no second copy is kept)."""
    packed = _already_packed(tensors)
    if packed is not None:
        return packed
    packed = torch.cat([t.detach() for t in tensors])
    start = 0
    for t in tensors:
        t.data = packed[start:start + t.shape[0]]
        start += t.shape[0]
    return packed


def _packable(linears: list[nn.Linear]) -> bool:
    """One dtype and device, and all biased or none (a mixed group is left apart)."""
    return (len({(l.weight.dtype, l.weight.device) for l in linears}) == 1
            and len({l.bias is None for l in linears}) == 1)


def _pack_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    biases = [linear.bias for linear in linears]
    return _pack([linear.weight for linear in linears]), (None if biases[0] is None else _pack(biases))


def pack_layer(layer: LayerModules) -> PackedLayer | None:
    """Pack `layer`'s q/k/v and gate/up weights (see the module's docstring); None where the shapes do not allow it.

    The model computes exactly as before, but its q/k/v (and gate/up) weights now share one storage:
    `save_pretrained` refuses shared tensors, so save such a model before packing it (or after `.clone()`-ing it)."""
    qkv = [layer.q_proj, layer.k_proj, layer.v_proj]
    gate_up = [layer.gate_proj, layer.up_proj]
    if not (_packable(qkv) and _packable(gate_up)):  # checked before anything is repacked
        return None
    first, second = _pack_linears(qkv), _pack_linears(gate_up)
    return PackedLayer(qkv=first[0], qkv_bias=first[1], qkv_sizes=tuple(l.weight.shape[0] for l in qkv),
                       gate_up=second[0], gate_up_bias=second[1])
