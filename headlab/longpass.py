"""Analysis passes whose memory grows linearly with the context: chunked prefill, SDPA, patterns only where read.

An eager forward of `n` tokens materialises every layer's `[batch, head, n, n]` scores and pattern (on the
embedded model at 4k tokens that raised the CPU's peak memory by 18 GiB). Here the prompt is prefilled in
chunks of `C` tokens against the transformers KV cache (`DynamicCache`), and inside `linear_attention(lab)`
each attention layer of the TransformerLens bridge computes its output with torch's
`scaled_dot_product_attention` (flash / memory-efficient kernels: no `[q, k]` matrix), lower-right causal
over the cache. Memory: the KV cache (linear in n) plus one chunk's activations.

Hooks stay the way an analysis says what it reads. Every hook of the bridge fires as in an eager forward
(`hook_q`, `hook_k`, `hook_v`, `hook_rot_q`, `hook_rot_k`, `hook_z`, `hook_out`, `hook_resid_pre`, ...), one
chunk at a time (`[batch, C, ...]`), so ablations on them compose. The attention pattern is computed only
for the layers where a hook reads it:
- read-only hooks on `hook_pattern` (marked with `reads_only`, as `activations.capturing` does) get the
  pattern recomputed exactly (`softmax(q k^T * scale)`, float32) in blocks of query rows,
  `[batch, head, R, K]` with `K = (position of the block's last query) + 1`: the block's queries are the last
  `R` of `K` positions, the convention of a cached decode step, so a reducer knows every row's position.
  A decode step (one query) gives the newest query's row `[batch, head, 1, n]` and nothing else;
- a hook that may edit `hook_attn_scores` or `hook_pattern` (an ablation such as `streaming_window`) makes
  that layer run the bridge's own eager attention for the chunk: `[batch, head, C, K]` scores, still linear
  in n for a fixed chunk (the chunk is made small enough, `chunk_tokens`).
Layers of architectures this SDPA path does not cover (QK norms, soft-capping, learned sinks, gated or split
inputs, partial rotary, sliding windows) run the bridge's eager attention per chunk too.

Cost of one pass of `n` tokens, batch `b`, on a model of `L` layers, `h` query / `g` KV heads of width `d`:
time ~ weights x n (the chunks' matmuls) + L x h x d x n^2 (attention, half of it skipped by causality;
twice that again for layers whose pattern is read); memory = KV cache `2 L g d n b` elements + one chunk's
activations + one row block of pattern (`ROW_BUDGET_BYTES`), independent of n^2.
"""
from __future__ import annotations

import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from headlab.activations import READS_ONLY, Hook, Reduce, capturing
from headlab.lab import Lab

ATTENTION_NAME = "headlab_linear"  # a transformers attention name with no mask function: no 4-D mask is built
ROW_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}  # one block of recomputed pattern rows (float32)
EAGER_BUDGET_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}  # one eager layer's chunk scores (float32)
CHUNK_TOKENS = {"cpu": 512, "cuda": 4096}  # SDPA chunk: flash needs no [q, k] matrix, only activations
_PASS_LOCK = threading.RLock()  # one pass at a time per process: the bridge's layers are switched while it runs


def _device_kind(lab: Lab) -> str:
    return "cuda" if str(lab.device).startswith("cuda") else "cpu"


def _user_hooks(hook_point) -> list[Callable]:
    """The callables registered on a TransformerLens `HookPoint` (None for a handle that does not say)."""
    return [getattr(handle, "user_hook", None) for handle in getattr(hook_point, "fwd_hooks", [])]


def pattern_mode(bridge, supported: bool | None = None) -> str:
    """How one attention layer must run now: "sdpa" (nobody reads its pattern), "rows" (only read-only hooks on
    `hook_pattern`) or "eager" (a hook may edit scores or pattern, or the architecture is not covered).

    `supported`: whether `sdpa_supported(bridge)` (default: as `linear_attention` recorded it)."""
    supported = getattr(bridge, "_headlab_sdpa_ok", False) if supported is None else supported
    if not supported or _user_hooks(bridge.hook_attn_scores):
        return "eager"
    readers = _user_hooks(bridge.hook_pattern)
    if not readers:
        return "sdpa"
    return "rows" if all(getattr(fn, READS_ONLY, False) for fn in readers) else "eager"


