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

A model sharded over the GPUs of one host (`random_llama(..., device_map=...)`, e.g. the Llama-3.1-70B shape over
two H200s): `decode_row` holds each layer's cache on its layer's GPU, reports `kv_bytes_by_device`, and times the
uncaptured step with `perf_counter` after synchronising every GPU (CUDA events on one device would miss the others'
work). Its HBM floors (`hbm_floors`): the bytes a step reads (weights + KV held) over the GPUs' summed bandwidth, a
bound only pipelined or tensor-parallel execution could approach, and the sequential floor, each GPU's bytes over
its own bandwidth summed, since the layers run one after another.
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

from headlab import placement, validate
from headlab.lab import free_bytes
from headlab.masks import MIB, HeadMask
from headlab.runtime.model import CompressedLM
from headlab.runtime.weights import model_modules

DEFAULT_KINDS = ("hf_full", "compressed")
GRAPH_WARMUP_STEPS = 2  # hf_static: decode steps run before its CUDA graph is captured


LLAMA_31 = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, head_dim=128,
                num_key_value_heads=8, tie_word_embeddings=False, attn_implementation="sdpa")
SHAPES = {  # Llama 3.1 shapes (plain RoPE at theta 500000); "tiny": a few MB, for dry runs on the CPU
    "llama-3.1-8b": dict(LLAMA_31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "llama-3.1-70b": dict(LLAMA_31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "tiny": dict(LLAMA_31, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32),
}


def llama_config(shape: str = "llama-3.1-8b", **overrides):
    """A `LlamaConfig` of one of `SHAPES` (no weights)."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}.")
    return LlamaConfig(**dict(SHAPES[shape], **overrides))


def llama_8b_config(**overrides):
    """A `LlamaConfig` of the Llama-3.1-8B shape (plain RoPE at theta 500000; no weights)."""
    return llama_config("llama-3.1-8b", **overrides)


def random_llama(config=None, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0, device_map=None):
    """A `LlamaForCausalLM` with random weights built directly on `device` in `dtype` (eval mode); with `device_map`
    (`{module name: device}`, e.g. `placement.balanced_device_map`) each weight is drawn on its module's device and the
    model is dispatched with accelerate, so a model larger than one GPU never exists whole on one device."""
    from transformers import LlamaForCausalLM

    config = config or llama_8b_config()
    torch.manual_seed(seed)
    if device_map is not None:
        return _random_sharded(config, device_map, dtype, seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def _random_sharded(config, device_map: dict, dtype: torch.dtype, seed: int):
    """`random_llama` over `device_map`: built on the meta device (accelerate's `init_empty_weights`; buffers such as
    the rotary frequencies stay real), each weight drawn on its device as Llama's own init does (norms 1, the rest
    normal with `initializer_range`), then `dispatch_model` moves the buffers and adds accelerate's hooks."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaForCausalLM
    from transformers.integrations.accelerate import expand_device_map

    with init_empty_weights():
        model = LlamaForCausalLM(config)
    names = [name for name, _ in model.named_parameters()]
    where = expand_device_map(device_map, names)
    generators: dict[str, torch.Generator] = {}
    for name, param in model.named_parameters():
        device = torch.device(f"cuda:{where[name]}" if isinstance(where[name], int) else where[name])
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if "norm" in name:
            value.fill_(1.0)
        else:
            generator = generators.setdefault(str(device), torch.Generator(device=device).manual_seed(seed))
            value.normal_(0.0, config.initializer_range, generator=generator)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)  # else cast to the meta dtype
    return dispatch_model(model, device_map=device_map, force_hooks=True).eval()


def weight_bytes_by_device(hf_model) -> dict[str, int]:
    """Parameter bytes per device `{"cuda:0": bytes, ...}` (a tied weight once)."""
    params = list(hf_model.parameters())
    return placement.by_device([p.device for p in params], [p.numel() * p.element_size() for p in params])


def hbm_floors(bytes_by_device: dict[str, int], bandwidth_by_device: dict[str, float]) -> tuple[float, float]:
    """`(together_ms, sequential_ms)`: a decode step's HBM floor when each device reads `bytes_by_device` (weights + KV
    it holds) at its `bandwidth_by_device` (bytes/s): all bytes over the summed bandwidth (the GPUs reading at once),
    and each device's bytes over its own bandwidth, summed (the layers run one after another, as here)."""
    together = sum(bytes_by_device.values()) / sum(bandwidth_by_device[d] for d in bytes_by_device)
    sequential = sum(nbytes / bandwidth_by_device[d] for d, nbytes in bytes_by_device.items())
    return together * 1e3, sequential * 1e3


def info_of(model) -> SimpleNamespace:
    """`ModelInfo`-like shape of a Lab or a Llama-style HF model (what `HeadMask.random` needs)."""
    if hasattr(model, "info"):
        return model.info
    m = model_modules(model)
    return SimpleNamespace(name=m.name, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, d_head=m.d_head)


def weight_bytes(hf_model) -> int:
    return sum(p.numel() * p.element_size() for p in hf_model.parameters())


