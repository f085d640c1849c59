"""Live measures of the compressed-KV runtime against Hugging Face's caches and kvpress.

    from headlab import runtime
    from headlab.runtime.benchmark import measure, random_llama, llama_8b_config
    model = random_llama(llama_8b_config())            # random bf16 weights on the GPU
    mask = HeadMask.random(info_of(model), 0.5, sink=64, recent=256)
    measure(model, mask, contexts=[8192, 32768], new_tokens=32)   # pandas table

One row per context and cache kind:
- `hf_full`: transformers' `DynamicCache`, a plain `model(...)` decode loop;
- `hf_static`: transformers' `StaticCache` preallocated for the whole length, prefill in chunks,
  and on CUDA the decode step (mask update, forward, greedy pick, position advance) captured in
  one CUDA graph: the fair fast full-cache baseline;
- `kvpress_duo`: NVIDIA kvpress' `DuoAttentionPress` given this mask's streaming heads, sink and
  recent window (kvpress needs transformers<5.3: run it in its own environment). It simulates
  the mask: the cache keeps every token and masked keys are swapped for a fake key at attention;
- `compressed`: headlab's `CompressedLM`.
Columns: `kv_bytes` (held by the cache tensors after prefill + decode), `ideal_kv_bytes` (what
the mask must keep, for every kind, `HeadMask.ideal_kv_bytes`), `full_kv_bytes` (a full cache),
`kv_ratio` (held / ideal), `peak_bytes` (CUDA `max_memory_allocated` during prefill; on the CPU
the cache bytes), `peak_above_weights`, `prefill_s`, `decode_ms` (per token: on CUDA the median
of CUDA-event timings after warm-up, on the CPU `perf_counter`), `oom` (the prefill or decode ran
out of memory; the other columns are then NaN).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pandas as pd
import torch

from headlab import validate
from headlab.masks import MIB, HeadMask
from headlab.runtime.model import CompressedLM
from headlab.runtime.weights import model_modules

DEFAULT_KINDS = ("hf_full", "compressed")
GRAPH_WARMUP_STEPS = 2  # hf_static: decode steps run before its CUDA graph is captured


def llama_8b_config(**overrides):
    """A `LlamaConfig` of the Llama-3.1-8B shape (plain RoPE at theta 500000; no weights)."""
    from transformers import LlamaConfig

    params = dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    params.update(overrides)
    return LlamaConfig(**params)


def random_llama(config=None, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A `LlamaForCausalLM` with random weights built directly on `device` in `dtype` (eval mode)."""
    from transformers import LlamaForCausalLM

    config = config or llama_8b_config()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def info_of(model) -> SimpleNamespace:
    """`ModelInfo`-like shape of a Lab or a Llama-style HF model (what `HeadMask.random` needs)."""
    if hasattr(model, "info"):
        return model.info
    m = model_modules(model)
    return SimpleNamespace(name=m.name, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, d_head=m.d_head)


def weight_bytes(hf_model) -> int:
    return sum(p.numel() * p.element_size() for p in hf_model.parameters())


def copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of `repeats`."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


