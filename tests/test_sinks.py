"""Sink heads: the dormant/active classification on hand-built activations, and what the embedded model does."""
from __future__ import annotations

import pytest
import torch

import headlab as hl
from headlab.datasets import domains
from headlab.scorers.sinks import (
    classify_dormant, dormancy, dormancy_figure, head_sink_measures, relative_output, sink_summary, switching_frame,
    switching_heads, top_switching,
)


def _hand_built_layer():
    """Two heads over 5 positions: head 0 looks only at the sink (whose value is 0), head 1 at itself."""
    pos, d_head, d_model = 5, 4, 6
    pattern = torch.zeros(1, 2, pos, pos)
    pattern[0, 0, :, 0] = 1.0
    pattern[0, 1] = torch.eye(pos)
    v = torch.ones(1, pos, 2, d_head)
    v[0, 0] = 0.0  # value-state drain: the sink's value is zero
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    w_o = torch.ones(2, d_head, d_model)
    return pattern, z, w_o, v


def test_measures_on_hand_built_attention():
    m = head_sink_measures(*_hand_built_layer())
    assert m["sink_mass"].tolist() == [1.0, 0.0]
    assert m["output_norm"][0] == 0 and m["output_norm"][1] > 0
    assert torch.allclose(m["value_ratio"], torch.zeros(2))


def test_classification_and_switching_on_hand_built_measures():
    # [domain, layer, head]: two domains, one layer, three heads.
    sink_mass = torch.tensor([[[0.95, 0.9, 0.1]], [[0.97, 0.2, 0.1]]])
    output_norm = torch.tensor([[[0.1, 0.2, 5.0]], [[0.1, 4.0, 5.0]]])
    rel = relative_output(output_norm, quantile=1.0)  # reference = the layer's largest output, 5.0
    assert torch.allclose(rel[0, 0], torch.tensor([0.02, 0.04, 1.0]))
    dormant = classify_dormant(sink_mass, rel, mass_threshold=0.5, output_threshold=0.3)
    assert dormant[:, 0].tolist() == [[True, True, False], [True, False, False]]
    assert switching_heads(dormant, ["code", "prose"]) == [
        {"layer": 0, "head": 1, "dormant_on": ["code"], "active_on": ["prose"]}
    ]
    score = dormancy(sink_mass, rel)
    assert score[0, 0, 0] > 0.9 and score[0, 0, 2] == 0


def test_domains_are_reproducible_and_of_fixed_length(lab):
    for name in domains.BUILTIN_DOMAINS:
        a = domains.domain_tokens(lab, name, 2, 64, seed=3)
        assert a.shape == (2, 64) and (a[:, 0] == lab.bos_token_id).all(), name
        assert torch.equal(a, domains.domain_tokens(lab, name, 2, 64, seed=3)), name
    assert not torch.equal(domains.domain_tokens(lab, "prose", 2, 64, 0), domains.domain_tokens(lab, "prose", 2, 64, 1))
    own = domains.domain_tokens(lab, "mine", 1, 16, 0, texts={"mine": "word " * 40})
    assert own.shape == (1, 16)


def test_bad_domains_are_clear_errors(lab):
    with pytest.raises(KeyError, match="Unknown input domain 'poetry'"):
        domains.domain_tokens(lab, "poetry", 1, 32, 0)
    with pytest.raises(domains.EmptyTextError, match="empty"):
        domains.domain_tokens(lab, "mine", 1, 32, 0, texts={"mine": ""})
    with pytest.raises(domains.EmptyTextError, match="need at least"):
        domains.domain_tokens(lab, "mine", 1, 32, 0, texts={"mine": "two words"})
    with pytest.raises(ValueError, match="not among the scored domains"):
        hl.score(lab, "sink", domain="code", domains=["prose"], save=False)


@pytest.fixture(scope="module")
def sink_scores(lab) -> hl.HeadScores:
    return hl.score(lab, "sink", domain="prose")  # default parameters, as the app and analysis use