def copy_bandwidth(nbytes: int = 4 << 30, repeats: int = 10, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth of one GPU in bytes/s (bytes read + bytes written), median of `repeats`."""
    with torch.cuda.device(torch.device(device)):
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
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
    hf_model = _hf(model)
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


# --- budgets: decode against the HBM floor at every budget, context and batch (CUDA) -------------------------------

FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # shares of KV heads kept full; 1.0 = the whole cache through the same kernels
BATCHES = (1, 4, 16)


def _hf(model):
    """The transformers model of a Lab, or `model` itself."""
    return model.hf_model if hasattr(model, "hf_model") and hasattr(model, "info") else model


def budget_mask(model, full_fraction: float, sink: int = 64, recent: int = 256, seed: int = 0) -> HeadMask:
    """`full_fraction` of the KV heads full, drawn at random (seeded), or `HeadMask.all_full` at 1.0."""
    info = info_of(model)
    if full_fraction >= 1.0:
        return HeadMask.all_full(info, sink=sink, recent=recent)
    return HeadMask.random(info, full_fraction, seed=seed, sink=sink, recent=recent)


def synthetic_prefill(rt: CompressedLM, batch: int, context: int, seed: int = 0) -> None:
    """Give `rt` a "sdpa" cache of `batch` sequences holding `context` positions as a prefill of `context` tokens leaves
    it (full heads: slots `[0, context)`; each ring: the sink and the last `recent` positions), with random unit-normal
    keys and values instead of the model's, and without running the prefill. A decode step reads the same bytes and
    runs the same kernels whatever the values, so its time is the real one; a 16 x 128k prefill would take minutes."""
    cache = rt.new_cache(batch, rt.max_length or context + 1)
    cache.check_room(context)
    generators: dict[torch.device, torch.Generator] = {}  # one per device (a sharded model's layers)
    for layer in cache.layers:
        for buffer in (layer.full_kv, layer.stream_kv):
            if buffer.numel():
                if buffer.device not in generators:
                    generators[buffer.device] = torch.Generator(device=buffer.device).manual_seed(seed)
                buffer.normal_(generator=generators[buffer.device])
    cache.hold(context)
    rt.reset()
    rt.cache = cache


def _fits(nbytes_by_device: dict[str, int], margin: int = 1 << 30) -> bool:
    return all(nbytes + margin <= free_bytes(device) for device, nbytes in nbytes_by_device.items())


def _synced(devices: list[torch.device], out):
    """`out`, once every CUDA device in `devices` has finished its work."""
    for device in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(device)
    return out


def decode_row(model, mask: HeadMask, context: int, batch: int, *, steps: int = 32, warmup: int = 4, seed: int = 0) -> dict:
    """One row of the budget table: the decode step (CUDA graph on one GPU) of `batch` sequences at `context` tokens
    after a `synthetic_prefill`; `decode_ms` is the median of `steps` timings after `warmup` (capture included): CUDA
    events on one GPU, `perf_counter` around a synchronised step on a sharded model. `kv_bytes_by_device` and
    `ideal_kv_bytes_by_device` say what each device holds and must hold."""
    hf_model = _hf(model)
    m = model_modules(hf_model)
    max_length = context + warmup + steps + 1
    dtype_bytes, devices = m.embed.weight.element_size(), placement.layer_devices(hf_model)
    row = dict(context=context, full_fraction=mask.full_fraction, batch=batch,
               ideal_kv_bytes=mask.ideal_kv_bytes(max_length, dtype_bytes, m.d_head, batch),
               ideal_kv_bytes_by_device=placement.ideal_kv_bytes_by_device(mask, devices, max_length, dtype_bytes, m.d_head, batch))
    if not _fits(row["ideal_kv_bytes_by_device"]):
        return dict(row, oom=True)
    rt = CompressedLM(model, mask, max_length=max_length, attention="sdpa")
    try:
        synthetic_prefill(rt, batch, context, seed)
        token = torch.randint(0, m.embed.weight.shape[0], (batch, 1), generator=torch.Generator().manual_seed(seed)).to(m.device)
        timer = _Timer(torch.device("cpu") if rt.sharded else m.device)
        for _ in range(warmup + steps):  # the step's time does not depend on the token fed
            timer.step(lambda: _synced(rt.devices, rt.forward(token)) if rt.sharded else rt.forward(token))
        row.update(decode_ms=timer.median(skip=warmup), kv_bytes=rt.kv_bytes(), kv_bytes_by_device=rt.kv_bytes_by_device(),
                   oom=False)
    except torch.OutOfMemoryError:
        row["oom"] = True
    finally:
        rt.reset()
        del rt
        torch.cuda.empty_cache()
    return row


def budget_sweep(model, contexts, fractions=FRACTIONS, batches=BATCHES, *, steps: int = 32, warmup: int = 4,
                 sink: int = 64, recent: int = 256, seed: int = 0, log: Callable[[dict], None] | None = None) -> list[dict]:
    """`decode_row` for every context, budget and batch size (rows the GPU cannot hold come back with `oom`)."""
    rows = []
    for context in contexts:
        for fraction in fractions:
            mask = budget_mask(model, fraction, sink, recent, seed)
            for batch in batches:
                rows.append(decode_row(model, mask, int(context), int(batch), steps=steps, warmup=warmup, seed=seed))
                if log is not None:
                    log(rows[-1])
    return rows


# --- where a decode step's time goes (torch.profiler) and the longest context that fits (CUDA) ----------------------

KERNEL_KINDS = (("attention: Triton split-KV partials", ("_partial_kernel",)), ("attention: combine", ("_combine_kernel",)),
                ("matrix products (Triton gemv_kernel)", ("_gemv_kernel",)),
                ("fused elementwise (torch.compile)", ("triton_",)),
                ("matrix products (cuBLAS)", ("gemv", "gemm", "nvjet", "cutlass", "sm90", "sm80", "cublas", "splitk")))


def kernel_kind(name: str) -> str:
    """The row of `profile_step`'s summary a kernel `name` counts in (the first kind whose pattern it contains)."""
    lowered = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(p.lower() in lowered for p in patterns):
            return kind
    return "other (copies, indexing, sampling)"


def profile_step(model, mask: HeadMask, context: int, batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """GPU time of one decode step by kernel kind: torch.profiler over `steps` uncaptured steps after a
    `synthetic_prefill` (the CUDA graph replays the same kernels; the graph's step time minus `kernel_ms` is the
    time between kernels). `by_kind`: per step, milliseconds and kernel launches; `top`: the 12 costliest kernels."""
    m = model_modules(_hf(model))
    rt = CompressedLM(model, mask, max_length=context + steps + 8, attention="sdpa", cuda_graph=False)
    synthetic_prefill(rt, batch, context, seed)
    token = torch.randint(0, m.embed.weight.shape[0], (batch, 1), generator=torch.Generator().manual_seed(seed)).to(m.device)
    for _ in range(3):  # compile and warm up
        rt.forward(token)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            rt.forward(token)
        torch.cuda.synchronize()
    rt.reset()
    del rt
    torch.cuda.empty_cache()
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            kernels.append((event.key, us / 1e3 / steps, event.count / steps))
    by_kind: dict[str, dict] = {}
    for name, ms, count in kernels:
        entry = by_kind.setdefault(kernel_kind(name), {"ms": 0.0, "launches": 0.0})
        entry["ms"] += ms
        entry["launches"] += count
    top = sorted(kernels, key=lambda k: -k[1])[:12]
    return {"context": context, "full_fraction": mask.full_fraction, "batch": batch, "steps": steps,
            "kernel_ms": sum(k[1] for k in kernels), "launches": sum(k[2] for k in kernels), "by_kind": by_kind,
            "top": [{"kernel": name[:90], "ms": ms, "launches": count} for name, ms, count in top]}


def prefill_and_decode_fit(model, mask: HeadMask, context: int, chunk_size: int = 4096, seed: int = 0) -> dict:
    """Whether a cache of `context` tokens, its last prefill chunk and a (captured) decode step fit on the GPU.

    The cache is allocated for `context + 1` tokens and holds `context - chunk_size` (`synthetic_prefill`); the last
    chunk then runs for real, attending to every position before it (flash attention: its memory does not grow with
    the context), then one decode step. Every earlier chunk needs no more memory than the last, so this is the
    prefill's peak without the hours a multi-million-token prefill takes. Returns `fits` and `peak_bytes`."""
    m = model_modules(_hf(model))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    rt = CompressedLM(model, mask, chunk_size=chunk_size, max_length=context + 1, attention="sdpa")
    vocab = m.embed.weight.shape[0]
    try:
        synthetic_prefill(rt, 1, context - chunk_size, seed)
        rt.forward(torch.randint(0, vocab, (1, chunk_size), device=m.device), all_logits=False)
        rt.forward(torch.randint(0, vocab, (1, 1), device=m.device))
        torch.cuda.synchronize()
        return {"context": context, "fits": True, "peak_bytes": torch.cuda.max_memory_allocated()}
    except torch.OutOfMemoryError:
        return {"context": context, "fits": False, "peak_bytes": None}
    finally:
        rt.reset()
        del rt
        torch.cuda.empty_cache()


def longest_context(model, mask: HeadMask, *, start: int = 131072, resolution: int = 16384, chunk_size: int = 4096,
                    log: Callable[[dict], None] | None = None) -> dict:
    """The longest context (a multiple of `resolution`) that `prefill_and_decode_fit`: doubling from `start` until a
    context does not fit, then bisection. Returns `longest`, `first_failure` and every probe."""
    probes = []

    def fits(context: int) -> bool:
        probes.append(prefill_and_decode_fit(model, mask, context, chunk_size))
        if log is not None:
            log(probes[-1])
        return probes[-1]["fits"]

    low, high = 0, start
    while fits(high):
        low, high = high, 2 * high
    while high - low > resolution:
        middle = (low + high) // 2 // resolution * resolution
        low, high = (middle, high) if fits(middle) else (low, middle)
    return {"full_fraction": mask.full_fraction, "longest": low, "first_failure": high, "chunk_size": chunk_size,
            "probes": probes}
