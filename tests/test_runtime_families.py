"""The compressed-KV runtime is exact for every supported decoder family (`headlab.runtime.weights.FAMILIES`).

One table of tiny random configs (2 layers, hidden 64, float32, every parameter re-drawn so biases and
norm weights matter), one row per family or family variant. For each row:
- an all-full mask gives the plain transformers model's logits (eager and "sdpa" paths);
- streaming heads give the streaming-window reference's logits, through chunk boundaries and ring
  wrap-around (48 tokens, chunks of 7, sink 2 + recent 12), at prefill and at every decode step (the
  "sdpa" decode step also fused, its functions run uncompiled on the CPU);
- `hf_model.generate` with the runtime's `transformers.Cache` gives the runtime's own greedy tokens.
The reference is the plain model itself with its own eager attention function (its soft-capping, its
sliding-window mask), plus the streaming heads' window (`headlab.ablation.streaming_window_allowed`)
added to the mask in every layer that is not one of the model's sliding-window layers (those stream
with their own window, `sink=0, recent=sliding_window`, in the runtime; transformers' mask is that).
RazorAttention's compensation token is checked against attention written out by hand.

On a GPU: `HEADLAB_FAMILY_DEVICE=cuda pytest tests/test_runtime_families.py` runs the "sdpa" tests on CUDA
(CUDA graph, torch.compile'd fused step, Triton decode kernel); they skip without CUDA.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from headlab.ablation import streaming_window_allowed
from headlab.masks import HeadMask
from headlab.runtime import CompressedLM, fused
from headlab.runtime.hf import CompressedKVCache, compressed_attention
from headlab.runtime.weights import FAMILIES, model_modules

SINK, RECENT, SLIDING, CHUNK, PAGE = 2, 12, 10, 7, 5
N_TOKENS, PROMPT, NEW = 48, 40, 8
DEVICE = os.environ.get("HEADLAB_FAMILY_DEVICE", "cpu")
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
NEOX = {key: value for key, value in COMMON.items() if key != "num_key_value_heads"}  # no grouped-query attention
GEMMA = dict(head_dim=16, sliding_window=SLIDING, query_pre_attn_scalar=24, final_logit_softcapping=2.0)
# row: (family, transformers config class, its arguments); the variants exercise a quirk the plain row lacks
CONFIGS = {
    "llama": ("llama", "LlamaConfig", dict(COMMON, attention_bias=True)),
    "llama3": ("llama", "LlamaConfig", dict(COMMON, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("mistral", "MistralConfig", dict(COMMON, sliding_window=None)),
    "mistral_sliding": ("mistral", "MistralConfig", dict(COMMON, sliding_window=SLIDING)),
    "qwen2": ("qwen2", "Qwen2Config", dict(COMMON, use_sliding_window=True, sliding_window=SLIDING, max_window_layers=1)),
    "qwen3": ("qwen3", "Qwen3Config", dict(COMMON, head_dim=16)),
    "gemma2": ("gemma2", "Gemma2Config", dict(COMMON, **GEMMA, attn_logit_softcapping=2.0)),
    "gemma3": ("gemma3", "Gemma3TextConfig", dict(COMMON, **GEMMA, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("phi3", "Phi3Config", dict(COMMON, partial_rotary_factor=0.5)),
    "olmo2": ("olmo2", "Olmo2Config", dict(COMMON)),
    "gpt_neox": ("gpt_neox", "GPTNeoXConfig", dict(NEOX, rotary_pct=0.25)),
    "gpt_neox_sequential": ("gpt_neox", "GPTNeoXConfig", dict(NEOX, rotary_pct=0.25, use_parallel_residual=False)),
}
ROWS = list(CONFIGS)
REFERENCE = "headlab_test_window"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(row: str, device: str = "cpu"):
    """The row's model with every parameter drawn at random (seeded), float32, eager attention, eval mode."""
    _, config_class, kwargs = CONFIGS[row]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(sum(map(ord, row)))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
            elif "norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)
    return model.to(device).eval()


@pytest.fixture(scope="module")
def models():
    return {row: build(row) for row in ROWS}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (1, N_TOKENS), generator=torch.Generator().manual_seed(0))