def test_sink_score_shapes(lab, sink_scores):
    names = sink_scores.meta["domains"]
    assert names == list(domains.BUILTIN_DOMAINS)
    assert sink_scores.values.shape == (lab.info.n_layers, lab.info.n_heads)
    assert sink_scores.raw["sink_mass"].shape == (len(names), lab.info.n_layers, lab.info.n_heads)
    assert sink_scores.raw["resid_norm_sink"].shape == (len(names), lab.info.n_layers)
    assert torch.equal(sink_scores.values, sink_scores.raw["dormancy"][names.index("prose")])
    stored = hl.score(lab, "sink", domain="prose")  # read back from the store
    assert torch.equal(stored.raw["dormant"], sink_scores.raw["dormant"])


def test_the_first_token_is_the_sink_on_prose(lab, sink_scores):
    """The first token is the most-attended key of most heads. It does not take *most* of their
    attention: the mean mass is ~0.36 and a third of the heads put more than half on it (see report)."""
    tokens = domains.domain_tokens(lab, "prose", 2, 256, seed=0)
    names = {f"blocks.{l}.attn.hook_pattern" for l in range(lab.info.n_layers)}
    _, cache = lab.model.run_with_cache(tokens, names_filter=lambda n: n in names)
    # mean attention each key receives from the queries after it, per head: is key 0 the top key?
    top_is_sink = []
    for name in names:
        pattern = cache[name][:, :, 1:].float()  # [batch, head, q, k]
        received = pattern.sum(2) / torch.arange(tokens.shape[1], 0, -1).clamp(max=tokens.shape[1] - 1)
        top_is_sink.append(received.mean(0).argmax(-1) == 0)
    assert torch.cat(top_is_sink).float().mean() > 0.5
    prose = sink_scores.raw["sink_mass"][0]
    assert prose.mean() > 0.25 and (prose > 0.5).float().mean() > 0.25
    # in the later half of the model the sink is far stronger than in the first layers
    assert prose[15:].mean() > prose[:3].mean()


def test_value_state_drain_and_residual_peak(sink_scores):
    ratio = sink_scores.raw["value_ratio"]  # [domain, layer, head]
    assert ratio.median() < 0.5  # the sink's values are small
    peak = sink_scores.raw["resid_norm_sink"] / sink_scores.raw["resid_norm_other"]  # [domain, layer]
    assert peak[:, 12:20].min() > 20  # a massive residual norm at the sink from the middle layers on


def test_some_heads_switch_between_domains(sink_scores):
    switching = sink_scores.meta["switching_heads"]
    assert len(switching) >= 1
    dormant = sink_scores.raw["dormant"].bool()
    for row in switching:
        column = dormant[:, row["layer"], row["head"]]
        assert column.any() and not column.all()
    assert top_switching(sink_scores, 3)


def test_sink_views_name_heads_one_way(lab, sink_scores):
    figure = dormancy_figure(sink_scores)
    assert len(figure.data[0].y) == lab.info.n_layers * lab.info.n_heads and figure.data[0].y[0] == "L0H0"
    table = switching_frame(sink_scores)
    assert len(table) == len(sink_scores.meta["switching_heads"])
    assert table["head"].tolist()[:3] == [f"L{l}H{h}" for l, h in top_switching(sink_scores, 3)]
    assert table["domain dependence"].is_monotonic_decreasing
    wide = switching_frame(sink_scores, 2, per_domain=True)
    assert len(wide) == 2 and "dormancy code" in wide.columns
    assert "switch" in sink_summary(sink_scores)


def test_sinks_tab_builds_and_renders(lab, sink_scores):
    import gradio as gr

    from app import sinks_tab
    from app.workbench import Workbench

    bench = Workbench(lab)
    with gr.Blocks():
        tab = sinks_tab.build_sinks_tab(bench, "lab")
    assert tab.n.value == 4  # the scorer's default: the stored run answers the first view
    assert torch.equal(sinks_tab.sink_scores(bench, 4, 0).raw["dormancy"], sink_scores.raw["dormancy"])
    view = sinks_tab.head_view(bench, "16.4", "code", 0)
    assert view.startswith("<h4>L16H4 on code</h4><iframe")
