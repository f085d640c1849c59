"""Mask sources (issue 13): every registered way of choosing full KV heads gives exactly the requested budget,
DuoAttention's training really optimises its objective, and bad requests are refused before any work."""
from __future__ import annotations

import random

import pytest
import torch

from headlab.ablation import streaming_window_allowed
from headlab.mask_sources import duo, duo_gates, duo_passkeys, source_names
from headlab.mask_sources.razor import choose_echo_then_induction
from headlab.masks import HeadMask, make_mask, mask_sources, top_k_full
from headlab.runtime.weights import model_modules

WINDOW = dict(sink=4, recent=16)  # the tiny model's prompts are a few hundred tokens
TINY_DUO = dict(steps=12, context_min=160, context_max=224, num_passkeys=2, passkey_words=3)


@pytest.fixture()
def duo_folder(tmp_path, tiny_lab):
    """A DuoAttention folder for the tiny model (2 layers x 2 KV heads), gate values all distinct."""
    folder = tmp_path / "duo"
    folder.mkdir()
    (folder / "full_attention_heads.tsv").write_text("0.9\t0.2\n0.6\t0.4\n")
    (folder / "config.json").write_text('{"sink_size": 128, "recent_size": 256}')
    return folder


def test_every_source_is_registered_and_listed():
    assert mask_sources() == source_names()
    assert set(mask_sources()) >= {"score", "retrieval", "duo", "razor", "attention_area", "random", "all_streaming", "duo_file"}


SOURCES = [  # (source, its parameters): the table every budget runs through
    ("score", {"kind": "induction"}),
    ("retrieval", {"score_params": {"lengths": [64], "depths": [0.5], "n": 1}}),
    ("attention_area", {"score_params": {"n": 2, "seq_len": 64}}),
    ("razor", {"score_params": {"n": 2, "seq_len": 16}}),
    ("duo", TINY_DUO),
    ("duo_file", {}),
    ("random", {"seed": 0}),
    ("random", {"seed": 1}),
]


@pytest.mark.parametrize("full_fraction", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("source, params", SOURCES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(SOURCES)])
def test_each_source_keeps_exactly_the_budget(tiny_lab, duo_folder, source, params, full_fraction):
    if source == "duo_file":
        params = {"path": str(duo_folder)}
    mask = make_mask(tiny_lab, source, full_fraction=full_fraction, **WINDOW, **params)
    total = tiny_lab.info.n_layers * tiny_lab.info.n_kv_heads
    assert mask.n_full == round(full_fraction * total) and mask.full.shape == (2, 2)
    assert (mask.sink, mask.recent) == (WINDOW["sink"], WINDOW["recent"]) and mask.source["source"] == source
    assert mask.check(tiny_lab.info) is mask and mask.source["seconds"] is not None


def test_all_streaming_keeps_none_whatever_the_budget(tiny_lab):
    mask = make_mask(tiny_lab, "all_streaming", full_fraction=0.75, **WINDOW)
    assert mask.n_full == 0 and mask.source["source"] == "all_streaming"


def test_random_seeds_are_different_masks_and_kind_is_ignored(lab):
    a, b = (make_mask(lab, "random", kind="retrieval", full_fraction=0.5, seed=s) for s in (0, 1))
    assert a.n_full == b.n_full == 45 and not torch.equal(a.full, b.full)
    assert torch.equal(a.full, HeadMask.random(lab.info, 0.5, seed=0).full)