def mixed_mask(model, full=((True, False), (False, True))) -> HeadMask:
    """Every layer split: one full and one streaming KV head (GPT-NeoX, without GQA: half of its heads)."""
    c = model.config
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    rows = torch.tensor(full).repeat_interleave(n_kv // 2, dim=1)
    return HeadMask(model="tiny", n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, n_kv_heads=n_kv,
                    full=rows, sink=SINK, recent=RECENT)


def masks(model) -> dict[str, HeadMask]:
    all_streaming = mixed_mask(model, ((False, False), (False, False)))
    return {"all_full": mixed_mask(model, ((True, True), (True, True))), "mixed": mixed_mask(model), "all_streaming": all_streaming}


def _windowed(mask: HeadMask, eager):
    """An attention function: the family's own `eager_attention_forward` with the streaming heads' keys outside
    sink + recent masked out, except in the model's sliding-window layers (their own window applies)."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        if kwargs.get("sliding_window") is None:
            n_q, n_k = query.shape[2], key.shape[2]
            outside = ~streaming_window_allowed(n_q, n_k, mask.sink, mask.recent, query.device)
            group = query.shape[1] // mask.n_kv_heads
            streaming = ~mask.full[module.layer_idx].repeat_interleave(group).to(query.device)  # [n_heads]
            extra = torch.zeros(1, query.shape[1], n_q, n_k, dtype=query.dtype, device=query.device)
            extra = extra.masked_fill(streaming[:, None, None] & outside, float("-inf"))
            attention_mask = extra if attention_mask is None else attention_mask + extra
        return eager(module, query, key, value, attention_mask, **kwargs)
    return attention


def reference_logits(model, mask: HeadMask, tokens: torch.Tensor, attention=None) -> torch.Tensor:
    """The plain model with `attention` (default: the streaming-window reference of `mask`) as its attention function."""
    family_module = sys.modules[type(model).__module__]
    AttentionInterface.register(REFERENCE, attention or _windowed(mask, family_module.eager_attention_forward))
    AttentionMaskInterface.register(REFERENCE, eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE)
    try:
        with torch.no_grad():
            return model(tokens.to(model.device), use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


def decode_logits(rt: CompressedLM, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill the first PROMPT tokens in chunks, then one token at a time: logits `[1, N_TOKENS, vocab]`."""
    tokens = tokens.to(rt.modules.device)
    steps = [rt.logits(tokens[:, :PROMPT])]
    steps += [rt.forward(tokens[:, i:i + 1]) for i in range(PROMPT, tokens.shape[1])]
    assert rt.length == tokens.shape[1]
    return torch.cat(steps, dim=1)


def test_every_row_is_a_table_family():
    assert {family for family, _, _ in CONFIGS.values()} == {family.name for family in FAMILIES}
    for row in ROWS:
        assert model_modules(build(row)).family.name == CONFIGS[row][0]


@pytest.mark.parametrize("row", ROWS)
def test_all_full_mask_gives_the_plain_models_logits(models, tokens, row):
    model = models[row]
    with torch.no_grad():
        plain = model(tokens).logits
    mask = masks(model)["all_full"]
    for attention in ("eager", "sdpa"):
        rt = CompressedLM(model, mask, chunk_size=CHUNK, page_size=PAGE, attention=attention, max_length=N_TOKENS)
        torch.testing.assert_close(rt.logits(tokens), plain, atol=2e-4, rtol=0, msg=f"{row}, {attention}")


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("which", ["mixed", "all_streaming"])
def test_streaming_heads_match_the_reference_at_prefill_and_decode(models, tokens, row, which, monkeypatch):
    model = models[row]
    mask = masks(model)[which]
    expected = reference_logits(model, mask, tokens)
    if row != "mistral_sliding":  # the window really cuts something (every layer of this Mistral is a sliding one)
        with torch.no_grad():
            assert (expected - model(tokens).logits).abs().max() > 0.05
    monkeypatch.setattr(fused, "compiled", lambda name: fused.FUNCTIONS[name])
    for attention, fuse in (("eager", False), ("sdpa", False), ("sdpa", True)):
        rt = CompressedLM(model, mask, chunk_size=CHUNK, page_size=PAGE, attention=attention, max_length=N_TOKENS, fuse=fuse)
        torch.testing.assert_close(rt.logits(tokens), expected, atol=2e-4, rtol=0, msg=f"{row} prefill, {attention}")
        torch.testing.assert_close(decode_logits(rt, tokens), expected, atol=2e-4, rtol=0,
                                   msg=f"{row} decode, {attention}, fuse={fuse}")


@pytest.mark.parametrize("row", ROWS)
def test_generate_with_the_transformers_cache_matches_the_runtime(models, tokens, row):
    model = models[row]
    mask = masks(model)["mixed"]
    prompt = tokens[:, :30]  # longer than sink + recent and the sliding window
    cache = CompressedKVCache(mask, page_size=PAGE)
    with compressed_attention(model), torch.no_grad():
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    assert cache.kv_bytes() > 0
    for attention in ("eager", "sdpa"):
        rt = CompressedLM(model, mask, chunk_size=CHUNK, page_size=PAGE, attention=attention)
        assert torch.equal(out[:, prompt.shape[1]:], rt.generate(prompt, max_new_tokens=NEW)), (row, attention)


@pytest.mark.parametrize("row", ROWS)
def test_fused_norms_compute_what_the_familys_norm_modules_do_in_bfloat16(row):
    """The CUDA decode step's functional norms (`fused`, by the family's `norm_kind`) against every norm module of the
    family, bit for bit in bfloat16, where the conventions (cast before or after the weight, 1 + w) differ."""
    modules = model_modules(build(row).to(torch.bfloat16))
    layer = modules.layers[0]
    ops = fused.FusedOps(modules.family.norm_kind)
    for norm in [n for n in (*layer.norms, layer.q_norm, layer.k_norm) if n is not None] + [modules.final_norm]:
        x = torch.randn(2, 3, norm.weight.shape[-1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 3
        with torch.no_grad():
            assert torch.equal(fused.FUNCTIONS["norm"](x, norm.weight, getattr(norm, "bias", None), fused.norm_eps(norm),
                                                       ops.kind), norm(x)), (row, type(norm).__name__)


def test_sliding_window_layers_hold_only_their_window(models, tokens):
    """Gemma 2's sliding layer (layer 0) keeps `sliding_window` tokens per KV head even for a head the mask keeps full."""
    model = models["gemma2"]
    mask = masks(model)["all_full"]
    rt = CompressedLM(model, mask, attention="sdpa", max_length=N_TOKENS)
    rt.logits(tokens)
    d_head, n_kv = 16, 2
    assert rt.kv_bytes() == 2 * 4 * d_head * n_kv * (SLIDING + N_TOKENS)  # layer 0: its window; layer 1: every token
    assert [layer.n_full for layer in rt.cache.layers] == [0, n_kv]


def test_unsupported_models_fail_at_construction_naming_what_is_missing(models):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    mask = HeadMask(model="gpt2", n_layers=1, n_heads=2, n_kv_heads=2, full=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not support GPT2LMHeadModel.*LlamaForCausalLM.*GPTNeoXForCausalLM"):
        CompressedLM(gpt2, mask)
    model = build("qwen3")
    del model.model.layers[1].self_attn.q_norm
    with pytest.raises(ValueError, match="layer 1's self_attn has no `q_norm`.*qwen3"):
        CompressedLM(model, masks(model)["mixed"])
    bidirectional = build("gemma3")
    bidirectional.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="bidirectional"):
        CompressedLM(bidirectional, masks(bidirectional)["mixed"])


# --- RazorAttention's compensation token ----------------------------------------------------------------------------

def _compensated_by_hand(mask: HeadMask):
    """Attention written out query by query: a streaming head sees its sink + recent keys and one more key and value,
    the plain mean of the keys and values at positions sink .. q - recent (those it evicted), when there are any."""
    def attention(module, query, key, value, attention_mask, scaling, **kwargs):
        _, n_heads, n, _ = query.shape
        group = n_heads // key.shape[1]
        out = torch.empty_like(query)
        for head in range(n_heads):
            kv = head // group
            streams = not bool(mask.full[module.layer_idx, kv])
            for q in range(n):
                keep = [k for k in range(q + 1) if not streams or k < mask.sink or q - k < mask.recent]
                keys, values = key[0, kv, keep], value[0, kv, keep]
                evicted = list(range(mask.sink, q - mask.recent + 1)) if streams else []
                if evicted:
                    keys = torch.cat([keys, key[0, kv, evicted].mean(0, keepdim=True)])
                    values = torch.cat([values, value[0, kv, evicted].mean(0, keepdim=True)])
                probs = torch.softmax(keys @ query[0, head, q] * scaling, dim=-1)
                out[0, head, q] = probs @ values
        return out.transpose(1, 2), None
    return attention


def test_compensation_token_is_the_mean_of_the_evicted_keys_and_values(models, tokens, monkeypatch):
    model = models["llama"]
    mask = masks(model)["mixed"]
    expected = reference_logits(model, mask, tokens, _compensated_by_hand(mask))
    assert (expected - reference_logits(model, mask, tokens)).abs().max() > 0.05  # the token changes the output
    monkeypatch.setattr(fused, "compiled", lambda name: fused.FUNCTIONS[name])
    for attention, fuse in (("eager", False), ("sdpa", False), ("sdpa", True)):
        for chunk in (CHUNK, N_TOKENS):  # the mean per query does not depend on the chunks
            rt = CompressedLM(model, mask, chunk_size=chunk, page_size=PAGE, attention=attention, max_length=N_TOKENS,
                              fuse=fuse, compensate=True)
            torch.testing.assert_close(rt.logits(tokens), expected, atol=2e-4, rtol=0, msg=f"{attention}, chunk {chunk}")
        torch.testing.assert_close(decode_logits(rt, tokens), expected, atol=2e-4, rtol=0, msg=f"decode, {attention}")
    cache = CompressedKVCache(mask, page_size=PAGE, compensate=True)
    with compressed_attention(model), torch.no_grad():
        torch.testing.assert_close(model(tokens, past_key_values=cache, use_cache=True).logits, expected, atol=2e-4, rtol=0)


def test_warm_up_steps_leave_the_compensated_cache_as_it_was(models, tokens, monkeypatch):
    """Before a CUDA graph capture the decode step runs three warm-up times (`StaticCache.rewound`): with the
    compensation token those steps add to the evicted sums, and the logits after them must not change."""
    model = models["llama"]
    mask = masks(model)["mixed"]
    monkeypatch.setattr(fused, "compiled", lambda name: fused.FUNCTIONS[name])
    expected = reference_logits(model, mask, tokens, _compensated_by_hand(mask))
    rt = CompressedLM(model, mask, chunk_size=CHUNK, attention="sdpa", max_length=N_TOKENS, compensate=True)
    step = rt._step

    def warmed_up_step(static_tokens):  # what `_capture` does, at every step instead of once
        for _ in range(3):
            with rt.cache.rewound():
                step(static_tokens)
        return step(static_tokens)

    monkeypatch.setattr(rt, "_step", warmed_up_step)
    torch.testing.assert_close(decode_logits(rt, tokens), expected, atol=2e-4, rtol=0)


def test_compensation_adds_one_slot_per_streaming_head(models):
    model = models["llama"]
    mask = masks(model)["mixed"]
    plain = CompressedLM(model, mask, attention="sdpa", max_length=N_TOKENS)
    compensated = CompressedLM(model, mask, attention="sdpa", max_length=N_TOKENS, compensate=True)
    for rt in (plain, compensated):
        rt.forward(torch.tensor([[1, 2, 3]]))
    d_head, n_stream = 16, int((~mask.full).sum())
    # one more key and value slot in the model's dtype, and the float32 sums of the evicted keys and values
    assert compensated.kv_bytes() - plain.kv_bytes() == n_stream * 2 * d_head * (4 + 4)
    assert plain.kv_bytes() == mask.ideal_kv_bytes(N_TOKENS, 4, d_head)


# --- the CUDA path, run on a GPU (HEADLAB_FAMILY_DEVICE=cuda) ------------------------------------------------------

@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(),
                    reason="runs on CUDA only (HEADLAB_FAMILY_DEVICE=cuda on a GPU machine)")
@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("matmul", ["cublas", "auto"])
def test_cuda_path_matches_the_reference(tokens, row, compensate, matmul, monkeypatch):
    """CUDA graph, compiled fused step, packed projections (cuBLAS or the Triton matrix-vector kernel, `fused.MATMUL`)
    and the Triton decode kernel, float32, against the same references (TF32 off); tolerance 1e-3 for the GPU's
    different summation order."""
    from headlab.runtime import fused

    monkeypatch.setattr(fused, "MATMUL", matmul)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = build(row, "cuda")
    mask = masks(model)["mixed"]
    if compensate and row != "llama":
        pytest.skip("the compensation token is checked by hand on the Llama row")
    hand = _compensated_by_hand(mask) if compensate else None
    expected = reference_logits(model, mask, tokens, hand)
    rt = CompressedLM(model, mask, chunk_size=CHUNK, attention="sdpa", max_length=N_TOKENS, compensate=compensate)
    assert rt.cuda_graph and rt.fuse
    torch.testing.assert_close(decode_logits(rt, tokens), expected, atol=1e-3, rtol=0)
