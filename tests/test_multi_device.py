"""A model sharded with a `device_map` (`hl.load(..., device_map=...)`, `headlab.placement`) computes what the
single-device model computes, on the CPU: the embedded model is loaded through accelerate's dispatch with every layer
placed by `balanced_device_map` on "cpu", and the compressed runtime's per-device code runs with its layers split over
two distinct CPU devices ("cpu" and "cpu:0": the same memory, different keys), so every per-device structure (caches,
positions, rings, the hidden state's hand-over) is exercised. Multi-GPU runs are in analyses/runtime_benchmark.py."""
from __future__ import annotations

import pytest
import torch

import headlab as hl
from headlab import placement
from headlab.loading import ModelLoadError
from headlab.masks import HeadMask
from headlab.runtime import CompressedLM
from headlab.runtime.benchmark import llama_8b_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = ("The old lighthouse stood on a rock two miles from the harbour. Its keeper, a retired sailor named Tomas, "
        "climbed the ninety-one steps every evening to light the lamp, and wrote the weather in a green notebook.")
N_TOKENS = 48  # a multiple of PAGE: the eager path's pages then hold exactly the ideal
SINK, RECENT, CHUNK, PAGE = 4, 16, 20, 8  # the ring wraps, chunks cross page boundaries


@pytest.fixture(scope="module")
def sharded(lab) -> hl.Lab:
    return hl.load("embedded", device_map=placement.balanced_device_map(lab.hf_model, ["cpu", "cpu"]))


@pytest.fixture(scope="module")
def tokens(lab) -> torch.Tensor:
    return lab.to_tokens(TEXT)[:, :N_TOKENS]


def split_in_two(layer_devices):
    """`placement.layer_devices` as if layers 0-14 were on "cpu" and 15-29 on "cpu:0" (tensors on either are CPU
    tensors: the runtime keeps per-device caches and state apart by the device it is told)."""

    def split(hf_model):
        devices = layer_devices(hf_model)
        half = len(devices) // 2
        return [torch.device("cpu")] * half + [torch.device("cpu", 0)] * (len(devices) - half)

    return split


def test_the_sharded_load_is_dispatched_and_keeps_the_results_key(lab, sharded):
    mapped = sharded.hf_model.hf_device_map
    assert {f"model.layers.{i}" for i in range(lab.info.n_layers)} <= set(mapped)
    assert hasattr(placement.decoder_layers(sharded.hf_model)[0][1], "_hf_hook")  # accelerate's hooks are on
    assert sharded.placement == {"cpu": list(range(lab.info.n_layers))}
    assert sharded.model.cfg.n_devices == 1 and sharded.device == "cpu"
    assert sharded.info == lab.info and sharded.info.slug == lab.info.slug  # the same stored runs


def test_scores_and_logits_equal_the_single_device_run(lab, sharded, tokens):
    with torch.no_grad():
        assert torch.equal(sharded.model(tokens), lab.model(tokens))
    ours = hl.score(sharded, "induction", n=4, recompute=True, save=False)
    theirs = hl.score(lab, "induction", n=4, recompute=True, save=False)
    assert torch.allclose(ours.values, theirs.values, atol=1e-6)
    assert ours.top(1)[0][:2] == (18, 6)  # the known induction head


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_compressed_runtime_on_two_devices_matches_one(lab, sharded, tokens, monkeypatch, attention):
    mask = HeadMask.random(lab.info, 0.5, seed=0, sink=SINK, recent=RECENT)
    max_length = N_TOKENS + 4 if attention == "sdpa" else None
    one = CompressedLM(lab.hf_model, mask, chunk_size=CHUNK, page_size=PAGE, attention=attention, max_length=max_length)
    monkeypatch.setattr(placement, "layer_devices", split_in_two(placement.layer_devices))
    two = CompressedLM(sharded, mask, chunk_size=CHUNK, page_size=PAGE, attention=attention, max_length=max_length)
    assert two.sharded and not one.sharded and not two.cuda_graph
    assert torch.equal(two.logits(tokens), one.logits(tokens))
    assert torch.equal(two.generate(tokens, max_new_tokens=4), one.generate(tokens, max_new_tokens=4))
    two.logits(tokens)  # prefill only: the eager pages hold exactly N_TOKENS positions
    held, length = two.kv_bytes_by_device(), max_length or N_TOKENS
    assert list(held) == ["cpu", "cpu:0"]
    assert held == placement.ideal_kv_bytes_by_device(mask, two.devices, length, 4, lab.info.d_head)
    assert sum(held.values()) == two.kv_bytes() == mask.ideal_kv_bytes(length, 4, lab.info.d_head)
    for layer, cache in enumerate(two.cache.layers):  # each layer's cache made for its layer's device
        device = torch.device("cpu") if layer < 15 else torch.device("cpu", 0)
        if attention == "sdpa":
            assert cache.device == device and cache.ring is two.cache.states[device].rings[cache.ring.window]
        else:
            assert cache.full.device == cache.streaming.device == device


