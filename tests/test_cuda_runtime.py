"""The runtime's CUDA path on a GPU: the one-launch Triton decode kernel against the eager reference, the captured
decode graph against the uncaptured step, the torch.compile'd fused pieces against the modules, and the whole CUDA
path against the eager (CPU-tested) path. Skipped, with the reason printed (`pytest -rs`), where there is no CUDA
device; on the device: `python3 -m pytest tests/test_cuda_runtime.py -q -rs`. The kernel tests also run on the CPU
under Triton's interpreter (`TRITON_INTERPRET=1`, Triton installed)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from headlab.masks import HeadMask
from headlab.runtime.cache import layer_layout
from headlab.runtime.static import StaticCache

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device: the CUDA graph, torch.compile and Triton decode path "
                                                 "run only on a GPU (run this module on the device)")
needs_kernel = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="no CUDA device (nor TRITON_INTERPRET=1 with Triton): "
                                                                    "the Triton decode kernel cannot run here")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _filled_cache(full_row: list[bool], batch: int, d: int, max_length: int, sink: int, recent: int, pos: int, dtype,
                  seed: int) -> StaticCache:
    """A one-layer cache holding `pos` positions of random keys/values, rings as a prefill of `pos` tokens leaves them."""
    mask = HeadMask(model="t", n_layers=1, n_heads=len(full_row) * 4, n_kv_heads=len(full_row), full=torch.tensor([full_row]),
                    sink=sink, recent=recent)
    cache = StaticCache(layer_layout(mask, [None]), batch, d, max_length, dtype, KERNEL_DEVICE)
    generator = torch.Generator().manual_seed(seed)
    layer = cache.layers[0]
    for buf in (layer.full_kv, layer.stream_kv):
        buf.copy_(torch.randn(buf.shape, generator=generator).to(dtype))
    held = torch.arange(pos)
    for window, ring in cache.rings.items():
        kept = held[(held < window.sink) | (held >= pos - window.recent)].to(KERNEL_DEVICE)
        ring.slot_pos.index_copy_(0, window.slot_of(kept), kept)
    cache.pos.fill_(pos)
    return cache


CASES = [  # full pattern, batch, group, d, max_length, sink, recent, pos
    ([True, False, True, False], 1, 4, 64, 700, 8, 40, 0),  # the first token
    ([True, False, True, False], 1, 4, 64, 700, 8, 40, 30),  # the ring not full yet
    ([True, False, False, True], 3, 4, 64, 700, 8, 40, 699),  # the ring wrapped many times, the last slot
    ([False, False, True, False], 2, 2, 128, 2000, 4, 60, 1500),  # many splits (more than a combine block)
    ([True, True, True, True], 2, 3, 64, 500, 8, 40, 333),  # all full, group 3 (rows padded)
    ([False, False, False, False], 2, 1, 64, 500, 8, 40, 333),  # all streaming, group 1
]


def _rope_tables(d_rot: int, pos: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin `[1, 1, d_rot]` at `pos` (base 10000; each angle on both halves)."""
    angles = pos / 10000 ** (torch.arange(0, d_rot, 2, dtype=torch.float64) / d_rot)
    angles = torch.cat([angles, angles])
    return tuple(f(angles).to(dtype).view(1, 1, d_rot).to(KERNEL_DEVICE) for f in (torch.cos, torch.sin))


KERNEL_CONFIGS = {"many-splits": ({"programs": 64}, None), "min-chunk": ({"programs": 64, "min_chunk": 128}, None),
                  "rope": ({"programs": 64}, 1.0), "partial-rope": ({"programs": 64, "min_chunk": 128}, 0.5)}