def test_ranked_sources_keep_their_top_kv_heads(lab):
    """On the embedded model: the retrieval source is the old score mask, and its strongest retrieval heads are in it."""
    import headlab as hl

    retrieval = make_mask(lab, "retrieval", full_fraction=0.25)
    legacy = make_mask(lab, "score", kind="retrieval", full_fraction=0.25)
    assert torch.equal(retrieval.full, legacy.full)
    for layer, head, _ in hl.score(lab, "retrieval").top(3):
        assert retrieval.full[layer, head // 3]
    area = make_mask(lab, "attention_area", full_fraction=0.25, sink=64, recent=256)
    assert area.source["params"]["sink"] == 64 and area.source["params"]["recent"] == 256  # scored at the mask's window


def test_razor_takes_echo_heads_then_induction_heads(lab):
    echo = torch.tensor([[0.9, 0.1], [0.2, 0.3]])
    induction = torch.tensor([[0.8, 0.7], [0.1, 0.6]])
    # 1 echo head (L0 KV0), then the best others by induction: L0 KV1 (0.7), L1 KV1 (0.6).
    assert choose_echo_then_induction(echo, induction, k=3, n_echo=1).tolist() == [[True, True], [False, True]]
    assert choose_echo_then_induction(echo, induction, k=2, n_echo=0).tolist() == [[True, True], [False, False]]
    mask = make_mask(lab, "razor", full_fraction=0.5)
    assert mask.n_full == 45 and mask.source["budget"]["n_echo"] == 3 and mask.source["compensate"] is True
    import headlab as hl

    best_induction = hl.score(lab, "induction").top(1)[0]
    assert mask.full[best_induction[0], best_induction[1] // 3]


def test_duo_file_is_rebudgeted_by_its_values_or_keeps_its_own_cut(tiny_lab, duo_folder):
    quarter = make_mask(tiny_lab, "duo_file", path=str(duo_folder), full_fraction=0.25, **WINDOW)
    assert quarter.full.tolist() == [[True, False], [False, False]]
    three = make_mask(tiny_lab, "duo_file", path=str(duo_folder), full_fraction=0.75, **WINDOW)
    assert three.full.tolist() == [[True, False], [True, True]]
    own = make_mask(tiny_lab, "duo_file", path=str(duo_folder), full_fraction=None, **WINDOW)
    assert own.full.tolist() == [[True, False], [True, False]] and own.source["budget"]["own_cut"]
    assert (own.sink, own.source["file_sink"], own.source["file_recent"]) == (4, 128, 256)


def test_duo_file_rejects_a_pattern_of_another_model(tiny_lab, tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("1\t0\t1\n0\t0\t1\n1\t1\t0\n")
    (tmp_path / "config.json").write_text('{"sink_size": 64, "recent_size": 256}')
    with pytest.raises(ValueError, match="mask has 3 layers, tiny-random-llama has 2; mask has 3 KV heads per layer, "
                                         "tiny-random-llama has 2"):
        make_mask(tiny_lab, "duo_file", path=str(tmp_path), full_fraction=0.5)
    with pytest.raises(ValueError, match="needs path="):
        make_mask(tiny_lab, "duo_file", full_fraction=0.5)


def test_gated_run_is_exact_at_both_ends(tiny_lab):
    """Gates at 1 give the full model (the Lab's own HF forward); gates at 0 give streaming attention everywhere,
    although the gated run skips the first sink + recent positions."""
    m = model_modules(tiny_lab.hf_model)
    tokens = torch.randint(0, 1000, (1, 96))
    sink, recent = WINDOW["sink"], WINDOW["recent"]
    full = duo_gates.teacher(m, tokens, start=sink + recent)
    with torch.no_grad():
        reference = tiny_lab.hf_model.model(tokens).last_hidden_state
        assert torch.allclose(full.hidden, reference, atol=1e-5)
        ones = duo_gates.student(m, tokens, torch.ones(2, 2), full, sink, recent)
        assert torch.allclose(ones, reference[:, sink + recent:], atol=1e-5)
        allowed = streaming_window_allowed(96, 96, sink, recent)
        streaming = duo_gates.run_layers(m, tokens, lambda i, layer, q, k, v: duo_gates.sdpa(layer, q, k, v, allowed))
        zeros = duo_gates.student(m, tokens, torch.zeros(2, 2), full, sink, recent)
        assert torch.allclose(zeros, streaming[:, sink + recent:], atol=1e-5)
        assert (zeros - ones).abs().max() > 1e-3  # streaming really differs from full


def _objective(lab, gates: torch.Tensor, seed: int) -> float:
    """DuoAttention's loss of `gates` on 4 fixed held-out samples (another seed than training's)."""
    m = model_modules(lab.hf_model)
    prompts = duo_passkeys.PasskeyPrompts(lab, TINY_DUO["num_passkeys"], TINY_DUO["passkey_words"])
    stream = duo_passkeys.sample_stream(prompts, TINY_DUO["context_min"], TINY_DUO["context_max"], seed)
    with torch.no_grad():
        return sum(float(duo.step_loss(m, next(stream), gates, WINDOW["sink"], WINDOW["recent"], 0.05)[0]) for _ in range(4)) / 4


def test_duo_training_lowers_its_loss_and_moves_its_gates(tiny_lab):
    config = duo.Duo(**TINY_DUO, init_value=0.5)
    trained = duo.train(tiny_lab, config, progress=False, **WINDOW)
    start = torch.full((2, 2), 0.5)
    assert (trained.gates - start).abs().max() > 0.05
    assert trained.gates.min() >= 0 and trained.gates.max() <= 1 and len(trained.history["loss"]) == TINY_DUO["steps"]
    assert _objective(tiny_lab, trained.gates, seed=99) < _objective(tiny_lab, start, seed=99)


@pytest.mark.parametrize("chunk", [24, 64, 1000])
def test_streamed_training_gives_the_same_loss_and_gradients(tiny_lab, chunk):
    """The streamed step (layer by layer, `chunk` positions at a time, teacher prefilled in chunks, layer inputs kept
    on the store) changes memory, not the numbers: chunks shorter than the window (24 < 4 + 16 + ...), longer, one."""
    m = model_modules(tiny_lab.hf_model)
    prompts = duo_passkeys.PasskeyPrompts(tiny_lab, TINY_DUO["num_passkeys"], TINY_DUO["passkey_words"])
    sample = next(duo_passkeys.sample_stream(prompts, TINY_DUO["context_min"], TINY_DUO["context_max"], 5))
    results = []
    for how in (duo_gates.Plan(), duo_gates.Plan(streamed=True, chunk=chunk, store="cpu")):
        gates = torch.tensor([[0.9, 0.3], [0.6, 0.1]], requires_grad=True)
        with duo.frozen(tiny_lab.hf_model):
            loss = duo.step(m, sample, gates, WINDOW["sink"], WINDOW["recent"], 0.05, how)[0]
        results.append((loss, gates.grad))
    (plain_loss, plain_grad), (streamed_loss, streamed_grad) = results
    assert plain_grad.abs().max() > 0 and torch.allclose(streamed_loss, plain_loss, rtol=1e-5)
    assert torch.allclose(streamed_grad, plain_grad, atol=1e-7, rtol=1e-4)


def test_the_chunked_teacher_equals_the_whole_prompt_teacher(tiny_lab):
    m = model_modules(tiny_lab.hf_model)
    tokens = torch.randint(0, 1000, (1, 150))
    whole = duo_gates.teacher(m, tokens, start=20)
    chunked = duo_gates.teacher(m, tokens, start=20, plan=duo_gates.Plan(streamed=True, chunk=32, store="cpu"))
    assert torch.allclose(chunked.hidden, whole.hidden, atol=1e-5)
    for name in ("attention", "keys", "values"):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(getattr(chunked, name), getattr(whole, name)))


def _llama_8b_modules():
    from types import SimpleNamespace

    return SimpleNamespace(embed=SimpleNamespace(weight=torch.empty(1, 4096, dtype=torch.bfloat16)), n_layers=32, n_heads=32,
                           n_kv_heads=8, d_head=128, layers=[SimpleNamespace(down=SimpleNamespace(in_features=14336))],
                           device=torch.device("meta"))  # a GPU's estimate: no CPU attention-backward buffers


def test_streaming_is_what_brings_128k_training_of_an_8b_model_within_kv_plus_4_gib():
    """`step_bytes` for the Llama-3.1-8B shape in bf16: plain 185 GiB at 32k (the figure of the H100 run's refusal);
    streamed at 128k the device holds the teacher's 16 GiB KV cache and under 4 GiB besides, the 64 GiB of layer
    inputs and teacher outputs go to the store (host memory on an H200: 141 GiB of HBM, 128 GiB of RAM)."""
    m = _llama_8b_modules()
    assert round(duo.step_bytes(m, 32768)[0] / 2**30, 1) == 185.0
    device, kept = duo.step_bytes(m, 131072, 4096)
    assert 16 < device / 2**30 < 16 + 4 and kept / 2**30 == 64


def test_the_plain_estimate_on_the_cpu_counts_the_attention_backward_that_grows_with_the_square_of_the_length():
    """Measured on the embedded model (float32, 2 steps, 8192 tokens): a plain step took 16.57 GiB; without the CPU's
    `[heads, length, length]` backward buffers the estimate said 11.8 (a machine with 15 GiB free would have run out)."""
    from types import SimpleNamespace

    m = SimpleNamespace(embed=SimpleNamespace(weight=torch.empty(1, 576)), n_layers=30, n_heads=9, n_kv_heads=3, d_head=64,
                        layers=[SimpleNamespace(down=SimpleNamespace(in_features=1536))], device=torch.device("cpu"))
    assert 15 < duo.step_bytes(m, 8192)[0] / 2**30 < 17
    assert duo.step_bytes(SimpleNamespace(**{**vars(m), "device": torch.device("meta")}), 8192)[0] / 2**30 < 12


@pytest.mark.parametrize("room, kept_room, expected", [(2000, 0, "plain"), (200, 100, "cpu"), (200, 10, "device"), (60, 100, "cpu"),
                                                     (60, 10, None), (40, 100, None)])
def test_the_plan_picks_plain_then_streamed_to_host_memory_then_to_the_device_then_refuses(monkeypatch, room, kept_room, expected):
    """Plain needs 1000 units, streamed 50 on the device + 100 kept (units of the prompt's length, free memory x 0.8)."""
    from types import SimpleNamespace

    length = 100
    monkeypatch.setattr(duo, "step_bytes", lambda m, n, chunk=None: (1000 * n, 0) if chunk is None else (50 * n, 100 * n))
    monkeypatch.setattr(duo, "free_bytes", lambda device: (room if device != "cpu" else kept_room) * length / 0.8)
    m = SimpleNamespace(device=torch.device("meta"))
    if expected is None:
        with pytest.raises(MemoryError, match="even streamed layer by layer: lower context_max"):
            duo.plan(m, length)
        return
    how = duo.plan(m, length)
    assert (not how.streamed) if expected == "plain" else (how.streamed and how.store == ("cpu" if expected == "cpu" else "meta"))


def test_a_length_that_fits_only_streamed_trains_streamed(tiny_lab, monkeypatch):
    monkeypatch.setattr(duo, "plan", lambda m, length: duo_gates.Plan(streamed=True, chunk=64, store="cpu"))
    used = []
    real = duo_gates.streamed_step
    monkeypatch.setattr(duo_gates, "streamed_step", lambda *a: used.append(a[-1]) or real(*a))
    trained = duo.train(tiny_lab, duo.Duo(**{**TINY_DUO, "steps": 2}), progress=False, **WINDOW)
    assert len(used) == 2 and trained.gates.shape == (2, 2) and (trained.gates < 1).any()


def test_duo_gates_are_stored_and_read_back(tiny_lab, monkeypatch):
    first = make_mask(tiny_lab, "duo", full_fraction=0.5, seed=3, **WINDOW, **TINY_DUO)
    monkeypatch.setattr(duo, "train", lambda *a, **k: pytest.fail("trained again instead of reading the stored gates"))
    again = make_mask(tiny_lab, "duo", full_fraction=0.25, seed=3, **WINDOW, **TINY_DUO)
    assert again.source["values"] == first.source["values"] and again.n_full == 1
    assert torch.equal(again.full, top_k_full(torch.tensor(first.source["values"]), 1))


@pytest.mark.parametrize("source, params, error, message", [
    ("duo", {"context_max": 4096, "context_min": 512}, ValueError, "longer than tiny-random-llama's context of 2048"),
    ("duo", {"context_min": 20, "context_max": 200}, ValueError, r"context_min \(20\) must exceed sink \+ recent"),
    ("duo", {"context_min": 64, "context_max": 200, "num_passkeys": 4, "passkey_words": 8}, ValueError, "passkeys of 8 words"),
    ("duo", {"context_min": 300, "context_max": 200}, ValueError, "above context_max"),
    ("duo", {"steps": 0}, ValueError, "steps must be at least 1"),
    ("random", {"threshold": 0.1}, ValueError, "no single value per KV head"),
    ("razor", {"full_fraction": None}, ValueError, "give full_fraction"),
    ("retrieval", {"full_fraction": None}, ValueError, "no cut of its own"),
    ("razor", {"echo_share": 2.0}, ValueError, "echo_share must be in"),
    ("random", {"steps": 3}, TypeError, r"takes no parameter \['steps'\]"),
    ("attention_area", {"score_params": {"sink": 3}}, ValueError, "the mask's own window"),
    ("nonsense", {}, KeyError, "Known sources: all_streaming"),
])
def test_requests_that_cannot_fit_are_refused_before_any_work(tiny_lab, monkeypatch, source, params, error, message):
    monkeypatch.setattr(duo, "train", lambda *a, **k: pytest.fail("training started for a refused request"))
    with pytest.raises(error, match=message):
        make_mask(tiny_lab, source, **{**WINDOW, **params})


def test_passkey_samples_have_the_length_and_answers_asked_for(lab):
    prompts = duo_passkeys.PasskeyPrompts(lab, num_passkeys=3, passkey_words=5)
    sample = prompts.sample(700, random.Random(0))
    text = lab.tokenizer.decode(sample.tokens[0])
    answers = lab.tokenizer.decode(sample.tokens[0, sample.labels])
    assert sample.tokens.shape == (1, 700) and sample.labels.sum() < 200
    for ordinal, key in zip(("first", "second", "third"), sample.passkeys):
        assert len(key.split()) == 5 and text.count(key) == 2  # hidden in the book, then answered
        assert f"the {ordinal} passkey to the vault?\nPasskey: {key}" in answers
    assert duo_passkeys.lengths(1024, 1536)[:2] == [1024, 1034] and len(duo_passkeys.lengths(1024, 1536)) == 50


def test_export_mask_reaches_a_source_and_its_generated_flags(lab, tmp_path, monkeypatch, capsys):
    import headlab as hl
    from headlab import cli

    monkeypatch.setattr(hl, "load", lambda *args, **kwargs: lab)
    published = HeadMask.random(lab.info, 0.5, seed=7).save_duo(tmp_path / "published")
    out = tmp_path / "mask.json"
    argv = ["export-mask", "--source", "duo_file", "--path", str(published), "--full-fraction", "0.25", "--out", str(out)]
    assert cli.main(argv) == 0
    mask = HeadMask.load(out, info=lab.info)
    assert mask.n_full == 22 and mask.source["source"] == "duo_file" and mask.source["params"]["path"] == str(published)
    assert cli.main(["export-mask", "--source", "random", "--steps", "3", "--out", str(out)]) == 2
    assert "--steps is not a parameter of mask source 'random'; it takes --seed" in capsys.readouterr().err
    assert cli.main(["export-mask", "--source", "duo", "--context-min", "100", "--out", str(out)]) == 2
    assert "context_min (100) must exceed sink + recent (64 + 256)" in capsys.readouterr().err


@pytest.mark.parametrize("row", ["llama3", "mistral", "qwen3", "phi3", "olmo2", "gpt_neox", "gpt_neox_sequential"])
def test_streamed_training_is_exact_for_every_family_duo_trains(row):
    """The streamed step's layer-by-layer, window-by-window recomputation reproduces the plain pass's loss and gate
    gradients on each family's quirks (q/k norms, fused projections, partial rotary, parallel residual, norm placement)."""
    from types import SimpleNamespace

    from test_runtime_families import COMMON, build

    m = model_modules(build(row))
    labels = torch.zeros(120, dtype=torch.bool)
    labels[-12:] = True
    sample = SimpleNamespace(tokens=torch.randint(0, COMMON["vocab_size"], (1, 120), generator=torch.Generator().manual_seed(1)),
                             labels=labels)
    results = []
    for how in (duo_gates.Plan(), duo_gates.Plan(streamed=True, chunk=24, store="cpu")):
        gates = torch.linspace(0.1, 0.9, m.n_layers * m.n_kv_heads).view(m.n_layers, m.n_kv_heads).requires_grad_(True)
        loss = duo.step(m, sample, gates, WINDOW["sink"], WINDOW["recent"], 0.05, how)[0]
        results.append((loss, gates.grad))
    (plain_loss, plain_grad), (streamed_loss, streamed_grad) = results
    assert plain_grad.abs().max() > 0 and torch.allclose(streamed_loss, plain_loss, rtol=1e-5)
    assert torch.allclose(streamed_grad, plain_grad, atol=1e-6, rtol=1e-4)
