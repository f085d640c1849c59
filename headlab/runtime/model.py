"""`CompressedLM`: greedy generation and logits with a compressed KV cache, on the model's own transformers modules.

One forward pass for every supported family (`weights.FAMILIES`): `layer_forward` wires a layer's
own modules (norms, q/k/v projections and q/k norms, rotary embedding, MLP) the way its family's
table row says (pre-norm, norms around the outputs, parallel residual), and only attention is the
runtime's: full KV heads (with their query heads) attend over every past token, streaming KV heads
over the first `sink` and last `recent` tokens only (a model's own sliding-window layers stream
with `sink=0, recent=sliding_window`: `cache.layer_layout`). Prefill runs in chunks of
`chunk_size` tokens, so a streaming head never holds more than `sink + recent` tokens (plus the
chunk being processed); decode is a chunk of one token written into preallocated pages.

Two attention paths, one model: `attention="eager"` (the default on the CPU) uses the paged cache
of `headlab.runtime.cache` and the segmented eager attention, exact against the references;
`attention="sdpa"` (the default on CUDA) uses `headlab.runtime.static`: buffers preallocated for
`max_length` tokens, SDPA prefill, and a static-shape decode step that is captured in a CUDA graph
on CUDA (`cuda_graph=True`) and replayed for every later token. The decode step may run the
norms, activation and matrix products as fused kernels (`fused.FusedOps`) through the same
`layer_forward`; its RoPE is applied by the cache's decode (inside the Triton attention kernel on CUDA).

A model sharded over several devices (`hl.load(..., device_map=...)`, `headlab.placement`) runs layer by layer:
each layer's KV cache is allocated on that layer's device, the hidden state (and the rotary tables) move to the
next layer's device between layers, and the logits come out on the lm_head's device. `kv_bytes_by_device` says
what each device holds. The decode step is then not captured in a CUDA graph (see `CompressedLM`).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

from headlab import placement
from headlab.masks import HeadMask
from headlab.runtime import fused
from headlab.runtime.attention import cached_attention
from headlab.runtime.cache import CompressedCache, HeadGroups, layer_layout
from headlab.runtime.static import ChunkPlan, StaticCache
from headlab.runtime.weights import LayerModules, ModelModules, model_modules, pack_layer


def layer_forward(layer: LayerModules, x: torch.Tensor, delta: torch.Tensor | None, attend, ops: fused.ModuleOps,
                  parallel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer of any family. Its input is `x + delta` `[batch, t, d_model]` (`delta` the previous layer's
    last output, None for the first layer: the add is left to the next norm so the fused path folds it in);
    `attend(h)` -> the attention heads' output before `o_proj` `[batch, t, n_heads * d_head]`. Returns `(x, delta)`."""
    input_norm, attn_out_norm, mlp_norm, mlp_out_norm = layer.norms
    x, h = ops.add_norm(x, delta, input_norm)
    a = ops.norm(attn_out_norm, ops.apply(layer.o_proj, attend(h)))
    if parallel:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
        return x, ops.mlp(layer, ops.norm(mlp_norm, x)) + a
    x, h = ops.add_norm(x, a, mlp_norm)
    return x, ops.norm(mlp_out_norm, ops.mlp(layer, h))


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return x if x is None else x.to(device)


def _on(device: torch.device, sharded: bool):
    """On a sharded model, make `device` current while a layer runs on it: Triton (the decode kernel) launches on the
    current CUDA device. (One device: nothing to switch, and nothing extra in a captured step.)"""
    return torch.cuda.device(device) if sharded and device.type == "cuda" else contextlib.nullcontext()


