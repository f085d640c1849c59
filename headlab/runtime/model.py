"""`CompressedLM`: greedy generation and logits with a compressed KV cache, on the Lab's HF weights.

The forward pass is Llama's, written out so attention can read the compressed cache: per layer,
full KV heads (with their query heads) attend over every past token, streaming KV heads over the
first `sink` and last `recent` tokens only. Prefill runs in chunks of `chunk_size` tokens, so a
streaming head never holds more than `sink + recent` tokens (plus the chunk being processed);
decode is a chunk of one token written into preallocated pages.

Two attention paths, one model: `attention="eager"` (the default on the CPU) uses the paged cache
of `headlab.runtime.cache` and the segmented eager attention, exact against the references;
`attention="sdpa"` (the default on CUDA) uses `headlab.runtime.static`: buffers preallocated for
`max_length` tokens, SDPA prefill, and a static-shape decode step that is captured in a CUDA graph
on CUDA (`cuda_graph=True`) and replayed for every later token.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from headlab.masks import HeadMask
from headlab.runtime import fused
from headlab.runtime.attention import apply_rotary, segmented_attention
from headlab.runtime.cache import CompressedCache
from headlab.runtime.static import ChunkPlan, StaticCache
from headlab.runtime.weights import LayerModules, ModelModules, model_modules, pack_layer


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


class CompressedLM:
    """A causal LM whose KV cache follows a `HeadMask`.

    Args:
        model: a `Lab` (its `hf_model` and tokenizer are used, never its hooks) or a Llama-style
            transformers `*ForCausalLM`.
        mask: the `HeadMask`; checked against the model.
        tokenizer: needed only to generate from text when `model` is not a Lab.
        chunk_size: prefill chunk length (tokens).
        page_size: cache page length (tokens) of the eager path; memory grows one page at a time.
        attention: "eager" (paged cache, segmented eager attention) or "sdpa" (preallocated buffers,
            SDPA prefill, static decode step); default "sdpa" on CUDA, "eager" elsewhere.
        max_length: tokens the "sdpa" cache is allocated for (prompt + new tokens); None = the
            first call's length (`generate` adds `max_new_tokens`).
        cuda_graph: on CUDA with "sdpa", capture the decode step in a CUDA graph.
        fuse: on CUDA with "sdpa", run the decode step's norms, RoPE and residual adds as
            torch.compile'd fused kernels (`headlab.runtime.fused`); default True on CUDA.
        pack: with `fuse`, run each layer's q/k/v and gate/up projections as one matrix product each
            (`weights.pack_layer`: the model's weights are repacked in place, same values, no extra
            memory; a packed model can't be `save_pretrained` as is). Default: `fuse` on CUDA.
    """

    ATTENTIONS = ("eager", "sdpa")

    def __init__(self, model, mask: HeadMask, *, tokenizer=None, chunk_size: int = 256, page_size: int = 256,
                 attention: str | None = None, max_length: int | None = None, cuda_graph: bool = True,
                 fuse: bool | None = None, pack: bool | None = None) -> None:
        self.lab = model if hasattr(model, "hf_model") and hasattr(model, "info") else None
        hf_model = self.lab.hf_model if self.lab is not None else model
        self.tokenizer = tokenizer or (self.lab.tokenizer if self.lab is not None else None)
        self.modules: ModelModules = model_modules(hf_model)
        m = self.modules
        name = self.lab.info.name if self.lab is not None else m.name
        mask.check(SimpleNamespace(name=name, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}.")
        self.mask, self.chunk_size, self.page_size = mask, int(chunk_size), int(page_size)
        self.group = m.n_heads // m.n_kv_heads
        self.heads = [HeadGroups.of(mask.full[layer], self.group) for layer in range(m.n_layers)]
        self.eos_token_id = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        attention = attention or ("sdpa" if m.device.type == "cuda" else "eager")
        if attention not in self.ATTENTIONS:
            raise ValueError(f"attention must be one of {self.ATTENTIONS}, not {attention!r}.")
        self.attention, self.max_length = attention, max_length
        self.cuda_graph = bool(cuda_graph) and m.device.type == "cuda"
        self.fuse = (m.device.type == "cuda" if fuse is None else bool(fuse)) and attention == "sdpa"
        pack = (self.fuse and m.device.type == "cuda") if pack is None else bool(pack) and self.fuse
        self.packed = [pack_layer(layer) if pack else None for layer in m.layers]
        # The head indices on the model's device, once (a host-to-device copy cannot be graph-captured).
        self.heads_on_device = [HeadGroups(*(t.to(m.device) for t in (h.full_kv, h.full_q, h.stream_kv, h.stream_q)))
                                for h in self.heads]
        # where each query head's output sits in cat(full heads' outputs, streaming heads' outputs)
        self.merge_index = [torch.argsort(torch.cat([h.full_q, h.stream_q])).to(m.device) for h in self.heads]
        self.cache: CompressedCache | StaticCache | None = None
        self._graph = None  # (CUDAGraph, static tokens [batch, 1], static logits [batch, 1, vocab])

    # --- state -------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Tokens seen since the last `reset` (the position of the next token)."""
        return self.cache.length if self.cache is not None else 0

    def reset(self) -> None:
        """Drop the cache (its memory is freed) and any captured decode graph."""
        self.cache = None
        self._graph = None

    def kv_bytes(self) -> int:
        """Bytes held by the cache's key and value tensors right now."""
        return self.cache.nbytes() if self.cache is not None else 0

    # --- forward -----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, all_logits: bool = True) -> torch.Tensor:
        """Run `tokens` `[batch, t]` after what the cache holds; returns logits `[batch, t, vocab]`
        (`[batch, 1, vocab]` for the last token only when `all_logits` is False)."""
        m = self.modules
        tokens = torch.as_tensor(tokens, device=m.device)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if self.cache is None:
            self.cache = self.new_cache(tokens.shape[0], self.max_length or tokens.shape[1])
        elif tokens.shape[0] != self.cache.batch:
            raise ValueError(f"The cache holds a batch of {self.cache.batch}, got {tokens.shape[0]} sequences: reset() first.")
        if isinstance(self.cache, StaticCache):
            self.cache.check_room(tokens.shape[1])
            if tokens.shape[1] == 1:
                return self._decode(tokens)
        outputs = []
        for start in range(0, tokens.shape[1], self.chunk_size):
            chunk = tokens[:, start:start + self.chunk_size]
            last = start + self.chunk_size >= tokens.shape[1]
            hidden = self._chunk(chunk)
            if all_logits:
                outputs.append(m.lm_head(hidden))
            elif last:
                outputs.append(m.lm_head(hidden[:, -1:]))
        return torch.cat(outputs, dim=1)

    def new_cache(self, batch: int, max_length: int) -> CompressedCache | StaticCache:
        m = self.modules
        if self.attention == "sdpa":
            return StaticCache(self.mask, batch, m.d_head, max_length, m.dtype, m.device)
        return CompressedCache(self.mask, batch, m.d_head, self.page_size, m.dtype, m.device)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prefill `tokens` `[batch, pos]` from an empty cache; logits `[batch, pos, vocab]` at every position."""
        self.reset()
        return self.forward(tokens)

    def _chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed and run one chunk `[batch, t]` through every layer, updating the cache; returns the
        final-norm hidden state `[batch, t, d_model]`."""
        m, cache = self.modules, self.cache
        start = cache.length
        positions = torch.arange(start, start + tokens.shape[1], device=m.device)
        hidden = m.embed(tokens)
        cos, sin = m.rotary(hidden, positions[None])  # [1, t, d_head]
        if isinstance(cache, StaticCache):
            plan = cache.plan(start, tokens.shape[1])
            for index, layer in enumerate(m.layers):
                hidden = self._layer(index, layer, hidden, cos, sin, plan)
            cache.finish_chunk(plan)
            return m.final_norm(hidden)
        positions = positions.cpu()
        for index, layer in enumerate(m.layers):
            hidden = self._layer(index, layer, hidden, cos, sin, start, positions)
        cache.length += tokens.shape[1]
        return m.final_norm(hidden)

    # --- the "sdpa" path's decode step ------------------------------------------------------------

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token `[batch, 1]` at the device position `cache.pos`: static shapes, no host sync; logits `[batch, 1, vocab]`."""
        m, cache = self.modules, self.cache
        hidden = m.embed(tokens)
        cos, sin = m.rotary(hidden, cache.pos[None])
        step = cache.begin_step()
        if self.fuse:  # each layer hands its MLP output on, to be added in the next norm's kernel
            delta = None
            for index, layer in enumerate(m.layers):
                hidden, delta = self._fused_decode_layer(index, layer, hidden, delta, cos, sin, step)
            hidden, normed = fused.compiled("add_rms_norm")(hidden, delta, m.final_norm.weight, fused.norm_eps(m.final_norm))
        else:
            for index, layer in enumerate(m.layers):
                hidden = self._layer(index, layer, hidden, cos, sin, step)
            normed = m.final_norm(hidden)
        cache.end_step()
        return m.lm_head(normed)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if not self.cuda_graph:
            logits = self._step(tokens)
        else:
            if self._graph is None:
                self._graph = self._capture(tokens)
            graph, static_tokens, static_logits = self._graph
            static_tokens.copy_(tokens)
            graph.replay()
            logits = static_logits.clone()
        cache.length += 1
        return logits

    def _capture(self, tokens: torch.Tensor):
        """Warm the step up on a side stream (it is idempotent once `pos` is put back), then capture it."""
        cache = self.cache
        static_tokens = tokens.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step(static_tokens)
                cache.pos.sub_(1)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self._step(static_tokens)
        return graph, static_tokens, static_logits

    def _layer(self, index: int, layer: LayerModules, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               *where) -> torch.Tensor:
        """One decoder layer on `x` `[batch, t, d_model]`; `where` is `(start, positions [t])` on the eager
        path, a `ChunkPlan` (prefill) or the decode step's masks on the "sdpa" path."""
        m = self.modules
        batch, t, _ = x.shape
        h = layer.input_norm(x)
        q = apply_rotary(layer.q_proj(h).view(batch, t, m.n_heads, m.d_head).transpose(1, 2), cos, sin)
        k = apply_rotary(layer.k_proj(h).view(batch, t, m.n_kv_heads, m.d_head).transpose(1, 2), cos, sin)
        v = layer.v_proj(h).view(batch, t, m.n_kv_heads, m.d_head).transpose(1, 2)
        if isinstance(self.cache, StaticCache):
            out = self._static_attention(index, q, k, v, where[0])
        else:
            out = self._eager_attention(index, q, k, v, *where)
        x = x + layer.o_proj(out.transpose(1, 2).reshape(batch, t, m.n_heads * m.d_head))
        return x + layer.mlp(layer.post_norm(x))

    def _fused_decode_layer(self, index: int, layer: LayerModules, x, delta, cos, sin, step):
        """`_layer` for one decode token with the fused pieces of `headlab.runtime.fused` (CUDA). `x` plus the
        previous layer's MLP output `delta` (None for the first layer) is the layer's input; returns this
        layer's `(x after attention, MLP output)`."""
        m, lc, heads = self.modules, self.cache.layers[index], self.heads_on_device[index]
        batch = x.shape[0]
        w, eps = layer.input_norm.weight, fused.norm_eps(layer.input_norm)
        if delta is None:
            h = fused.compiled("rms_norm")(x, w, eps)
        else:
            x, h = fused.compiled("add_rms_norm")(x, delta, w, eps)
        packed = self.packed[index]
        if packed is not None:
            q, k, v = F.linear(h, packed.qkv, packed.qkv_bias).split(packed.qkv_sizes, dim=-1)
        else:
            q, k, v = layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)
        q = q.view(batch, 1, m.n_heads, m.d_head).transpose(1, 2)
        k = k.view(batch, 1, m.n_kv_heads, m.d_head).transpose(1, 2)
        v = v.view(batch, 1, m.n_kv_heads, m.d_head).transpose(1, 2)
        if lc.n_full and lc.n_stream:
            parts = fused.compiled("rotary_split")(q, k, v, cos, sin, heads.full_q, heads.full_kv, heads.stream_q, heads.stream_kv)
            out_full, out_stream = self._static_attention(index, q, k, v, step, parts)
            out = fused.compiled("merge_heads")(out_full, out_stream, self.merge_index[index])
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = self._static_attention(index, q, k, v, step).transpose(1, 2).reshape(batch, 1, m.n_heads * m.d_head)
        x, h = fused.compiled("add_rms_norm")(x, layer.o_proj(out), layer.post_norm.weight, fused.norm_eps(layer.post_norm))
        if packed is not None:
            gate, up = F.linear(h, packed.gate_up, packed.gate_up_bias).chunk(2, dim=-1)
        elif fused.is_silu(layer.act):
            gate, up = layer.gate_proj(h), layer.up_proj(h)
        else:
            return x, layer.mlp(h)
        act = fused.compiled("silu_mul") if fused.is_silu(layer.act) else (lambda g, u: layer.act(g) * u)
        return x, layer.down_proj(act(gate, up))

    def _static_attention(self, index: int, q, k, v, where, split=None):
        """`q` `[batch, n_heads, t, d]`, `k`/`v` `[batch, n_kv, t, d]` -> `[batch, n_heads, t, d]` (the "sdpa" path).
        `split`: `(q_full, kv_full, q_stream, kv_stream)` when already gathered by the fused decode (keys and values
        stacked `[2, batch, n, 1, d]`); then the full and streaming heads' outputs are returned apart, for
        `fused.merge_heads`."""
        m, heads, cache = self.modules, self.heads_on_device[index], self.cache
        lc = cache.layers[index]
        batch, _, t, d = q.shape
        decode = not isinstance(where, ChunkPlan)
        parts = []  # per kind: (queries, keys and values, query-head indices or None for the whole layer)
        for i, (n, kv_idx, q_idx) in enumerate(((lc.n_full, heads.full_kv, heads.full_q), (lc.n_stream, heads.stream_kv, heads.stream_q))):
            if not n:
                parts.append(None)
            elif split is not None:
                parts.append((split[2 * i], split[2 * i + 1], q_idx))
            else:
                whole = n == m.n_kv_heads  # the whole layer is of this kind: no gather
                qi, ki, vi = (q, k, v) if whole else (q.index_select(1, q_idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx))
                parts.append((qi, torch.stack([ki, vi]) if decode else (ki, vi), None if whole else q_idx))
        full, stream = parts
        if decode:  # the group's query heads become the query rows of their KV head
            def rows(part):
                return (part[0].view(batch, -1, self.group, d), part[1]) if part else (None, None)
            outs = cache.decode(lc, *rows(full), *rows(stream), where, m.scaling)
            outs = [o.view(batch, -1, 1, d) if o is not None else None for o in outs]
        else:
            outs = [cache.prefill_full(lc, full[0], *full[1], where, m.scaling) if full else None,
                    cache.prefill_stream(lc, stream[0], *stream[1], where, m.scaling) if stream else None]
        if full is not None and full[2] is None:
            return outs[0]
        if stream is not None and stream[2] is None:
            return outs[1]
        if split is not None:
            return outs[0], outs[1]
        out = torch.empty_like(q)
        out.index_copy_(1, full[2], outs[0])
        out.index_copy_(1, stream[2], outs[1])
        return out

    def _eager_attention(self, index: int, q, k, v, start: int, positions: torch.Tensor) -> torch.Tensor:
        """The paged cache and segmented eager attention (the "eager" path)."""
        m, heads, lc = self.modules, self.heads[index], self.cache.layers[index]
        batch, _, t, _ = q.shape
        out = torch.empty_like(q)  # [batch, n_heads, t, d_head]
        q_pos = positions.to(q.device)
        for kv_idx, q_idx, store, window in (
            (heads.full_kv, heads.full_q, lc.full, None),
            (heads.stream_kv, heads.stream_q, lc.streaming, (self.mask.sink, self.mask.recent)),
        ):
            if kv_idx.numel() == 0:
                continue
            kv_idx, q_idx = kv_idx.to(q.device), q_idx.to(q.device)
            k_part, v_part = k[:, kv_idx], v[:, kv_idx]
            query = q[:, q_idx].view(batch, kv_idx.numel(), self.group, t, m.d_head)
            segments = store.segments(start) + [(k_part, v_part, q_pos, None)]
            out[:, q_idx] = segmented_attention(query, q_pos, segments, m.scaling, window).reshape(batch, -1, t, m.d_head)
            store.append(k_part, v_part, start)
        return out

    # --- generation --------------------------------------------------------------------------

    def encode(self, prompt: str) -> torch.Tensor:
        """Text -> `[1, pos]` tokens (BOS first when the model has one, as `Lab.to_tokens`)."""
        if self.lab is not None:
            return self.lab.to_tokens(prompt)
        if self.tokenizer is None:
            raise ValueError("Generating from text needs a tokenizer: pass tokenizer= (or a Lab).")
        return self.tokenizer(prompt, return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def generate(self, prompt_or_tokens, max_new_tokens: int = 32, stop_at_eos: bool = True):
        """Greedy decoding from an empty cache.

        `prompt_or_tokens`: text, or tokens `[batch, pos]` / `[pos]`. Returns the new text for a
        text prompt, else the new tokens `[batch, n_new]` (fewer than `max_new_tokens` when every
        sequence reached end-of-sequence and `stop_at_eos`).
        """
        text = isinstance(prompt_or_tokens, str)
        tokens = self.encode(prompt_or_tokens) if text else torch.as_tensor(prompt_or_tokens)
        if tokens.dim() == 1:
            tokens = tokens[None]
        eos = self.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.reset()
        if self.attention == "sdpa":
            self.cache = self.new_cache(tokens.shape[0], self.max_length or tokens.shape[1] + max_new_tokens)
        logits = self.forward(tokens, all_logits=False)
        new = []
        done = torch.zeros(tokens.shape[0], dtype=torch.bool)
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(-1)  # [batch]
            new.append(next_token)
            if eos:
                done |= torch.isin(next_token.cpu(), torch.tensor(sorted(eos)))
            if step == max_new_tokens - 1 or (stop_at_eos and eos and bool(done.all())):
                break
            logits = self.forward(next_token[:, None])
        out = torch.stack(new, dim=1) if new else torch.zeros(tokens.shape[0], 0, dtype=torch.long)
        if text:
            return self.tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
        return out