class _Timer:
    """Per-step times in ms: CUDA events on CUDA (read at the end, no sync per step), else perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events, self.times = [], []

    def step(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            out = fn()
            self.times.append((time.perf_counter() - t0) * 1e3)
        return out

    def median(self, skip: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            self.times = [s.elapsed_time(e) for s, e in self.events]
        kept = self.times[skip:]
        return statistics.median(kept) if kept else math.nan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _hf_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.untyped_storage().nbytes()
    return total


@dataclass
class _Run:
    """A prefilled cache of one kind: the next token, a decode step (token -> next token) and its bytes."""

    token: torch.Tensor  # [1, 1]
    step: Callable[[torch.Tensor], torch.Tensor]
    kv_bytes: Callable[[], int]


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


def _dynamic_run(hf_model, cache, prefill) -> _Run:
    """A prefilled `DynamicCache`, decoded the plain way: `model(token)` per step."""
    step = lambda token: _greedy(hf_model(token, past_key_values=cache, use_cache=True).logits)  # noqa: E731
    return _Run(_greedy(prefill.logits), step, lambda: _hf_cache_bytes(cache))


def _run_hf_full(hf_model, tokens: torch.Tensor, mask: HeadMask, *, max_length: int, chunk_size: int,
                 cuda_graph: bool, attention: str, model=None) -> _Run:
    """Prefill in one piece with a `DynamicCache` (last logits only), then `model(token)` per step."""
    from transformers import DynamicCache

    cache = DynamicCache()
    return _dynamic_run(hf_model, cache, hf_model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1))


def _run_hf_static(hf_model, tokens: torch.Tensor, mask: HeadMask, *, max_length: int, chunk_size: int,
                   cuda_graph: bool, attention: str, model=None) -> _Run:
    """transformers' `StaticCache` for `max_length` tokens; decode in a CUDA graph on CUDA.

    Prefill runs in chunks of `chunk_size`: a static cache's attention mask spans all `max_length`
    keys, so one 128k piece would build a 128k x 128k mask. Decode passes its own 4-D mask buffer
    `[1, 1, 1, max_length]` (True up to the current position), so transformers builds no mask and
    the step has no host synchronisation; the captured graph updates the mask, runs the model,
    picks the next token and advances the position on the device.
    """
    from transformers import StaticCache as HFStaticCache

    device, n = tokens.device, tokens.shape[1]
    max_length += GRAPH_WARMUP_STEPS
    cache = HFStaticCache(config=hf_model.config, max_cache_len=max_length)
    for start in range(0, n, chunk_size):
        piece = tokens[:, start:start + chunk_size]
        positions = torch.arange(start, start + piece.shape[1], device=device)[None]
        out = hf_model(piece, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    token_in = _greedy(out.logits).clone()
    position = torch.full((1, 1), n, dtype=torch.long, device=device)
    visible = torch.zeros(1, 1, 1, max_length, dtype=torch.bool, device=device)
    visible[..., :n] = True
    token_out = torch.empty_like(token_in)

    def decode() -> None:
        visible.index_fill_(-1, position[0], True)
        logits = hf_model(token_in, past_key_values=cache, position_ids=position, attention_mask=visible,
                          use_cache=True).logits
        token_out.copy_(_greedy(logits))
        position.add_(1)

    run = decode
    if cuda_graph and device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # real steps before capture, as CUDA graph capture asks
            for _ in range(GRAPH_WARMUP_STEPS):
                decode()
                token_in.copy_(token_out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode()
        run = graph.replay

    def step(token: torch.Tensor) -> torch.Tensor:
        token_in.copy_(token)
        run()
        return token_out

    return _Run(token_in, step, lambda: _hf_cache_bytes(cache))


def duo_attention_press(mask: HeadMask):
    """kvpress' `DuoAttentionPress` with `mask`'s streaming KV heads, sink and recent window.

    Its own `post_init_from_model` downloads DuoAttention's patterns for a few checkpoints; here
    the mask takes their place (kvpress then masks the same heads and windows headlab streams).
    """
    try:
        from kvpress import DuoAttentionPress
    except ImportError as error:
        raise ImportError(f"kvpress is not installed ({error}); it needs transformers<5.3, so install it in an "
                          "environment of its own: pip install kvpress 'transformers<5.3'.") from None

    class MaskDuoAttentionPress(DuoAttentionPress):
        def post_init_from_model(self, model) -> None:
            self.sink_size, self.recent_size = mask.sink, mask.recent
            self.streaming_mask = (~mask.full).to(model.device)  # [n_layers, n_kv_heads]

    return MaskDuoAttentionPress(head_compression_ratio=1.0 - mask.full_fraction)


def _run_kvpress_duo(hf_model, tokens: torch.Tensor, mask: HeadMask, *, max_length: int, chunk_size: int,
                     cuda_graph: bool, attention: str, model=None) -> _Run:
    """kvpress' way: prefill with a `DynamicCache` inside the press, decode with `model(token)` per step."""
    from transformers import DynamicCache

    press, cache = duo_attention_press(mask), DynamicCache()
    with press(hf_model):
        return _dynamic_run(hf_model, cache, hf_model(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1))


def _run_compressed(hf_model, tokens: torch.Tensor, mask: HeadMask, *, max_length: int, chunk_size: int,
                    cuda_graph: bool, attention: str, model=None) -> _Run:
    rt = CompressedLM(model, mask, chunk_size=chunk_size, max_length=max_length, attention=attention, cuda_graph=cuda_graph)
    token = _greedy(rt.forward(tokens, all_logits=False))
    return _Run(token, lambda token: _greedy(rt.forward(token)), rt.kv_bytes)


