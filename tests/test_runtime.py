"""The compressed-KV runtime is exact: all-full = the plain model; streaming heads = the
streaming-window ablation reference (TransformerLens hooks), through chunked prefill, ring-buffer
wrap-around and greedy decode; the cache holds what the mask says, not more, and `reset()` gives it back."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import weakref

import pytest
import torch

from headlab.ablation import ablation_hooks
from headlab.masks import HeadMask
from headlab.runtime import CompressedLM

SINK, RECENT, CHUNK, PAGE = 4, 32, 48, 16  # 200 tokens: 5 chunks, the ring wraps ~5 times
N_TOKENS = 200
TEXT = (
    "The old lighthouse stood on a rock two miles from the harbour. Its keeper, a retired sailor "
    "named Tomas, climbed the ninety-one steps every evening to light the lamp, and wrote the "
    "weather, the ships he saw and the price of fish in a green notebook. In the winter of 1887 a "
    "storm broke the lens; the town council argued for three months about who should pay for a new "
    "one, while Tomas kept a ring of oil lamps burning behind the broken glass. When the new lens "
    "finally arrived from Paris, packed in straw inside a crate marked FRAGILE in four languages, "
    "the whole town came down to the quay to watch it being rowed out. Years later his granddaughter "
    "found the notebook in a drawer and counted the ships: four thousand two hundred and six, each "
    "with a name, a flag and a line about the sea. The passkey for the archive is 73914; the key "
    "itself hangs on a hook behind the door of the lamp room, where Tomas left it in 1902."
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokens(lab) -> torch.Tensor:
    toks = lab.to_tokens(TEXT)
    assert toks.shape[1] >= N_TOKENS
    return toks[:, :N_TOKENS]


@pytest.fixture(scope="module")
def plain_logits(lab, tokens) -> torch.Tensor:
    with torch.no_grad():
        return lab.hf_model(tokens).logits


def reference_logits(lab, mask: HeadMask, tokens: torch.Tensor) -> torch.Tensor:
    """The streaming-window ablation of every query head whose KV head streams, through TransformerLens hooks."""
    hooks = ablation_hooks(lab, mask.streaming_query_heads(), "streaming_window", None, sink=mask.sink, recent=mask.recent)
    with torch.no_grad(), lab.model.hooks(fwd_hooks=hooks):
        return lab.model(tokens)


def cache_tensors(obj) -> list[torch.Tensor]:
    """Every tensor a runtime cache owns: its attributes, walked through lists and its own (headlab.runtime) objects."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in cache_tensors(item)]
    if type(obj).__module__.startswith("headlab.runtime"):
        return [t for value in vars(obj).values() for t in cache_tensors(value)]
    return []


def reset_frees_the_cache(rt: CompressedLM) -> None:
    """`rt.reset()` drops every cache tensor: weak references to all of them die (nothing else keeps the memory)."""
    refs = [weakref.ref(t) for t in cache_tensors(rt.cache)]
    assert len(refs) >= 2 * rt.mask.n_layers  # keys and values of every layer at least
    rt.reset()
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert alive == 0, f"{alive} of {len(refs)} cache tensors outlive reset()"
    assert rt.length == 0


def mixed_mask(lab) -> HeadMask:
    mask = HeadMask.random(lab.info, 0.5, seed=3, sink=SINK, recent=RECENT)
    per_layer = mask.full.sum(1)
    assert ((per_layer > 0) & (per_layer < lab.info.n_kv_heads)).any()  # some layers really are split
    return mask


@pytest.fixture(scope="module")
def references(lab, tokens):
    """Reference logits of the mixed and all-streaming masks, computed once."""
    return {which: reference_logits(lab, mask, tokens)
            for which, mask in (("mixed", mixed_mask(lab)), ("all_streaming", HeadMask.all_streaming(lab.info, sink=SINK, recent=RECENT)))}


def test_all_full_mask_gives_the_plain_models_logits(lab, tokens, plain_logits):
    rt = CompressedLM(lab, HeadMask.all_full(lab.info, sink=SINK, recent=RECENT), chunk_size=CHUNK, page_size=PAGE)
    logits = rt.logits(tokens)
    assert logits.shape == plain_logits.shape
    torch.testing.assert_close(logits, plain_logits, atol=2e-4, rtol=0)


@pytest.mark.parametrize("which", ["all_streaming", "mixed"])
def test_streaming_heads_match_the_streaming_window_reference(lab, tokens, plain_logits, references, which):
    mask = HeadMask.all_streaming(lab.info, sink=SINK, recent=RECENT) if which == "all_streaming" else mixed_mask(lab)
    expected = references[which]
    # The reference is far from the plain model, so agreeing with it is not an accident.
    assert (expected - plain_logits).abs().max() > 1.0
    rt = CompressedLM(lab, mask, chunk_size=CHUNK, page_size=PAGE)
    torch.testing.assert_close(rt.logits(tokens), expected, atol=2e-4, rtol=0)