@needs_kernel
@pytest.mark.parametrize("config", KERNEL_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"pos{c[-1]}-{''.join('F' if f else 's' for f in c[0])}" for c in CASES])
def test_decode_kernel_matches_the_eager_reference(case, dtype, config):
    """One launch for full and streaming heads: the same output and the same cache writes as `decode_reference`; with
    RoPE inside the launch (all or half the channels: GPT-NeoX's partial rotary), as `apply_rotary` first."""
    from headlab.runtime.attention import apply_rotary
    from headlab.runtime.decode_kernel import decode_layer

    full_row, batch, group, d, max_length, sink, recent, pos = case
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("bf16 tl.dot under the interpreter: float32 covers the logic")
    config, rope = KERNEL_CONFIGS[config]
    n_kv = len(full_row)
    reference, ours = (_filled_cache(full_row, batch, d, max_length, sink, recent, pos, dtype, seed=pos) for _ in range(2))
    generator = torch.Generator().manual_seed(pos + 1)
    q = torch.randn(batch, n_kv, group, d, generator=generator).to(dtype).to(KERNEL_DEVICE)
    k, v = torch.randn(2, batch, n_kv, d, generator=generator).to(dtype).to(KERNEL_DEVICE).unbind(0)
    rotary = _rope_tables(int(d * rope), pos, dtype) if rope else None
    if rope:  # the kernel rotates in float32 and rounds once; op-by-op bf16 (transformers) differs by several roundings
        rotate = lambda x: apply_rotary(x.float(), *(t.float() for t in rotary)).to(dtype)  # noqa: E731
        q_ref, k_ref = rotate(q), rotate(k.unsqueeze(2)).squeeze(2)
    else:
        q_ref, k_ref = q, k
    slots = reference.begin_step()
    expected = reference.decode_reference(reference.layers[0], q_ref, k_ref, v, slots[reference.layers[0].ring.window], d ** -0.5)
    ours.begin_step()
    layer, window = ours.layers[0], ours.layers[0].ring.window
    out = decode_layer(q, k, v, layer.full_kv, layer.stream_kv, layer.order, ours.pos, window.sink, window.recent, d ** -0.5,
                       block_n=32, rotary=rotary, **config)
    assert torch.isfinite(out).all()
    assert rel(out, expected) < (1e-5 if dtype == torch.float32 else 2e-2)
    for buf, ref in ((layer.full_kv, reference.layers[0].full_kv), (layer.stream_kv, reference.layers[0].stream_kv)):
        if rope:  # the same float32 rotation rounded once: equal up to the last bit (a different FMA order)
            torch.testing.assert_close(buf, ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
        else:  # the token stored at slot pos / its ring slot
            assert torch.equal(buf, ref)
    if rope and pos:  # and RoPE mattered (at position 0 it is the identity)
        assert rel(decode_layer(q, k, v, layer.full_kv.clone(), layer.stream_kv.clone(), layer.order, ours.pos, window.sink,
                                window.recent, d ** -0.5, block_n=32, **config), expected) > 1e-2


@needs_kernel
def test_decode_kernel_soft_caps_the_scores():
    """Gemma 2's soft-capping inside the kernel matches the eager cap, and differs from no cap."""
    from headlab.runtime.decode_kernel import decode_layer

    cache, reference = (_filled_cache([True, False], 2, 64, 300, 4, 30, 250, torch.float32, seed=3) for _ in range(2))
    q = torch.randn(2, 2, 4, 64, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE) * 8
    k, v = torch.randn(2, 2, 2, 64, generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE).unbind(0)
    slots = reference.begin_step()
    layer = reference.layers[0]
    expected = reference.decode_reference(layer, q, k, v, slots[layer.ring.window], 0.125, softcap=5.0)
    uncapped = reference.decode_reference(layer, q, k, v, slots[layer.ring.window], 0.125)
    cache.begin_step()
    ours = cache.layers[0]
    out = decode_layer(q, k, v, ours.full_kv, ours.stream_kv, ours.order, cache.pos, 4, 30, 0.125, softcap=5.0)
    assert rel(out, expected) < 1e-5
    assert rel(uncapped, expected) > 1e-2


GEMV_CASES = [  # n, k, bias, gated
    (300, 520, False, False),  # k not a multiple of the block, n not a multiple of block_n
    (64, 256, True, True),  # the down projection reading [gate | up], with a bias
    (70, 200, True, False),
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GEMV_CASES, ids=[f"{'bias' if c[2] else 'nobias'}-{'gated' if c[3] else 'plain'}-{c[0]}"
                                                  for c in GEMV_CASES])
def test_gemv_kernel_matches_f_linear(case, dtype):
    """The batch-1 matrix-vector kernel computes `F.linear` (of `F.silu(gate) * up` when gated); it takes one row only."""
    import torch.nn.functional as F

    from headlab.runtime.gemv_kernel import linear, supports

    n, k, bias, gated = case
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("bf16 under the interpreter: float32 covers the logic")
    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, 1, 2 * k if gated else k, generator=g).to(dtype).to(KERNEL_DEVICE)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(KERNEL_DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(KERNEL_DEVICE) if bias else None
    inputs = F.silu(x[..., :k]) * x[..., k:] if gated else x
    expected = F.linear(inputs.double(), w.double(), None if b is None else b.double())
    out = linear(x, w, b, gated=gated, block_k=128)
    assert out.shape == (1, 1, n) and out.dtype == dtype
    assert rel(out, expected) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="input width"):
        linear(x[..., 1:], w, b, gated=gated)
    assert supports(x[..., :k], w) and not supports(torch.cat([x, x])[..., :k], w)  # two rows: cuBLAS
    with pytest.raises(ValueError, match="one row"):
        linear(torch.cat([x, x]), w, b, gated=gated)


