"""The plain transformers modules of a decoder-only causal LM, found through a table of families.

Each supported family is one `Family` row: where its modules live (attribute names) and which quirks
it has, in the way pyvene describes each architecture by a table of module names. The runtime has one
forward pass (`CompressedLM`, `layer_forward`) that calls the family's own transformers modules (its
embedding, norms, q/k norms, projections, rotary embedding, MLP, final norm and head) and reads its
constants from them (each attention module's `scaling`, `sliding_window`, `attn_logit_softcapping`);
the table only says where they are and how they connect:

| quirk | families |
|---|---|
| q/k/v biases (inside the projections) | Qwen2/2.5 |
| q/k RMSNorm per head (`qk_norm="head"`) / over the whole projection (`"projection"`) | Qwen3, Gemma 3 / OLMo 2 |
| sliding-window layers: the attention module's `sliding_window` / the config's for every layer | Qwen2/3, Gemma 2/3 / Mistral, Phi-3 |
| norms around attention and MLP outputs (`norms`) | Gemma 2/3 (sandwich), OLMo 2 (outputs only) |
| Gemma's RMSNorm `x * (1 + w)` in float32, scaled embedding, GeGLU, `query_pre_attn_scalar` | Gemma 2/3 (inside their modules) |
| attention-logit soft-capping / final-logit soft-capping | Gemma 2 / Gemma 2 and 3 |
| rotary embedding per layer type (local base for sliding layers) | Gemma 3 |
| fused `qkv_proj` (q, k, v row blocks) and `gate_up_proj` | Phi-3 |
| fused `query_key_value` (per head: q, k, v), partial rotary, parallel residual, LayerNorm | GPT-NeoX/Pythia |

A family missing from the table, or a model whose modules are not where its row says, fails at
construction naming what is missing. The TransformerLens bridge wraps these modules; `unwrap` finds
the originals, so no hook ever runs and a bare transformers model works the same. No weight is
copied. `pack_layer` packs a layer's separate q/k/v and gate/up weights into one matrix each for
the CUDA decode step (one matrix-vector product instead of three or two): the Parameters keep
their identity and values, and their storage becomes row blocks of the packed matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

NORM_KINDS = ("rms", "rms_1p", "rms_f32", "layer")  # the functional twins live in `fused` (CUDA decode step)
QKV_LAYOUTS = ("separate", "blocks", "interleaved")
QK_NORMS = (None, "head", "projection")
SLIDING = (None, "attention", "config")


def unwrap(module: nn.Module) -> nn.Module:
    """The original module behind any number of TransformerLens bridge wrappers (itself if none)."""
    while "_original_component" in getattr(module, "_modules", {}):
        module = module._modules["_original_component"]
    return module


@dataclass(frozen=True)
class Family:
    """One transformers decoder family as data. Names are attributes of the `*ForCausalLM` (`base`, `lm_head`), of its
    base model (`embed`, `layers`, `final_norm`, `rotary`), of a decoder layer (`attn`, `mlp`, `norms`), of the
    attention module (`qkv`, `o_proj`, `q_norm`/`k_norm`) and of the MLP (`gate_up`, `down`, `act`)."""

    name: str
    classes: tuple[str, ...]  # the `*ForCausalLM` class names it covers
    base: str = "model"
    embed: str = "embed_tokens"  # called as is: Gemma's scaled embedding multiplies inside
    layers: str = "layers"
    final_norm: str = "norm"
    rotary: str = "rotary_emb"
    rotary_by_layer_type: bool = False  # rotary(x, positions, layer_type) (Gemma 3: local base in sliding layers)
    attn: str = "self_attn"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    qkv_layout: str = "separate"  # "blocks": one module, q | k | v row blocks; "interleaved": per head [q, k, v]
    o_proj: str = "o_proj"
    qk_norm: str | None = None
    # (before attention, on attention's output, before the MLP, on the MLP's output); None = no norm there
    norms: tuple[str | None, str | None, str | None, str | None] = ("input_layernorm", None, "post_attention_layernorm", None)
    norm_kind: str = "rms"  # which functional norm (`fused`) computes what the family's norm module does
    mlp: str = "mlp"
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")  # (gate_up,) fused; () not gated: the MLP is called whole
    down: str = "down_proj"
    act: str = "act_fn"
    parallel_residual: str | None = None  # the config flag: x + attn(norm1(x)) + mlp(norm2(x)) when it is true
    sliding: str | None = None  # where a layer's sliding window comes from: the attention module, or the config
    softcap: str | None = None  # the attention module's attribute holding the logit soft-cap
    final_softcap: str | None = None  # the config attribute holding the final-logit soft-cap
    refuse: tuple[tuple[str, str], ...] = field(default=())  # (config flag, why) the runtime cannot run when it is true

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.norm_kind, NORM_KINDS, "norm_kind"), (self.qkv_layout, QKV_LAYOUTS, "qkv_layout"),
                                     (self.qk_norm, QK_NORMS, "qk_norm"), (self.sliding, SLIDING, "sliding")):
            if value not in allowed:
                raise ValueError(f"Family {self.name}: {what} must be one of {allowed}, not {value!r}.")


LLAMA = Family("llama", ("LlamaForCausalLM",))
GEMMA2 = Family("gemma2", ("Gemma2ForCausalLM",), norm_kind="rms_1p", sliding="attention",
                norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
                softcap="attn_logit_softcapping", final_softcap="final_logit_softcapping")
FAMILIES: tuple[Family, ...] = (
    LLAMA,
    replace(LLAMA, name="mistral", classes=("MistralForCausalLM",), sliding="config"),
    replace(LLAMA, name="qwen2", classes=("Qwen2ForCausalLM",), sliding="attention"),
    replace(LLAMA, name="qwen3", classes=("Qwen3ForCausalLM",), sliding="attention", qk_norm="head"),
    GEMMA2,
    # Gemma3Attention keeps `attn_logit_softcapping` but never passes it to attention: no soft-cap, as transformers.
    replace(GEMMA2, name="gemma3", classes=("Gemma3ForCausalLM",), qk_norm="head", softcap=None, rotary_by_layer_type=True,
            refuse=(("use_bidirectional_attention", "its attention is bidirectional, not causal"),)),
    replace(LLAMA, name="phi3", classes=("Phi3ForCausalLM",), qkv=("qkv_proj",), qkv_layout="blocks",
            gate_up=("gate_up_proj",), act="activation_fn", sliding="config"),
    replace(LLAMA, name="olmo2", classes=("Olmo2ForCausalLM",), qk_norm="projection", norm_kind="rms_f32",
            norms=(None, "post_attention_layernorm", None, "post_feedforward_layernorm")),
    Family("gpt_neox", ("GPTNeoXForCausalLM",), base="gpt_neox", embed="embed_in", final_norm="final_layer_norm",
           attn="attention", qkv=("query_key_value",), qkv_layout="interleaved", o_proj="dense", norm_kind="layer",
           gate_up=(), down="dense_4h_to_h", act="act", parallel_residual="use_parallel_residual"),
)
SUPPORTED = ", ".join(cls for family in FAMILIES for cls in family.classes)


def family_of(hf_model: nn.Module) -> Family:
    """The table row of `hf_model`'s class; ValueError naming the supported classes when there is none."""
    name = type(hf_model).__name__
    for family in FAMILIES:
        if name in family.classes:
            return family
    raise ValueError(f"The compressed-KV runtime does not support {name}: it runs decoder-only causal LMs of the families "
                     f"in headlab/runtime/weights.py FAMILIES ({SUPPORTED}); for a multimodal model pass its text "
                     "decoder *ForCausalLM.")