class CompressedLM:
    """A causal LM whose KV cache follows a `HeadMask`.

    Args:
        model: a `Lab` (its `hf_model` and tokenizer are used, never its hooks) or a transformers
            `*ForCausalLM` of a supported family (`headlab.runtime.weights.FAMILIES`).
        mask: the `HeadMask`; checked against the model. In a model's sliding-window layers every
            head streams with the layer's own window (`sink=0, recent=sliding_window`) whatever the mask says.
        tokenizer: needed only to generate from text when `model` is not a Lab.
        chunk_size: prefill chunk length (tokens).
        page_size: cache page length (tokens) of the eager path; memory grows one page at a time.
        attention: "eager" (paged cache, segmented eager attention) or "sdpa" (preallocated buffers,
            SDPA prefill, static decode step); default "sdpa" on CUDA, "eager" elsewhere.
        max_length: tokens the "sdpa" cache is allocated for (prompt + new tokens); None = the
            first call's length (`generate` adds `max_new_tokens`).
        cuda_graph: on CUDA with "sdpa", capture the decode step in a CUDA graph (not with a rotary
            embedding that adapts to the length seen, dynamic NTK or LongRoPE: it reads positions on the host;
            not on a model sharded over several devices: one graph is captured on one device's stream, while a
            sharded step hands the hidden state from device to device, so the step runs uncaptured there).
        fuse: on CUDA with "sdpa", run the decode step's norms, residual adds and activation as
            torch.compile'd fused kernels (`headlab.runtime.fused`); default True on CUDA.
        pack: with `fuse`, run each layer's q/k/v and gate/up projections as one matrix product each
            (`weights.pack_layer`: the model's weights are repacked in place, same values, no extra
            memory; a packed model can't be `save_pretrained` as is). Default: `fuse` on CUDA.
        compensate: RazorAttention's compensation token: each streaming head of the mask also attends to
            one token holding the mean of the keys and values it evicted (`cache` module; not in a model's
            own sliding-window layers).
    """

    ATTENTIONS = ("eager", "sdpa")

    def __init__(self, model, mask: HeadMask, *, tokenizer=None, chunk_size: int = 256, page_size: int = 256,
                 attention: str | None = None, max_length: int | None = None, cuda_graph: bool = True,
                 fuse: bool | None = None, pack: bool | None = None, compensate: bool = False) -> None:
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
        self.layout = layer_layout(mask, m.sliding_windows, bool(compensate))
        self.group = m.n_heads // m.n_kv_heads
        self.devices = placement.layer_devices(hf_model)  # [n_layers]: where each layer's weights and cache live
        if len(self.devices) != m.n_layers:
            raise ValueError(f"Found {len(self.devices)} decoder layers by class but {m.n_layers} by the family table.")
        self.sharded = len(set(self.devices)) > 1
        # The head indices on each layer's device, once (a host-to-device copy cannot be graph-captured).
        self.heads = [HeadGroups.of(full, self.group).to(device) for (full, _), device in zip(self.layout, self.devices)]
        self.eos_token_id = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        attention = attention or ("sdpa" if m.device.type == "cuda" else "eager")
        if attention not in self.ATTENTIONS:
            raise ValueError(f"attention must be one of {self.ATTENTIONS}, not {attention!r}.")
        self.attention, self.max_length = attention, max_length
        self.cuda_graph = bool(cuda_graph) and m.device.type == "cuda" and not m.rope_reads_length and not self.sharded
        self.fuse = (m.device.type == "cuda" if fuse is None else bool(fuse)) and attention == "sdpa"
        pack = (self.fuse and m.device.type == "cuda") if pack is None else bool(pack) and self.fuse
        for layer in m.layers:
            layer.packed = pack_layer(layer) if pack else None
        self.decode_ops = fused.FusedOps(m.family.norm_kind) if self.fuse else fused.ModuleOps()
        self.cache: CompressedCache | StaticCache | None = None
        self._graph = None  # (CUDAGraph, static tokens [batch, 1], static logits [batch, 1, vocab])
        self._reserved = False  # the cache came from `reserve`: `generate` reuses it when it fits

    # --- state -------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Tokens seen since the last `reset` (the position of the next token)."""
        return self.cache.length if self.cache is not None else 0

    def reset(self) -> None:
        """Drop the cache (its memory is freed) and any captured decode graph."""
        self.cache = None
        self._graph = None
        self._reserved = False

    def reserve(self, batch: int, max_length: int) -> None:
        """Allocate an empty "sdpa" cache for `batch` sequences of up to `max_length` tokens now, so that every later
        `generate` that fits reuses it, and its captured decode graph, instead of allocating and capturing anew (a
        quality evaluation generating hundreds of answers at 8k). `reset()` gives it back. On the "eager" path, whose
        cache grows by pages, there is nothing to reserve: a no-op."""
        if self.attention != "sdpa":
            return
        self.reset()
        self.cache, self._reserved = self.new_cache(batch, max_length), True

    def kv_bytes(self) -> int:
        """Bytes held by the cache's key and value tensors right now (and the compensation sums)."""
        return self.cache.nbytes() if self.cache is not None else 0

    def kv_bytes_by_device(self) -> dict[str, int]:
        """`kv_bytes` per device, `{"cuda:0": bytes, ...}`: each layer's cache counts on its layer's device."""
        per_layer = [layer.nbytes() for layer in self.cache.layers] if self.cache is not None else [0] * len(self.devices)
        return placement.by_device(self.devices, per_layer)

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
                outputs.append(self._logits(hidden))
            elif last:
                outputs.append(self._logits(hidden[:, -1:]))
        return torch.cat(outputs, dim=1)

    def new_cache(self, batch: int, max_length: int) -> CompressedCache | StaticCache:
        m = self.modules
        if self.attention == "sdpa":
            return StaticCache(self.layout, batch, m.d_head, max_length, m.dtype, m.device, layer_devices=self.devices)
        return CompressedCache(self.layout, self.group, batch, m.d_head, self.page_size, m.dtype, self.devices)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prefill `tokens` `[batch, pos]` from an empty cache; logits `[batch, pos, vocab]` at every position."""
        self.reset()
        return self.forward(tokens)

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, where, ops: fused.ModuleOps) -> torch.Tensor:
        """Every layer on the embedded `hidden` `[batch, t, d_model]` at `positions` `[t]` (on the device); returns the
        final-norm hidden state. `where`: the cache position (eager path), a `ChunkPlan` or the decode step's slots."""
        m = self.modules
        tables = {hidden.device: m.rotary_tables(hidden, positions)}
        x, delta = hidden, None
        for index, layer in enumerate(m.layers):
            device = self.devices[index]
            x, delta = _to(x, device), _to(delta, device)  # a no-op unless the model is sharded
            if device not in tables:
                tables[device] = {kind: (cos.to(device), sin.to(device)) for kind, (cos, sin) in tables[hidden.device].items()}
            cos, sin = tables[device][layer.layer_type]

            def attend(h: torch.Tensor) -> torch.Tensor:
                return self._attend(index, layer, h, cos, sin, where, ops)

            with _on(device, self.sharded):
                x, delta = layer_forward(layer, x, delta, attend, ops, m.parallel_residual)
        device = placement.module_device(m.final_norm)
        return ops.add_norm(_to(x, device), _to(delta, device), m.final_norm)[1]

    def _logits(self, hidden: torch.Tensor, ops: fused.ModuleOps = fused.ModuleOps()) -> torch.Tensor:
        """The final-normed hidden state -> logits `[batch, t, vocab]`, on the lm_head's device."""
        return self.modules.logits(hidden.to(self.modules.lm_head.weight.device), ops)

    def _chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed and run one chunk `[batch, t]` through every layer, updating the cache; returns the
        final-norm hidden state `[batch, t, d_model]`."""
        m, cache = self.modules, self.cache
        start = cache.length
        positions = torch.arange(start, start + tokens.shape[1], device=m.device)
        if isinstance(cache, StaticCache):
            plan = cache.plan(start, tokens.shape[1])
            hidden = self._layers(m.embed(tokens), positions, plan, fused.ModuleOps())
            cache.finish_chunk(plan)
            return hidden
        hidden = self._layers(m.embed(tokens), positions, start, fused.ModuleOps())
        cache.length += tokens.shape[1]
        return hidden

    def _attend(self, index: int, layer: LayerModules, h: torch.Tensor, cos, sin, where, ops) -> torch.Tensor:
        """`h` `[batch, t, d_model]` -> the attention heads' output `[batch, t, n_heads * d_head]` (before `o_proj`)."""
        q, k, v = layer.project(h, ops)
        batch, n_heads, t, d = q.shape
        cache = self.cache
        if isinstance(cache, StaticCache) and not isinstance(where, ChunkPlan):
            # decode: every KV head at once, the group's query heads as the rows of their KV head; RoPE inside
            out = cache.decode(cache.layers[index], q.reshape(batch, -1, self.group, d), k[:, :, 0], v[:, :, 0],
                               layer.scaling, layer.softcap or 0.0, rotary=(cos, sin)).view(batch, n_heads, 1, d)
            return out.transpose(1, 2).reshape(batch, t, n_heads * d)
        q, k = ops.rotary(q, k, cos, sin)
        if isinstance(cache, CompressedCache):
            out = cached_attention(cache.layers[index], q, k, v, where, layer.scaling, layer.softcap)
        else:
            out = self._prefill_attention(index, layer, q, k, v, where)
        return out.transpose(1, 2).reshape(batch, t, n_heads * d)

    def _prefill_attention(self, index: int, layer: LayerModules, q, k, v, plan: ChunkPlan) -> torch.Tensor:
        """The "sdpa" path's prefill: `q` `[batch, n_heads, t, d]`, `k`/`v` `[batch, n_kv, t, d]` -> like `q`, per kind."""
        heads, cache = self.heads[index], self.cache
        lc = cache.layers[index]
        softcap = layer.softcap or 0.0
        out = None
        for n, kv_idx, q_idx, attend in ((lc.n_full, heads.full_kv, heads.full_q, cache.prefill_full),
                                         (lc.n_stream, heads.stream_kv, heads.stream_q, cache.prefill_stream)):
            if n == layer.n_kv_heads:  # the whole layer is of this kind: no gather
                return attend(lc, q, k, v, plan, layer.scaling, softcap)
            if n:
                part = attend(lc, q.index_select(1, q_idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx), plan,
                              layer.scaling, softcap)
                out = torch.empty_like(q) if out is None else out
                out.index_copy_(1, q_idx, part)
        return out

    # --- the "sdpa" path's decode step ------------------------------------------------------------

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token `[batch, 1]` at the device position `cache.pos`: static shapes, no host sync; logits `[batch, 1, vocab]`."""
        m, cache = self.modules, self.cache
        slots = cache.begin_step()
        normed = self._layers(m.embed(tokens), cache.pos, slots, self.decode_ops)
        cache.end_step()
        return self._logits(normed, self.decode_ops)

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
        """Warm the step up on a side stream (rewound: the warm-up steps leave the cache as it was), then capture it.

        Capturing records the step without running it, so `_decode`'s first replay is the first real step."""
        cache = self.cache
        static_tokens = tokens.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                with cache.rewound():
                    self._step(static_tokens)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = self._step(static_tokens)
        return graph, static_tokens, static_logits

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
        """Greedy decoding from an empty cache (a `reserve`d cache that fits is emptied in place and reused).

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
        needed = self.max_length or tokens.shape[1] + max_new_tokens
        if self._reserved and self.cache.batch == tokens.shape[0] and self.cache.max_length >= needed:
            self.cache.restart()  # the reserved cache is emptied in place: its decode graph stays valid
        else:
            self.reset()
            if self.attention == "sdpa":
                self.cache = self.new_cache(tokens.shape[0], needed)
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