def test_greedy_decode_after_prefill_matches_the_reference(lab, tokens):
    mask, prompt_len, steps = mixed_mask(lab), 150, 6
    rt = CompressedLM(lab, mask, chunk_size=CHUNK, page_size=PAGE)
    step_logits = [rt.logits(tokens[:, :prompt_len])[:, -1]]
    new = []
    for _ in range(steps):
        new.append(step_logits[-1].argmax(-1))
        if len(new) < steps:
            step_logits.append(rt.forward(new[-1][:, None])[:, -1])  # one token, into the cache
    new = torch.stack(new, dim=1)
    assert rt.length == prompt_len + steps - 1
    extended = torch.cat([tokens[:, :prompt_len], new], dim=1)
    expected = reference_logits(lab, mask, extended)[:, prompt_len - 1:-1]
    torch.testing.assert_close(torch.stack(step_logits, dim=1), expected, atol=2e-4, rtol=0)
    assert torch.equal(expected.argmax(-1), new)  # the reference's greedy choices are the runtime's
    assert torch.equal(rt.generate(tokens[:, :prompt_len], max_new_tokens=steps), new)


def test_kv_bytes_are_what_the_mask_needs(lab, tokens, plain_logits):
    mask = mixed_mask(lab)
    rt = CompressedLM(lab, mask, chunk_size=CHUNK, page_size=PAGE)
    assert rt.kv_bytes() == 0
    d_head, dtype_bytes = lab.info.d_head, 4
    # Memory grows a page (PAGE tokens) at a time: exact at page boundaries, less than a page per KV head over.
    slack = mask.full.numel() * (PAGE - 1) * 2 * d_head * dtype_bytes
    seen = 0
    for length in [5, 16, 32, 48, 51, 96, 160, 200]:  # sink + recent = 36: before and after wrap-around
        rt.forward(tokens[:, seen:length], all_logits=False)
        seen = length
        ideal = mask.ideal_kv_bytes(length, dtype_bytes, d_head)
        if length % PAGE == 0:
            assert rt.kv_bytes() == ideal, length
        else:
            assert ideal < rt.kv_bytes() <= ideal + slack, length
    # Streaming heads stop growing at sink + recent tokens, whatever the page size.
    streaming = HeadMask.all_streaming(lab.info, sink=SINK, recent=RECENT)
    only = CompressedLM(lab, streaming, chunk_size=CHUNK, page_size=PAGE)
    only.logits(tokens)
    assert only.kv_bytes() == streaming.ideal_kv_bytes(N_TOKENS, dtype_bytes, d_head) == 2 * 90 * (SINK + RECENT) * d_head * dtype_bytes
    reset_frees_the_cache(rt)
    # ... and the next tokens start a new sequence at position 0 (5 tokens < sink + recent: the plain model's logits)
    torch.testing.assert_close(rt.forward(tokens[:, :5]), plain_logits[:, :5], atol=2e-4, rtol=0)


