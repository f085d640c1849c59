"""The baselines `runtime.measure` compares against, on a tiny random Llama on the CPU (float32).

The GPU benchmark's rows (analyses/runtime_benchmark.py) are only as fair as these baselines are
correct: transformers' StaticCache path must continue exactly like the DynamicCache one, and every
kind must report the bytes its cache really holds.
"""
from __future__ import annotations

import pytest
import torch

from headlab.masks import HeadMask
from headlab.runtime.benchmark import GRAPH_WARMUP_STEPS, RUNNERS, info_of, llama_8b_config, measure, random_llama

CONTEXT, STEPS = 70, 12


@pytest.fixture(scope="module")
def tiny():
    config = llama_8b_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    return random_llama(config, device="cpu", dtype=torch.float32, seed=3)


@pytest.fixture(scope="module")
def mask(tiny):
    return HeadMask.random(info_of(tiny), 0.5, seed=1, sink=4, recent=16)


def continuation(tiny, mask, kind: str) -> list[int]:
    tokens = torch.randint(0, 512, (1, CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run = RUNNERS[kind](tiny, tokens, mask, max_length=CONTEXT + STEPS, chunk_size=32, cuda_graph=False,
                            attention="eager", model=tiny)
        out, token = [], run.token
        for _ in range(STEPS):
            out.append(int(token))
            token = run.step(token)
    return out


def test_static_cache_baseline_continues_exactly_like_the_dynamic_cache(tiny, mask):
    dynamic = continuation(tiny, mask, "hf_full")
    assert continuation(tiny, mask, "hf_static") == dynamic
    assert len(set(dynamic)) > 1  # a real continuation, not one token repeated


def test_each_kind_reports_the_bytes_its_cache_holds(tiny, mask):
    """Exact bytes: the rows are measured at `length` = context + warm-up + new tokens, and every kind's cache is
    sized by design (the compressed runtime's "sdpa" buffers are allocated for exactly that length)."""
    warmup, new_tokens = 1, 4
    rows = {r["cache"]: r for r in measure(tiny, mask, contexts=[CONTEXT], new_tokens=new_tokens, warmup=warmup, chunk_size=32,
                                           kinds=("hf_full", "hf_static", "compressed"), attention="sdpa").to_dict("records")}
    full, ideal = rows["hf_full"]["full_kv_bytes"], rows["hf_full"]["ideal_kv_bytes"]
    length = CONTEXT + warmup + new_tokens
    assert full == 2 * 2 * 2 * length * 16 * 4  # K and V, 2 layers, 2 KV heads, d_head 16, float32
    assert rows["hf_full"]["kv_bytes"] == full  # DynamicCache: every token, every head
    assert rows["hf_static"]["kv_bytes"] == full // length * (length + GRAPH_WARMUP_STEPS)  # preallocated, + its warm-up steps
    assert rows["compressed"]["kv_bytes"] == ideal < full and rows["compressed"]["kv_ratio"] == 1.0
    assert all(not r["oom"] and r["decode_ms"] > 0 for r in rows.values())


def test_kvpress_row_without_kvpress_says_how_to_get_it(tiny, mask):
    try:
        import kvpress  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="kvpress is not installed.*transformers<5.3"):
            measure(tiny, mask, contexts=[CONTEXT], new_tokens=2, kinds=("kvpress_duo",))
    else:  # an environment that has kvpress: its simulated mask holds the whole cache
        row = measure(tiny, mask, contexts=[CONTEXT], new_tokens=2, kinds=("kvpress_duo",)).iloc[0]
        assert row["kv_bytes"] == pytest.approx(row["full_kv_bytes"], rel=0.02)
    with pytest.raises(ValueError, match="kind must be one of"):
        measure(tiny, mask, contexts=[CONTEXT], kinds=("paged",))


def test_packed_projections_decode_exactly_and_keep_the_weights(tiny, mask, monkeypatch):
    """The CUDA decode path's packed q/k/v and gate/up matrices (run here uncompiled on the CPU) give the same
    logits as the plain path, and the model's Parameters keep their identity and values (no copy is left)."""
    from headlab.runtime import CompressedLM, fused

    monkeypatch.setattr(fused, "compiled", lambda name: fused.FUNCTIONS[name])
    tokens = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    layer = tiny.model.layers[0]
    before = [(p, p.detach().clone()) for p in (layer.self_attn.q_proj.weight, layer.self_attn.v_proj.weight, layer.mlp.up_proj.weight)]

    def decode(**flags) -> torch.Tensor:
        rt = CompressedLM(tiny, mask, chunk_size=16, attention="sdpa", max_length=40, **flags)
        rt.forward(tokens[:, :30])
        return torch.cat([rt.forward(tokens[:, i:i + 1]) for i in range(30, 40)], dim=1)

    plain = decode(fuse=False)
    packed = decode(fuse=True, pack=True)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    for param, value in before:
        assert any(p is param for p in tiny.parameters())  # the same Parameter object, still the model's
        torch.testing.assert_close(param, value, atol=0, rtol=0)
    q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()  # row blocks of one packed matrix
    where = q.data_ptr()
    packed_again = decode(fuse=True, pack=True)  # a packed model is recognised, not copied again
    assert q.data_ptr() == where
    torch.testing.assert_close(packed_again, plain, atol=1e-5, rtol=1e-5)