def _get(owner: nn.Module, name: str | None, where: str, family: Family) -> nn.Module | None:
    if name is None:
        return None
    module = getattr(owner, name, None)
    if module is None:
        raise ValueError(f"{where} has no `{name}`, which the {family.name} family's table row expects "
                         "(headlab/runtime/weights.py FAMILIES); the model does not have the module layout the runtime needs.")
    return unwrap(module) if isinstance(module, nn.Module) else module


@dataclass
class LayerModules:
    """One decoder layer's original modules and attention constants (read from its attention module)."""

    family: Family
    norms: tuple[nn.Module | None, nn.Module | None, nn.Module | None, nn.Module | None]  # as `Family.norms`
    qkv: tuple[nn.Linear, ...]
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    o_proj: nn.Linear
    mlp: nn.Module
    gate_up: tuple[nn.Linear, ...]
    down: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    n_heads: int
    n_kv_heads: int
    d_head: int
    scaling: float
    softcap: float | None
    sliding_window: int | None
    layer_type: str | None  # the rotary embedding's key (Gemma 3)
    packed: "PackedLayer | None" = None  # set by `CompressedLM(pack=True)` (`pack_layer`)

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        return self.n_heads * self.d_head, self.n_kv_heads * self.d_head, self.n_kv_heads * self.d_head

    def project(self, h: torch.Tensor, ops) -> tuple[torch.Tensor, ...]:
        """`h` `[batch, t, d_model]` -> q `[batch, n_heads, t, d_head]`, k, v `[batch, n_kv_heads, t, d_head]` before
        RoPE, q/k norms applied: `ops` (`fused.ModuleOps`, or `FusedOps` on the CUDA decode step) runs the norms
        (`ops.norm(module, x)`) and the products (`ops.apply(module, x)`, `ops.linear(x, weight, bias)`)."""
        batch, t, _ = h.shape
        layout = self.family.qkv_layout
        if layout == "interleaved":  # GPT-NeoX: [batch, t, n_heads, 3 * d_head], each head's q, k, v side by side
            q, k, v = ops.apply(self.qkv[0], h).view(batch, t, self.n_heads, 3 * self.d_head).chunk(3, dim=-1)
        else:
            if self.packed is not None and self.packed.qkv is not None:
                q, k, v = ops.linear(h, self.packed.qkv, self.packed.qkv_bias).split(self.qkv_sizes, dim=-1)
            elif layout == "blocks":
                q, k, v = ops.apply(self.qkv[0], h).split(self.qkv_sizes, dim=-1)
            else:
                q, k, v = (ops.apply(proj, h) for proj in self.qkv)
            if self.family.qk_norm == "projection":
                q, k = ops.norm(self.q_norm, q), ops.norm(self.k_norm, k)
            q, k, v = (x.view(batch, t, -1, self.d_head) for x in (q, k, v))
        if self.family.qk_norm == "head":
            q, k = ops.norm(self.q_norm, q), ops.norm(self.k_norm, k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@dataclass
class ModelModules:
    """Everything the runtime needs from a supported `*ForCausalLM`, plus its shape."""

    family: Family
    embed: nn.Embedding
    layers: list[LayerModules]
    final_norm: nn.Module
    lm_head: nn.Linear
    rotary: nn.Module  # forward(x, position_ids [batch, pos][, layer_type]) -> (cos, sin) [batch, pos, d_rot]
    n_heads: int
    n_kv_heads: int
    d_head: int
    name: str
    parallel_residual: bool = False
    final_softcap: float | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def sliding_windows(self) -> list[int | None]:
        return [layer.sliding_window for layer in self.layers]

    @property
    def rope_reads_length(self) -> bool:
        """The rotary tables depend on the longest position seen (dynamic NTK, LongRoPE): transformers reads it on the
        host (`dynamic_rope_update`), which a CUDA graph cannot capture."""
        kinds = getattr(self.rotary, "rope_type", "default")
        kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
        return any("dynamic" in kind or kind == "longrope" for kind in kinds)

    def rotary_tables(self, x: torch.Tensor, positions: torch.Tensor) -> dict:
        """`{layer_type: (cos, sin)}` `[1, t, d_rot]` for `positions` `[t]` (one entry, key None, unless per layer type)."""
        if not self.family.rotary_by_layer_type:
            return {None: self.rotary(x, positions[None])}
        return {kind: self.rotary(x, positions[None], kind) for kind in {layer.layer_type for layer in self.layers}}

    def logits(self, h: torch.Tensor, ops=None) -> torch.Tensor:
        """The final-normed hidden state `[batch, t, d_model]` -> logits `[batch, t, vocab]` (final soft-cap included);
        `ops.apply` runs the lm_head where given (the CUDA decode step's `fused.FusedOps`)."""
        logits = self.lm_head(h) if ops is None else ops.apply(self.lm_head, h)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits


def _layer_modules(layer: nn.Module, index: int, family: Family, config, shape: tuple[int, int, int]) -> LayerModules:
    where = f"layer {index}"
    attn = _get(layer, family.attn, where, family)
    mlp = _get(layer, family.mlp, f"{where}'s {family.attn}", family)
    n_heads, n_kv_heads, d_head = shape
    sliding = (getattr(attn, "sliding_window", None) if family.sliding == "attention"
               else getattr(config, "sliding_window", None) if family.sliding == "config" else None)
    qk_norms = ("q_norm", "k_norm") if family.qk_norm else (None, None)
    return LayerModules(
        family=family, norms=tuple(_get(layer, name, where, family) for name in family.norms),
        qkv=tuple(_get(attn, name, f"{where}'s {family.attn}", family) for name in family.qkv),
        q_norm=_get(attn, qk_norms[0], f"{where}'s {family.attn}", family),
        k_norm=_get(attn, qk_norms[1], f"{where}'s {family.attn}", family),
        o_proj=_get(attn, family.o_proj, f"{where}'s {family.attn}", family), mlp=mlp,
        gate_up=tuple(_get(mlp, name, f"{where}'s {family.mlp}", family) for name in family.gate_up),
        down=_get(mlp, family.down, f"{where}'s {family.mlp}", family), act=_get(mlp, family.act, f"{where}'s {family.mlp}", family),
        n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head, scaling=float(attn.scaling),
        softcap=getattr(attn, family.softcap, None) if family.softcap else None,
        sliding_window=int(sliding) if sliding else None,
        layer_type=getattr(attn, "layer_type", None) if family.rotary_by_layer_type else None,
    )


def model_modules(hf_model: nn.Module) -> ModelModules:
    """Collect the original modules of a supported `*ForCausalLM` (bridged or not); ValueError naming what is missing."""
    hf_model = unwrap(hf_model)
    family, config = family_of(hf_model), hf_model.config
    for flag, why in family.refuse:
        if getattr(config, flag, False):
            raise ValueError(f"The compressed-KV runtime cannot run this {type(hf_model).__name__}: {why} (config.{flag}).")
    base = _get(hf_model, family.base, type(hf_model).__name__, family)
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    layers = [_layer_modules(unwrap(layer), index, family, config, (n_heads, n_kv_heads, d_head))
              for index, layer in enumerate(_get(base, family.layers, family.base, family))]
    final_softcap = getattr(config, family.final_softcap, None) if family.final_softcap else None
    return ModelModules(
        family=family, embed=_get(base, family.embed, family.base, family), layers=layers,
        final_norm=_get(base, family.final_norm, family.base, family), lm_head=_get(hf_model, "lm_head", type(hf_model).__name__, family),
        rotary=_get(base, family.rotary, family.base, family), n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head,
        name=getattr(config, "_name_or_path", "") or type(hf_model).__name__,
        parallel_residual=bool(getattr(config, family.parallel_residual, False)) if family.parallel_residual else False,
        final_softcap=float(final_softcap) if final_softcap else None,
    )


@dataclass(frozen=True)
class PackedLayer:
    """One layer's projections that read the same input, each group as one matrix (row blocks in order); None where
    the family's own module already is one matrix (Phi-3, GPT-NeoX) or the weights could not be packed."""

    qkv: torch.Tensor | None  # [(n_heads + 2 * n_kv_heads) * d_head, d_model]: q_proj, k_proj, v_proj rows
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor | None  # [2 * d_mlp, d_model]: gate_proj, up_proj rows
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


def _packable(linears: tuple[nn.Linear, ...]) -> bool:
    """Two or more, one dtype and device, and all biased or none (a mixed group is left apart)."""
    return (len(linears) > 1 and len({(l.weight.dtype, l.weight.device) for l in linears}) == 1
            and len({l.bias is None for l in linears}) == 1)


def _pack_linears(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not _packable(linears):
        return None, None
    biases = [linear.bias for linear in linears]
    return _pack([linear.weight for linear in linears]), (None if biases[0] is None else _pack(biases))


def pack_layer(layer: LayerModules) -> PackedLayer | None:
    """Pack `layer`'s separate q/k/v and gate/up weights (see the module's docstring); None where nothing is to pack.

    The model computes exactly as before, but its q/k/v (and gate/up) weights now share one storage:
    `save_pretrained` refuses shared tensors, so save such a model before packing it (or after `.clone()`-ing it)."""
    packed = PackedLayer(*_pack_linears(layer.qkv if layer.family.qkv_layout == "separate" else ()),
                         *_pack_linears(layer.gate_up))
    return packed if packed.qkv is not None or packed.gate_up is not None else None