def test_the_transformers_cache_on_a_dispatched_model(lab, sharded, tokens):
    """`CompressedKVCache` (on plain transformers models: the bridge computes attention itself) through accelerate's
    hooks: the same tokens as on the undispatched model, its pages counted per device."""
    from transformers import AutoModelForCausalLM

    from headlab.loading import embedded_folder
    from headlab.runtime.hf import CompressedKVCache, compressed_attention

    def plain(**placed):
        return AutoModelForCausalLM.from_pretrained(embedded_folder(), dtype=torch.float32, attn_implementation="eager",
                                                    **placed).eval()

    mapped = sharded.hf_model.hf_device_map
    dispatched = placement.dispatch(plain(device_map=mapped), mapped)
    assert dispatched.hf_device_map == mapped
    mask = HeadMask.random(lab.info, 0.5, seed=0, sink=SINK, recent=RECENT)
    outs = []
    for model in (plain(), dispatched):
        cache = CompressedKVCache(mask, page_size=PAGE)
        with torch.no_grad(), compressed_attention(model):
            outs.append(model.generate(tokens, past_key_values=cache, max_new_tokens=4, do_sample=False))
    assert torch.equal(outs[0], outs[1])
    assert cache.kv_bytes_by_device() == {"cpu": cache.kv_bytes()} and cache.kv_bytes() > 0


def test_a_device_map_naming_a_missing_device_is_refused():
    missing = torch.cuda.device_count() + 7 if torch.cuda.is_available() else 7
    with pytest.raises(ModelLoadError, match=f"cuda:{missing}.*(no CUDA device|CUDA device\\(s\\))"):
        hl.load("embedded", device_map={"": f"cuda:{missing}"})
    with pytest.raises(ModelLoadError, match="does not offload to disk or meta.*bfloat16"):
        hl.load("embedded", device_map={"model": "cpu", "lm_head": "disk"})
    with pytest.raises(ModelLoadError, match="not both"):
        hl.load("embedded", device="cpu", device_map="auto")
    if torch.cuda.device_count() < 2:
        with pytest.raises(ModelLoadError, match="n_devices=2"):
            hl.load("embedded", n_devices=2)


def test_balanced_device_map_splits_layers_evenly_embedding_first_head_last(lab):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(llama_8b_config(num_hidden_layers=6))
    mapped = placement.balanced_device_map(model, [0, "cuda:1", 2])
    assert [mapped[f"model.layers.{i}"] for i in range(6)] == ["cuda:0"] * 2 + ["cuda:1"] * 2 + ["cuda:2"] * 2
    assert mapped["model.embed_tokens"] == mapped["model.rotary_emb"] == "cuda:0"
    assert mapped["model.norm"] == mapped["lm_head"] == "cuda:2"
    tied = placement.balanced_device_map(lab.hf_model, ["cuda:0", "cuda:1"])  # SmolLM2 ties lm_head to the embedding
    assert tied["lm_head"] == tied["model.embed_tokens"] == "cuda:0" and tied["model.norm"] == "cuda:1"
    assert [tied[f"model.layers.{i}"] for i in (0, 14, 15, 29)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_the_cli_takes_a_device_map(capsys):
    from headlab.cli import main

    assert main(["score", "induction", "--n", "2", "--recompute", "--device-map", '{"": "cpu"}', "--json"]) == 0
    assert main(["score", "induction", "--device-map", '{"": "cuda:7"}']) == 2
    assert "cuda:7" in capsys.readouterr().err