def sdpa_supported(bridge) -> bool:
    """Whether the SDPA path reproduces `bridge`'s attention: a plain rotary (Llama-style) attention layer."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    hf_attn, cfg = bridge.original_component, bridge.config
    plain_forward = type(bridge).forward is PositionEmbeddingsAttentionBridge.forward
    unsupported_cfg = ("use_split_qkv_input", "use_attn_in", "gated_q_proj", "use_attn_result", "rotary_interleaved_cos_sin",
                       "rotary_adjacent_pairs", "qk_norm_after_rope")
    unsupported_hf = ("key_multiplier", "attn_logit_softcapping", "sinks", "sliding_window")
    rope = getattr(getattr(hf_attn, "config", None), "rope_parameters", None)
    return (plain_forward and set(bridge.submodules) == {"q", "k", "v", "o"} and bridge.is_causal
            and not bridge.is_cross_attention and not any(getattr(cfg, name, False) for name in unsupported_cfg)
            and all(getattr(hf_attn, name, None) is None for name in unsupported_hf)
            and getattr(getattr(hf_attn, "config", None), "clip_qkv", None) is None
            and not (isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None)
            and type(bridge)._pre_output_projection is PositionEmbeddingsAttentionBridge._pre_output_projection)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of the last `q` positions over `k` positions (lower-right causal), grouped-query aware.

    Args:
        q: `[batch, head, C, d]`; k, v: `[batch, kv_head, K, d]` with `K >= C`.
    Returns:
        `[batch, head, C, d]`.
    """
    n_q, n_k = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if n_q == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
    if n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    if q.is_cuda:  # flash / memory-efficient kernels take the lower-right causal mask without materialising it
        from torch.nn.attention.bias import causal_lower_right

        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n_q, n_k), scale=scaling,
                                                  enable_gqa=gqa)
        except RuntimeError:  # a kernel without grouped-query support: expand the KV heads (one layer, transient)
            group = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  attn_mask=causal_lower_right(n_q, n_k), scale=scaling)
    mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)  # [C, K] bool
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)


def pattern_rows(q: torch.Tensor, k: torch.Tensor, scaling: float, rows: int) -> Iterator[torch.Tensor]:
    """The attention pattern of the last `C` of `K` positions, `rows` queries at a time, as eager attention computes it.

    Args:
        q: `[batch, head, C, d]` rotated queries; k: `[batch, kv_head, K, d]` every key so far (query head h reads
            KV head h // (head / kv_head), as `repeat_kv`).
    Yields:
        `[batch, head, R, K_r]` float32 blocks, `K_r = K - C + (last row of the block) + 1`: each block's queries
        are its last `R` positions.
    """
    batch, n_heads, n_q, d = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        k_end = n_k - n_q + r1
        block = q[:, :, r0:r1].reshape(batch, n_kv, group * (r1 - r0), d)  # fold each group's queries together
        scores = torch.matmul(block, k[:, :, :k_end].transpose(-1, -2)) * scaling  # [b, kv, g * R, K_r]
        scores = scores.view(batch, n_heads, r1 - r0, k_end)
        tail = scores[..., k_end - (r1 - r0):]  # the block's own keys: causal triangle
        tail.masked_fill_(torch.ones_like(tail[0, 0], dtype=torch.bool).triu(1), float("-inf"))
        yield torch.softmax(scores, dim=-1, dtype=torch.float32)