def _tiny_llama(dtype):
    from headlab.runtime.benchmark import llama_8b_config, random_llama

    config = llama_8b_config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)
    return random_llama(config, dtype=dtype)


def _mixed_mask(model) -> HeadMask:
    from headlab.runtime.benchmark import info_of

    return HeadMask.random(info_of(model), 0.5, seed=1, sink=8, recent=48)  # the ring wraps within the prompt


def _decode(rt, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Prefill `tokens[:, :n]`, then the rest one step at a time: float32 logits of every position."""
    pre = rt.logits(tokens[:, :n])
    return torch.cat([pre, *[rt.forward(tokens[:, i:i + 1]) for i in range(n, tokens.shape[1])]], dim=1).float()


@pytest.fixture(scope="module")
def tiny_gpu_llama():
    torch.backends.cuda.matmul.allow_tf32 = False
    return _tiny_llama(torch.float32)


@needs_cuda
def test_cuda_path_matches_the_eager_path(tiny_gpu_llama):
    """Float32 on the GPU: SDPA prefill, then captured decode steps with the fused pieces and the Triton kernel, give the
    eager path's logits (the path the CPU tests hold exact against the streaming-window ablation), batch 2."""
    from headlab.runtime import CompressedLM

    model, mask = tiny_gpu_llama, _mixed_mask(tiny_gpu_llama)
    tokens = torch.randint(0, 512, (2, 140), generator=torch.Generator().manual_seed(0)).cuda()
    eager = CompressedLM(model, mask, chunk_size=32, attention="eager").logits(tokens).float()
    fast = _decode(CompressedLM(model, mask, chunk_size=32, max_length=140), tokens, 100)
    assert rel(fast, eager) < 1e-4
    assert rel(eager, model(tokens).logits.float()) > 1e-2  # streaming heads changed the logits: not vacuous


@needs_cuda
def test_captured_decode_graph_matches_the_uncaptured_step():
    """The CUDA graph replays exactly the step it captured: same logits as running the step each time (bf16)."""
    from headlab.runtime import CompressedLM

    model = _tiny_llama(torch.bfloat16)
    mask = _mixed_mask(model)
    tokens = torch.randint(0, 512, (2, 120), generator=torch.Generator().manual_seed(1)).cuda()
    captured = CompressedLM(model, mask, chunk_size=32, max_length=120, cuda_graph=True)
    uncaptured = CompressedLM(model, mask, chunk_size=32, max_length=120, cuda_graph=False)
    a, b = _decode(captured, tokens, 60), _decode(uncaptured, tokens, 60)
    assert captured._graph is not None and uncaptured._graph is None
    assert torch.equal(a, b)


@needs_cuda
def test_a_reserved_cache_keeps_its_captured_graph_across_generates(tiny_gpu_llama):
    """`reserve`: one cache and one captured decode graph serve every `generate`, with the tokens a fresh runtime gives."""
    from headlab.runtime import CompressedLM

    model, mask = tiny_gpu_llama, _mixed_mask(tiny_gpu_llama)
    tokens = torch.randint(0, 512, (1, 140), generator=torch.Generator().manual_seed(2)).cuda()
    reserved = CompressedLM(model, mask, chunk_size=32)
    reserved.reserve(1, 140)
    graph = None
    for prompt_len in (120, 70, 130):
        expected = CompressedLM(model, mask, chunk_size=32).generate(tokens[:, :prompt_len], max_new_tokens=8, stop_at_eos=False)
        assert torch.equal(reserved.generate(tokens[:, :prompt_len], max_new_tokens=8, stop_at_eos=False), expected)
        graph = graph or reserved._graph
        assert reserved._graph is graph is not None


@needs_cuda
@pytest.mark.parametrize("name", ["norm", "add_norm", "silu_mul"])
def test_compiled_fused_pieces_match_their_eager_functions(name):
    """Each torch.compile'd piece computes what its plain function computes (float32, decode shapes)."""
    from headlab.runtime import fused

    g = torch.Generator(device="cuda").manual_seed(0)
    x, delta, w = (torch.randn(3, 1, 256, device="cuda", generator=g) for _ in range(3))
    args = {"norm": (x, w[0, 0], None, 1e-5, "rms"), "add_norm": (x, delta, w[0, 0], None, 1e-5, "rms"),
            "silu_mul": (x, delta)}[name]
    expected, got = fused.FUNCTIONS[name](*args), fused.compiled(name)(*args)
    for e, o in zip(*((t,) if isinstance(t, torch.Tensor) else t for t in (expected, got))):
        assert rel(o, e) < 1e-5


@needs_cuda
@pytest.mark.parametrize("matmul", ["cublas", "auto"])
def test_fused_decode_step_matches_the_module_step(tiny_gpu_llama, matmul, monkeypatch):
    """The fused, packed decode step (`fuse=True`; its products by cuBLAS or by the Triton matrix-vector kernel) and
    the modules' own step (`fuse=False`) give the same logits, at batch 1 and 3."""
    from headlab.runtime import CompressedLM, fused as fused_ops

    monkeypatch.setattr(fused_ops, "MATMUL", matmul)
    mask = _mixed_mask(tiny_gpu_llama)
    for batch in (1, 3):  # one row: the matrix-vector kernel (with "auto"); three: cuBLAS
        tokens = torch.randint(0, 512, (batch, 90), generator=torch.Generator().manual_seed(2)).cuda()
        plain = _decode(CompressedLM(tiny_gpu_llama, mask, chunk_size=32, max_length=90, fuse=False), tokens, 70)
        fused = _decode(CompressedLM(tiny_gpu_llama, mask, chunk_size=32, max_length=90, fuse=True), tokens, 70)
        assert rel(fused, plain) < 1e-5


def test_synthetic_prefill_leaves_the_rings_as_a_real_prefill():
    """The benchmark's `synthetic_prefill` holds the positions a real prefill holds (values aside), so a decode step
    after it reads the same bytes (CPU, "sdpa" path, a tiny random Llama)."""
    from headlab.runtime import CompressedLM
    from headlab.runtime.benchmark import info_of, llama_8b_config, random_llama, synthetic_prefill

    model = random_llama(llama_8b_config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16), device="cpu",
                         dtype=torch.float32)
    mask = HeadMask.random(info_of(model), 0.5, seed=0, sink=4, recent=20)
    real = CompressedLM(model, mask, attention="sdpa", chunk_size=16, max_length=80)
    real.forward(torch.randint(0, 100, (2, 70)))
    fake = CompressedLM(model, mask, attention="sdpa", max_length=80)
    synthetic_prefill(fake, 2, 70)
    assert fake.length == real.length == 70 and int(fake.cache.pos) == 70
    for window in real.cache.rings:
        assert torch.equal(fake.cache.rings[window].slot_pos, real.cache.rings[window].slot_pos)
    assert fake.kv_bytes() == real.kv_bytes()
    assert fake.forward(torch.tensor([[3], [4]])).shape[:2] == (2, 1)  # and decodes
