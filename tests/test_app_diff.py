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
    listing, summary, weights, heads, scores, moved, behaviour, behaviour_table, download = tab.first_view()
    top = head_label(*shipped.changed_heads(1)[0])
    assert "embedded-refusal" not in bench.pool.keys()  # model B was not loaded
    assert listing["value"] in listing["choices"] and "shipped" in listing["value"]
    assert f"most changed **{top}**" in summary and "SmolLM2-135M-Instruct-refusal" in summary
    assert heads.loc[0, "head"] == top and len(heads) == shipped.top
    assert [trace.type for trace in weights.data] == ["heatmap"] * 3
    assert set(moved["kind"]) == set(shipped.scores) and behaviour is not None
    assert list(behaviour_table["model"]) == [shipped.model_a, shipped.model_b]
    assert json.loads(Path(download).read_text())["record"] == "model_diff"  # the diff downloads as JSON


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