def rows_per_block(batch: int, n_heads: int, n_keys: int, device_kind: str) -> int:
    """Query rows per recomputed pattern block: scores + float32 softmax under `ROW_BUDGET_BYTES`."""
    budget = ROW_BUDGET_BYTES.get(device_kind, ROW_BUDGET_BYTES["cpu"])
    return max(1, budget // (batch * n_heads * n_keys * 4 * 3))


def _sdpa_forward(self, *args, **kwargs):
    """The bridge attention's forward inside `linear_attention`: every hook as the bridge fires it, SDPA for the output."""
    mode = pattern_mode(self)
    if mode == "eager":
        return type(self).forward(self, *args, **kwargs)
    hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
    hf_attn = self.original_component
    hidden = self.hook_in(hidden)
    shape = (*hidden.shape[:-1], -1, hf_attn.head_dim)
    q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))
    position_embeddings = kwargs.pop("position_embeddings", None)
    if position_embeddings is not None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = self._apply_position_embedding_hooks(position_embeddings)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if hasattr(self, "hook_rot_q"):
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)
    k, v = self._update_kv_cache(k, v, **kwargs)  # [b, kv_head, K, d]: the whole cache so far
    scaling = getattr(hf_attn, "scaling", hf_attn.head_dim ** -0.5)
    out = causal_attention(q, k, v, scaling)
    if mode == "rows":
        for block in pattern_rows(q, k, scaling, rows_per_block(q.shape[0], q.shape[1], k.shape[2], q.device.type)):
            self.hook_pattern(block)
    out = out.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
    out = out.to(self.o.original_component.weight.dtype)
    return self.hook_out(self.o(out)), None


def _register() -> None:
    from transformers import AttentionInterface

    def never_called(*args, **kwargs):
        raise RuntimeError(f"'{ATTENTION_NAME}' is set only while headlab.longpass runs the bridge's own attention.")

    AttentionInterface.register(ATTENTION_NAME, never_called)


@contextmanager
def linear_attention(lab: Lab) -> Iterator[None]:
    """Inside, `lab`'s attention layers run the SDPA path (see the module docstring) and transformers builds no mask."""
    with _PASS_LOCK:
        _register()
        hf_model = lab.hf_model
        previous = hf_model.config._attn_implementation
        bridges = [block.attn for block in lab.model.blocks]
        for bridge in bridges:
            bridge._headlab_sdpa_ok = sdpa_supported(bridge)
            # straight into the instance dict: the bridge's __setattr__ would forward `forward` to the HF module
            bridge.__dict__["forward"] = types.MethodType(_sdpa_forward, bridge)
        hf_model.set_attn_implementation(ATTENTION_NAME)
        try:
            yield
        finally:
            hf_model.set_attn_implementation(previous)
            for bridge in bridges:
                bridge.__dict__.pop("forward", None)


def eager_layers(lab: Lab) -> bool:
    """Whether some layer would run eager attention in a pass started now (its chunk is then budgeted for it)."""
    return any(pattern_mode(block.attn, sdpa_supported(block.attn)) == "eager" for block in lab.model.blocks)


