"""Linear-memory analysis passes (`headlab.longpass`): the chunked SDPA pass equals the eager forward, its pattern
rows equal the eager pattern, the retrieval, sink and attention-area scores equal the eager ones on the embedded
model, what a hook sees grows linearly with the context, and a request that cannot fit is refused up front."""
from __future__ import annotations

import pytest
import torch

import headlab as hl
from headlab import longpass
from headlab.ablation.engine import method_state
from headlab.ablation.methods import make_method
from headlab.activations import act_name, capture, capturing, layer_names, reads_only
from headlab.datasets import domains, needles
from headlab.generation import answer_budget, greedy_generate
from headlab.lab import DoesNotFitError
from headlab.scorers.attention_area import evicted_mass
from headlab.scorers.retrieval import copying_generation, sample_retrieval_score
from headlab.scorers.sinks import _layer_output_weights, domain_measures, head_sink_measures

TOL = 2e-5  # float32: the SDPA kernels and the eager matmuls round differently, nothing more


@pytest.fixture()
def small_chunks(monkeypatch):
    """Chunks of 48 tokens and pattern blocks of a few rows, so short prompts cross many chunk and block boundaries."""
    monkeypatch.setitem(longpass.CHUNK_TOKENS, "cpu", 48)
    monkeypatch.setitem(longpass.ROW_BUDGET_BYTES, "cpu", 256 << 10)


def _tokens(lab, n=2, pos=200, seed=0):
    return domains.domain_tokens(lab, "prose", n, pos, seed)


@torch.no_grad()
def test_chunked_prefill_equals_the_eager_forward_with_and_without_ablations(lab, small_chunks):
    tokens = _tokens(lab)
    intact = lab.model(tokens, return_type="logits")[:, -1]
    assert (longpass.prefill(lab, tokens).logits - intact).abs().max() < 1e-4
    window = make_method("streaming_window", sink=4, recent=16)  # edits hook_attn_scores: that layer runs eager
    mean = make_method("mean")  # edits hook_z: composes with the SDPA path
    for method, state in ((window, None), (mean, method_state(lab, mean, tokens))):
        hooks = method.hooks(lab, {5: [(slice(None), [0, 1])], 9: [(slice(None), [3])]}, state)
        with lab.model.hooks(fwd_hooks=hooks):
            ablated = lab.model(tokens, return_type="logits")[:, -1]
            chunked = longpass.prefill(lab, tokens).logits
        assert (ablated - intact).abs().max() > 0.1, method.name  # the ablation really changes the output
        assert (chunked - ablated).abs().max() < 1e-4, method.name


@torch.no_grad()
def test_pattern_rows_equal_the_eager_pattern(lab, small_chunks):
    tokens = _tokens(lab)
    names = layer_names(lab, "pattern")[::7]
    eager = capture(lab, tokens, names)
    blocks: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name):
        return reads_only(lambda act, hook=None: blocks[name].append(act.clone()))

    with lab.model.hooks(fwd_hooks=[(name, keep(name)) for name in names]):
        longpass.prefill(lab, tokens)
    for name in names:
        assert len(blocks[name]) > 2 * 5  # more blocks than chunks: chunks cut into row blocks
        pos = tokens.shape[1]
        rows = [torch.nn.functional.pad(b, (0, pos - b.shape[-1])) for b in blocks[name]]
        assert (torch.cat(rows, dim=2) - eager[name].float()).abs().max() < TOL, name


def test_attention_area_equals_the_eager_score(lab, small_chunks):
    area = hl.score(lab, "attention_area", n=2, seq_len=200, sink=4, recent=32, batch_size=2, save=False)
    tokens = domains.domain_tokens(lab, "prose", 2, 200, 0)
    names = layer_names(lab, "pattern")
    with torch.no_grad(), capturing(lab, names, lambda p: evicted_mass(p, 4, 32)) as eager:
        lab.model(tokens, return_type=None)
    want = torch.stack([eager[name] for name in names], 1).mean(0)
    assert (area.values - want).abs().max() < TOL
    assert area.values[16, 0] < 0.02 and (area.values > 0.1).any()  # the previous-token head streams, others do not


