"""The Compare models tab (`app/diff_tab.py`): opens on the shipped embedded -> embedded-refusal diff computing and
loading nothing, and its job diffs the visitor's model against a second model typed by name."""
from __future__ import annotations

import copy
import json
import importlib
from pathlib import Path

import gradio as gr
import pytest
import torch

import headlab as hl
from app.diff_tab import build_diff_tab
from app.main import MODEL_TABS
from app.pool import ModelPool
from app.workbench import Workbench
from headlab import store
from headlab.heads import head_label

diff_module = importlib.import_module("headlab.diff")  # the package (`headlab.diff` the attribute is the function)


def built(bench: Workbench):
    with gr.Blocks() as demo:
        tab = build_diff_tab(bench, "jobs")
    return demo, tab


def handler(demo: gr.Blocks, api_name: str):
    return next(fn.fn for fn in demo.fns.values() if fn.api_name == api_name)


def test_the_tab_is_registered():
    assert ("Compare models", "diff", build_diff_tab) in MODEL_TABS


def test_first_view_shows_the_shipped_pair_computing_nothing(lab, monkeypatch):
    shipped = diff_module.stored_diff("embedded", "embedded-refusal")
    assert shipped is not None, "the shipped embedded -> embedded-refusal diff is missing: run analyses/model_diff.py"

    def refuse(*args, **kwargs):
        raise AssertionError("the first view computed")

    monkeypatch.setattr(store, "cached_run", refuse)
    monkeypatch.setattr(diff_module, "_compute", refuse)
    bench = Workbench(lab, None)
    _, tab = built(bench)
    listing, summary, weights, heads, scores, moved, behaviour, behaviour_table, download, details, shown = tab.first_view()
    top = head_label(*shipped.changed_heads(1)[0])
    assert "embedded-refusal" not in bench.pool.keys()  # model B was not loaded
    assert listing["value"] in listing["choices"] and "shipped" in listing["value"]
    assert f"most changed **{top}**" in summary and "SmolLM2-135M-Instruct-refusal" in summary
    assert heads.loc[0, "head"] == top and len(heads) == shipped.top
    assert [trace.type for trace in weights.data] == ["heatmap"] * 3
    assert set(moved["kind"]) == set(shipped.scores) and behaviour is not None
    assert list(behaviour_table["model"]) == [shipped.model_a, shipped.model_b]
    assert json.loads(Path(download).read_text())["record"] == "model_diff"  # the diff downloads as JSON
    assert "Click a head" in details and torch.equal(shown.qk, shipped.qk)  # the diff shown, which a chosen head reads


def test_a_head_chosen_on_the_maps_shows_its_numbers_in_both_models(lab):
    """What a click on a weight or score map cell (or a table row) shows beside the map: `head_in_both`, after the
    linked views outline the head on both maps."""
    from app.diff_tab import head_in_both
    from app.views import outlined
    from gradio.components.plot import PlotData

    shipped = diff_module.stored_diff("embedded", "embedded-refusal")
    (layer, head), = shipped.changed_heads(1)
    label, row = head_label(layer, head), shipped.to_frame().set_index("head").loc[head_label(layer, head)]
    text = head_in_both(shipped, f"{layer}.{head}")
    assert text.startswith(f"**{label}** (change rank 1 of 270): QK circuit changed by {row['qk']:.4f}, OV circuit by {row['ov']:.4f}")
    assert f"Scores in A ({shipped.model_a}) → B ({shipped.model_b}):" in text
    for kind in shipped.scores:
        assert (f"- **{kind}**: {row[f'{kind}_a']:.3f} (rank {int(row[f'{kind}_rank_a'])}) → {row[f'{kind}_b']:.3f} "
                f"(rank {int(row[f'{kind}_rank_b'])}), B − A {row[f'{kind}_delta']:+.3f}") in text
    assert "no diff shown yet" in head_in_both(None, label)
    kind = next(iter(shipped.scores))
    figure = json.loads(outlined(PlotData(type="plotly", plot=shipped.score_figure(kind).to_json()), label).plot)
    (outline,) = figure["layout"]["shapes"]  # the score map outlines the same head
    assert (outline["x0"] + 0.5, outline["y0"] + 0.5) == (head, layer)


@pytest.fixture()
def tiny_pair(tiny_lab):
    """tiny_lab (A) and a copy with one head's query weights changed (B), B loadable by the name 'tiny-b'."""
    model = copy.deepcopy(tiny_lab.hf_model)
    head_dim = model.config.head_dim
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[3 * head_dim:4 * head_dim] *= 3.0  # layer 1, head 3
    lab_b = hl.from_model(model, tiny_lab.tokenizer, "tiny-random-llama-edited")
    return tiny_lab, lab_b


def test_the_job_diffs_the_visitors_model_against_a_typed_model(tiny_pair):
    lab_a, lab_b = tiny_pair
    bench = Workbench(lab_a, pool=ModelPool(loader=lambda name: lab_b if name == "tiny-b" else hl.load(name)))
    demo, tab = built(bench)
    run = handler(demo, "diff")
    config = [component.value for component in tab.config]  # the form's defaults, read from DiffConfig
    config[[c.elem_id for c in tab.config].index("diff-behaviour")] = False  # weights only: seconds on the CPU
    config[[c.elem_id for c in tab.config].index("diff-kinds")] = []
    listing, summary, weights, heads, *_ = run("tiny-b", *config, progress=lambda *a, **k: None)
    assert heads.loc[0, "head"] == "L1H3" and "most changed **L1H3**" in summary
    assert listing["value"] in listing["choices"]  # the new run is listed and chosen
    with pytest.raises(gr.Error, match="Type model B"):
        run("  ", *config, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="top must be from 1"):
        run("tiny-b", *[0 if c.elem_id == "diff-top" else v for c, v in zip(tab.config, config)], progress=lambda *a, **k: None)