def chunk_tokens(lab: Lab, n_tokens: int, batch: int = 1, eager: bool = False) -> int:
    """Tokens per prefill chunk: `CHUNK_TOKENS` on the SDPA path; with eager layers, as many as keep one layer's
    `[batch, head, C, n]` float32 scores (x3: scores, masked copy, softmax) under `EAGER_BUDGET_BYTES`."""
    kind = _device_kind(lab)
    if not eager:
        return CHUNK_TOKENS[kind]
    per_query = batch * lab.info.n_heads * n_tokens * 4 * 3
    return max(1, min(CHUNK_TOKENS[kind], EAGER_BUDGET_BYTES[kind] // per_query))


@dataclass
class Prefilled:
    """What a prefill leaves: the last position's logits `[batch, d_vocab]` and the KV cache (a transformers `Cache`)."""

    logits: torch.Tensor
    cache: object


@torch.no_grad()
def prefill(lab: Lab, tokens: torch.Tensor, chunk: int | None = None) -> Prefilled:
    """Run `tokens` `[batch, pos]` through the model in chunks, keeping the KV cache; hooks registered around it fire per chunk.

    `chunk`: tokens per chunk (default `chunk_tokens`, smaller when some layer runs eager attention).
    """
    tokens = tokens.to(lab.device)
    chunk = chunk or chunk_tokens(lab, tokens.shape[1], tokens.shape[0], eager_layers(lab))
    cache, out = None, None
    with linear_attention(lab):
        for start in range(0, tokens.shape[1], chunk):
            out = lab.hf_model(tokens[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
    return Prefilled(out.logits[:, -1], cache)


@torch.no_grad()
def step(lab: Lab, token: torch.Tensor, prefilled: Prefilled | None) -> Prefilled:
    """One cached decode step of `token` `[batch, 1]` after `prefilled` (None: the first token; the cache grows in place)."""
    with linear_attention(lab):
        out = lab.hf_model(token.to(lab.device), past_key_values=prefilled.cache if prefilled else None, use_cache=True,
                           logits_to_keep=1)
    return Prefilled(out.logits[:, -1], out.past_key_values)


@torch.no_grad()
def generate(lab: Lab, tokens: torch.Tensor, max_new_tokens: int, hooks: list[Hook] | None = None,
             read: tuple[list[str], Reduce] | None = None) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """Greedy decoding of `tokens` `[1, pos]` with `hooks` active, memory linear in pos.

    The prompt but its last token is prefilled in chunks; the last token and every generated one then run as
    single-query steps, so `read = (names, reduce)` captures each activation at the query that produces a token
    (for `hook_pattern`: the newest query's row `[1, head, 1, k]` only, `reduce`d) and never the prefill's.
    Returns the generated ids and, per generated token, `{name: reduced activation}` (empty dicts without `read`).
    """
    names, reduce = read or ([], None)
    generated, kept = [], []
    with lab.model.hooks(fwd_hooks=list(hooks or [])):
        state = prefill(lab, tokens[:, :-1]) if tokens.shape[1] > 1 else None
        token = tokens[:, -1:]
        for _ in range(max_new_tokens):
            with capturing(lab, names, reduce) as stash:
                state = step(lab, token, state)
            token = state.logits.argmax(-1, keepdim=True)  # [batch, 1]
            generated.append(int(token[0, 0]))
            kept.append(dict(stash))
    return generated, kept


def kv_cache_bytes(lab: Lab, n_tokens: int, batch: int = 1) -> int:
    """Bytes of a full KV cache of `n_tokens` for `batch` sequences in the lab's dtype."""
    info = lab.info
    return 2 * info.n_layers * info.n_kv_heads * info.d_head * n_tokens * batch * lab.dtype.itemsize


def pass_bytes(lab: Lab, n_tokens: int, batch: int = 1, reads_pattern: bool = False) -> int:
    """Peak memory a linear pass of `n_tokens` adds above the weights (an upper estimate for the up-front check):
    the KV cache, twice one layer's cache (the cache grows by concatenation), one chunk's activations and logits,
    and, when a pattern is read, one block of pattern rows."""
    info = lab.info
    kind = _device_kind(lab)
    chunk = min(n_tokens, CHUNK_TOKENS[kind])
    width = max(info.d_model * 8, info.n_heads * info.d_head * 4)  # MLP and attention activations of one chunk
    activations = batch * chunk * width * 4 * 2 + batch * info.d_vocab * 4 * 2
    rows = ROW_BUDGET_BYTES[kind] if reads_pattern else 0
    return kv_cache_bytes(lab, n_tokens, batch) + 2 * kv_cache_bytes(lab, n_tokens, batch) // info.n_layers + activations + rows


def eager_pass_bytes(lab: Lab, n_tokens: int, batch: int = 1, kept_patterns: int = 0) -> int:
    """Peak memory an eager forward (`lab.model(tokens)`) of `batch` x `n_tokens` adds above the weights: one layer's
    `[batch, head, n, n]` scores, masked scores and pattern (float32), `kept_patterns` layers' patterns held by hooks,
    every position's logits and a few residual-width activations per layer. Quadratic in `n_tokens`."""
    info = lab.info
    square = batch * info.n_heads * n_tokens * n_tokens * 4
    activations = batch * n_tokens * (info.d_vocab + 8 * info.d_model * info.n_layers) * 4
    return (3 + kept_patterns) * square + activations