@torch.no_grad()
def test_sink_measures_equal_the_eager_ones(lab, small_chunks):
    tokens = _tokens(lab, n=3, pos=150, seed=1)
    got = domain_measures(lab, tokens, batch_size=2)
    stash = capture(lab, tokens, layer_names(lab, "pattern", "z", "v", "resid_pre"))  # one eager batch of 3
    for layer in (0, 13, 29):
        want = head_sink_measures(stash[act_name("pattern", layer)], stash[act_name("z", layer)],
                                  _layer_output_weights(lab, layer), stash[act_name("v", layer)])
        for key, value in want.items():
            assert torch.allclose(got[key][layer], value, rtol=1e-4, atol=TOL), (key, layer)
        resid = stash[act_name("resid_pre", layer)].float().norm(dim=-1)
        assert torch.allclose(got["resid_norm_sink"][layer], resid[:, 0].mean(), rtol=1e-4)
        assert torch.allclose(got["resid_norm_other"][layer], resid[:, 1:].mean(), rtol=1e-4)
    assert got["sink_mass"][20:].mean() > 0.5  # the first token is the sink in the late layers


def test_retrieval_equals_the_eager_generation(lab, small_chunks):
    sample = needles.needle_grid(lab, shape="fact", lengths=(256,), depths=(0.5,), n=1, seed=0)[0]
    budget = answer_budget(lab, sample.needle.answer)
    want_ids, rows = greedy_generate(lab, sample.tokens, budget, keep_attention=True)
    got_ids, tops = copying_generation(lab, sample.tokens, budget)
    assert got_ids == want_ids
    assert torch.equal(torch.stack(tops), torch.stack([r.argmax(-1) for r in rows]))
    prompt = sample.tokens[0].cpu()
    want = sample_retrieval_score(rows, prompt, want_ids, sample.needle_start, sample.needle_end)
    got = sample_retrieval_score(tops, prompt, got_ids, sample.needle_start, sample.needle_end)
    assert torch.equal(got, want) and got.max() > 0.25  # some head copies from the needle


def test_what_a_pattern_hook_sees_grows_linearly_with_the_context(lab, small_chunks):
    """Eager attention hands each pattern hook `[batch, head, n, n]`; the linear pass blocks of at most the row budget."""
    largest = {}
    for pos in (128, 256):
        seen = []
        hooks = [(act_name("pattern", 3), reads_only(lambda act, hook=None: seen.append(act.numel() * act.element_size())))]
        with lab.model.hooks(fwd_hooks=hooks):
            longpass.prefill(lab, _tokens(lab, n=1, pos=pos))
        largest[pos] = max(seen)
        assert sum(s for s in seen) >= 4 * lab.info.n_heads * pos * (pos + 1) / 2  # every causal entry is delivered
    assert largest[256] <= longpass.ROW_BUDGET_BYTES["cpu"] // 3
    assert largest[256] <= 2.2 * largest[128]  # linear in n (eager: 4x)


def test_requests_that_cannot_fit_are_refused_up_front(lab, monkeypatch):
    calls = []
    monkeypatch.setattr(longpass, "prefill", lambda *a, **k: calls.append(1))
    monkeypatch.setattr("headlab.lab.free_bytes", lambda device: 64 << 20)
    for kind, params in (("retrieval", {"lengths": [2048]}), ("attention_area", {"seq_len": 2048}),
                         ("sink", {"seq_len": 2048}), ("induction", {"seq_len": 1024})):
        with pytest.raises(DoesNotFitError, match=rf"{kind}.*needs about .* GiB.*only 0.06 GiB is free"):
            hl.score(lab, kind, save=False, **params)
    assert not calls  # nothing ran
    estimate = longpass.pass_bytes(lab, 8192)
    assert estimate < 0.5 * 2**30 and longpass.pass_bytes(lab, 16384) < 2.1 * estimate  # linear, and small at 8k


def test_built_in_prose_reaches_128k_token_contexts(lab):
    """Sinks and attention area read 'prose' samples: beyond the docstrings (~50k tokens) the language reference
    continues them, so a 128k-token sample is prose, not an error; shorter samples keep reading the docstrings."""
    docstrings = domains._tokenize(lab, domains.stdlib_prose())
    assert len(docstrings) < 128 * 1024 < len(domains._tokenize(lab, domains.long_prose()))
    assert domains.long_prose().startswith(domains.stdlib_prose())