def test_generate_from_text_and_mask_mismatch(lab):
    rt = CompressedLM(lab, HeadMask.all_streaming(lab.info, sink=SINK, recent=RECENT))
    prompt = "The capital of France is"
    tokens = lab.to_tokens(prompt)
    assert tokens.shape[1] + 3 <= SINK + RECENT  # the window holds every token: the plain model's greedy answer
    plain = lab.hf_model.generate(tokens, max_new_tokens=3, do_sample=False)[0, tokens.shape[1]:]
    expected = lab.tokenizer.decode(plain, skip_special_tokens=True)
    assert expected.strip() and rt.generate(prompt, max_new_tokens=3) == expected
    wrong = HeadMask(model="x", n_layers=28, n_heads=9, n_kv_heads=3, full=torch.ones(28, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask has 28 layers, SmolLM2-135M-Instruct has 30"):
        CompressedLM(lab, wrong)


def test_the_transformers_cache_and_attention_function_match_too(lab, tokens):
    """`hf_model(..., past_key_values=CompressedKVCache(mask))` on a plain transformers copy of the model."""
    from transformers import AutoModelForCausalLM

    from headlab import loading
    from headlab.runtime.hf import CompressedKVCache, compressed_attention

    hf = AutoModelForCausalLM.from_pretrained(loading.embedded_folder(), dtype=torch.float32, attn_implementation="eager").eval()
    mask, prompt_len = mixed_mask(lab), 120
    cache = CompressedKVCache(mask, page_size=PAGE)
    with compressed_attention(hf), torch.no_grad():
        logits = hf(tokens, past_key_values=cache, use_cache=True).logits
    assert hf.config._attn_implementation == "eager"  # restored
    torch.testing.assert_close(logits, reference_logits(lab, mask, tokens), atol=2e-4, rtol=0)
    full_pages = -(-N_TOKENS // PAGE) * PAGE  # full heads hold whole pages: 13 x 16 = 208 slots; streaming heads 36
    n_stream = mask.full.numel() - mask.n_full
    assert cache.kv_bytes() == 2 * lab.info.d_head * 4 * (mask.n_full * full_pages + n_stream * (SINK + RECENT))
    cache = CompressedKVCache(mask, page_size=PAGE)
    with compressed_attention(hf):
        out = hf.generate(tokens[:, :prompt_len], past_key_values=cache, max_new_tokens=5, do_sample=False)
    rt = CompressedLM(hf, mask, chunk_size=CHUNK, page_size=PAGE)  # also: the runtime on a bare transformers model
    assert torch.equal(out[:, prompt_len:], rt.generate(tokens[:, :prompt_len], max_new_tokens=5))


# --- the "sdpa" path: preallocated buffers, SDPA prefill, static decode step (the GPU path, run here on the CPU) ---

def test_sdpa_path_all_full_gives_the_plain_models_logits(lab, tokens, plain_logits):
    mask = HeadMask.all_full(lab.info, sink=SINK, recent=RECENT)
    rt = CompressedLM(lab, mask, chunk_size=CHUNK, attention="sdpa", max_length=N_TOKENS)
    torch.testing.assert_close(rt.logits(tokens), plain_logits, atol=2e-4, rtol=0)
    assert rt.kv_bytes() == mask.ideal_kv_bytes(N_TOKENS, 4, lab.info.d_head)


@pytest.mark.parametrize("which", ["all_streaming", "mixed"])
def test_sdpa_path_matches_the_streaming_window_reference(lab, tokens, references, which):
    mask = HeadMask.all_streaming(lab.info, sink=SINK, recent=RECENT) if which == "all_streaming" else mixed_mask(lab)
    # all-streaming in chunks of 20 (< recent: a chunk sees part of the ring and writes part of it), mixed in
    # chunks of 48 (> recent); the ring wraps ~5 times either way
    chunk = 20 if which == "all_streaming" else CHUNK
    rt = CompressedLM(lab, mask, chunk_size=chunk, attention="sdpa", max_length=N_TOKENS)
    torch.testing.assert_close(rt.logits(tokens), references[which], atol=2e-4, rtol=0)


@pytest.mark.parametrize("fuse", [False, True])
def test_sdpa_decode_steps_match_the_reference(lab, tokens, references, fuse, monkeypatch):
    """Prefill 180 tokens, then one token at a time through the static decode step (what the CUDA graph captures).
    `fuse=True` runs the fused decode layer with its functions uncompiled (torch.compile is for CUDA)."""
    from headlab.runtime import fused

    monkeypatch.setattr(fused, "compiled", lambda name: fused.FUNCTIONS[name])
    mask, prompt_len = mixed_mask(lab), 180
    rt = CompressedLM(lab, mask, chunk_size=CHUNK, attention="sdpa", max_length=N_TOKENS, fuse=fuse)
    rt.logits(tokens[:, :prompt_len])
    steps = [rt.forward(tokens[:, i:i + 1]) for i in range(prompt_len, N_TOKENS)]  # 20 steps: the ring wraps again
    assert rt.length == N_TOKENS and int(rt.cache.pos) == N_TOKENS
    torch.testing.assert_close(torch.cat(steps, dim=1), references["mixed"][:, prompt_len:], atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="max_length=200"):
        rt.forward(tokens[:, :1])


def test_sdpa_generate_matches_the_eager_path(lab, tokens):
    mask = mixed_mask(lab)
    eager = CompressedLM(lab, mask, chunk_size=CHUNK, page_size=PAGE, attention="eager")
    sdpa = CompressedLM(lab, mask, chunk_size=CHUNK, attention="sdpa")  # max_length = prompt + new tokens
    expected = eager.generate(tokens[:, :120], max_new_tokens=5)
    assert torch.equal(sdpa.generate(tokens[:, :120], max_new_tokens=5), expected)
    assert sdpa.kv_bytes() == mask.ideal_kv_bytes(125, 4, lab.info.d_head)


@pytest.mark.parametrize("compensate", [False, True])
def test_a_reserved_cache_is_reused_and_answers_as_a_fresh_one(lab, tokens, compensate):
    """`reserve` then several `generate`s (prompts of different lengths, the ring wrapping in each): every answer equals
    a fresh runtime's, and the cache is the same object throughout (no reallocation, so a captured graph stays valid)."""
    mask = mixed_mask(lab)
    reserved = CompressedLM(lab, mask, chunk_size=CHUNK, attention="sdpa", compensate=compensate)
    reserved.reserve(1, N_TOKENS)
    cache = reserved.cache
    for prompt_len in (150, 90, 180):
        fresh = CompressedLM(lab, mask, chunk_size=CHUNK, attention="sdpa", compensate=compensate)
        expected = fresh.generate(tokens[:, :prompt_len], max_new_tokens=6, stop_at_eos=False)
        assert torch.equal(reserved.generate(tokens[:, :prompt_len], max_new_tokens=6, stop_at_eos=False), expected)
        assert reserved.cache is cache and reserved.length == prompt_len + 5
    reserved.generate(tokens[:, :N_TOKENS], max_new_tokens=2)  # does not fit: a new cache, sized for the call
    assert reserved.cache is not cache and reserved.cache.max_length == N_TOKENS + 2


@pytest.mark.parametrize("max_length", [20, 36, 37, 200, 1000])
def test_sdpa_kv_bytes_are_the_ideal_at_max_length(lab, max_length):
    """Buffers are allocated once, for max_length tokens: exactly what the mask must keep then (sink + recent = 36)."""
    d_head, dtype_bytes = lab.info.d_head, 4
    for mask in (mixed_mask(lab), HeadMask.all_streaming(lab.info, sink=SINK, recent=RECENT)):
        rt = CompressedLM(lab, mask, attention="sdpa", max_length=max_length)
        assert rt.kv_bytes() == 0
        rt.forward(torch.tensor([[1, 2, 3]]), all_logits=False)
        assert rt.kv_bytes() == mask.ideal_kv_bytes(max_length, dtype_bytes, d_head), (max_length, mask)
    reset_frees_the_cache(rt)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_heap() -> None:
    """glibc serves even a 64 MiB request from a free region of its heap when an earlier test left one (the buffer
    then sits at a 0x55... heap address, not in its own mapping) and keeps such memory after free until trimmed:
    `malloc_trim` hands the allocator's free pages back, so what is measured is what the cache still holds."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns large blocks on its own or not at all
        pass


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the process's resident memory from Linux /proc")
def test_reset_gives_the_cache_memory_back_to_the_system(tiny_lab):
    """A 128 MiB cache ("sdpa" buffers for 2**18 tokens on the tiny Llama, 64 MiB per layer): resident memory falls
    by at least 3/4 of it on reset() (once glibc hands back its free heap pages, see `_release_free_heap`)."""
    rt = CompressedLM(tiny_lab, HeadMask.all_full(tiny_lab.info), attention="sdpa", max_length=2**18)
    rt.forward(torch.tensor([[1, 2, 3]]))
    rt.forward(torch.tensor([[4]]))  # a decode step too
    held = rt.kv_bytes()
    assert held == 128 * 2**20
    for tensor in cache_tensors(rt.cache):  # a fresh zeroed mapping is not resident until written: write every page
        tensor.fill_(1.0)
    del tensor  # (the loop variable would keep the last one alive)
    gc.collect()
    before = _resident_bytes()
    reset_frees_the_cache(rt)
    _release_free_heap()
    freed = before - _resident_bytes()
    assert freed >= 0.75 * held, f"reset() gave back {freed / 2**20:.1f} MiB of the {held / 2**20:.0f} MiB cache"


def test_only_the_retrieval_mask_keeps_the_needle(lab):
    """The issue's quality claim at CPU size: the retrieval-score mask at 50% answers like the full
    cache; all-streaming loses the needle and drifts further from the full cache on prose."""
    from headlab.masks import make_mask
    from headlab.runtime.quality import FULL_CACHE, quality

    masks = {
        "retrieval": make_mask(lab, "score", kind="retrieval", full_fraction=0.5, sink=32, recent=128),
        "all streaming": make_mask(lab, "all_streaming", sink=32, recent=128),
    }
    table = quality(lab, masks, lengths=[512], depths=[0.1], kl_tokens=512).set_index("mask")
    assert table.loc[FULL_CACHE, "needle_accuracy"] == 1.0
    assert table.loc["retrieval", "needle_accuracy"] == 1.0 and table.loc["all streaming", "needle_accuracy"] == 0.0
    assert 0 < table.loc["retrieval", "kl_vs_full"] < table.loc["all streaming", "kl_vs_full"]