RUNNERS = {"hf_full": _run_hf_full, "hf_static": _run_hf_static, "kvpress_duo": _run_kvpress_duo,
           "compressed": _run_compressed}
KINDS = tuple(RUNNERS)


def measure_one(model, mask: HeadMask, kind: str, context: int, *, new_tokens: int = 32, warmup: int = 4,
                chunk_size: int = 4096, seed: int = 0, cuda_graph: bool = True, attention: str = "sdpa") -> dict:
    """One row: prefill `context` random tokens with cache `kind`, then `warmup + new_tokens` greedy steps."""
    hf_model = model.hf_model if hasattr(model, "hf_model") and hasattr(model, "info") else model
    m = model_modules(hf_model)
    device = m.device
    vocab = m.embed.weight.shape[0]
    tokens = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(seed)).to(device)
    dtype_bytes = m.embed.weight.element_size()
    row = dict(context=context, cache=kind, new_tokens=new_tokens,
               ideal_kv_bytes=mask.ideal_kv_bytes(context + warmup + new_tokens, dtype_bytes, m.d_head),
               full_kv_bytes=HeadMask.all_full(info_of(hf_model)).ideal_kv_bytes(context + warmup + new_tokens, dtype_bytes, m.d_head))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if kind not in RUNNERS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    timer = _Timer(device)
    run = None
    try:
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            run = RUNNERS[kind](hf_model, tokens, mask, max_length=context + warmup + new_tokens, chunk_size=chunk_size,
                                cuda_graph=cuda_graph, attention=attention, model=model)
            _sync(device)
            row["prefill_s"] = time.perf_counter() - t0  # hf_static: its graph warm-up steps and capture included
            if cuda:
                row["peak_bytes"] = torch.cuda.max_memory_allocated()
                row["peak_above_weights"] = row["peak_bytes"] - base
            token = run.token
            for _ in range(warmup + new_tokens):
                token = timer.step(lambda: run.step(token))
            row["decode_ms"] = timer.median(skip=warmup)
            row["kv_bytes"] = run.kv_bytes()
            if not cuda:
                row["peak_bytes"] = row["peak_above_weights"] = row["kv_bytes"]
            row["oom"] = False
    except torch.OutOfMemoryError:
        row.update(oom=True)
    finally:
        del run
        if cuda:
            torch.cuda.empty_cache()
    row["kv_ratio"] = row.get("kv_bytes", math.nan) / row["ideal_kv_bytes"]
    return row


def measure(model, mask: HeadMask, contexts=(1024, 2048), new_tokens: int = 32, *, kinds=DEFAULT_KINDS, warmup: int = 4,
            chunk_size: int = 4096, seed: int = 0, cuda_graph: bool = True, attention: str = "sdpa") -> pd.DataFrame:
    """The table: one row per context and cache kind (see the module's docstring for the columns);
    `attention` is the `CompressedLM` path of the `compressed` rows. A `Lab`'s contexts are checked against its limit first."""
    if hasattr(model, "info"):
        contexts = validate.contexts(contexts, model.info, "contexts", extra_tokens=new_tokens + warmup)
    rows = [measure_one(model, mask, kind, int(context), new_tokens=new_tokens, warmup=warmup, chunk_size=chunk_size,
                        seed=seed, cuda_graph=cuda_graph, attention=attention)
            for context in contexts for kind in kinds]
    columns = ["context", "cache", "kv_bytes", "ideal_kv_bytes", "full_kv_bytes", "kv_ratio", "peak_bytes",
               "peak_above_weights", "prefill_s", "decode_ms", "new_tokens", "oom"]
    return pd.DataFrame(rows).reindex(columns=columns)


def readable(table: pd.DataFrame) -> pd.DataFrame:
    """`measure`'s table for reading: KV in MiB, the held/ideal ratio, prefill seconds and decode ms per token."""
    return pd.DataFrame({
        "context": table["context"], "cache": table["cache"],
        "KV MiB held": (table["kv_bytes"] / MIB).round(2), "KV MiB ideal": (table["ideal_kv_bytes"] / MIB).round(2),
        "held / ideal": table["kv_ratio"].round(3), "prefill s": table["prefill_s"].round(2),
        "decode ms/token": table["decode_ms"].round(1),
    })
