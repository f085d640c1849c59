"""The shipped runs in cached_runs/ answer the app's first views: with the repository's store and computing
forbidden, every score kind's default run is found and every tab's default button reads its result."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client

import headlab.needle_grid
import headlab as hl
import headlab.scorers.retrieval
from headlab import store

# Each tab's first view, called with the form's defaults (gradio_client fills them in).
FIRST_VIEWS = ["/stored_atlas", "/ablation_curve", "/retrieval", "/needle_accuracy", "/retrieval_curve", "/sinks",
               "/successor", "/select_copy", "/composition_map", "/channel_experiment"]
# What every tab shows when a page opens (and when the visitor's model changes): stored results only.
OPENING_VIEWS = ["/first_atlas", "/first_ablate", "/first_retrieval", "/first_sinks", "/first_successor",
                 "/first_select_copy", "/first_safety", "/first_channels", "/first_runtime",
                 "/first_compare_masks", "/first_diff"]


@pytest.fixture()
def shipped_store_only(monkeypatch):
    """The repository's cached_runs/ as the store, and any run missing from it an error instead of a computation."""
    monkeypatch.setenv("HEADLAB_RUNS", str(store.REPO_RUNS))
    read = store.cached_run

    def read_only(path, load, compute, **kwargs):
        if not path.exists() or kwargs.get("recompute"):
            raise AssertionError(f"{path.name} is not shipped: the view would compute it")
        return read(path, load, compute, **kwargs)

    monkeypatch.setattr(store, "cached_run", read_only)

    def no_grid(*args, **kwargs):
        raise AssertionError("the Retrieval grid would be computed")

    for module in (headlab.needle_grid, headlab.scorers.retrieval):
        monkeypatch.setattr(module, "needle_accuracy", no_grid)


def test_every_score_kind_ships_its_default_run(lab, shipped_store_only):
    missing = [kind for kind in hl.kinds() if hl.stored(lab, kind) is None]
    assert not missing, f"no shipped default run for {missing}: run `make cache`"
    assert hl.score(lab, "induction").top_heads(1) == [(18, 6)]  # read, not computed (computing would raise)


def test_the_first_views_read_the_shipped_runs(lab, serve_app, shipped_store_only):
    failed = {}
    with serve_app(lab) as url:  # built on the shipped store, as `make app` opens it
        client = Client(url, verbose=False)
        for endpoint in FIRST_VIEWS + OPENING_VIEWS:
            try:
                client.predict(api_name=endpoint)
            except Exception as err:  # an AppError when the view tried to compute
                failed[endpoint] = str(err)
    assert not failed, failed


def test_every_tab_opens_filled_from_the_shipped_runs(lab, serve_app, shipped_store_only):
    """Each tab's opening view, with the form's defaults, shows a stored result (a figure or a table), computing nothing."""
    with serve_app(lab) as url:
        client = Client(url, verbose=False)
        empty = [endpoint for endpoint in OPENING_VIEWS
                 if not any(isinstance(value, dict) and (value.get("type") == "plotly" or value.get("data")) for value in client.predict(api_name=endpoint))]
    assert not empty, f"opened without a stored result: {empty}"


def test_the_retrieval_grid_button_reads_the_shipped_grid(lab, serve_app, shipped_store_only):
    """"Accuracy intact vs ablated" with the form's defaults reads the grid `make cache` ships (computing it takes minutes)."""
    with serve_app(lab) as url:
        figure, summary, grid_json = Client(url, verbose=False).predict(api_name="/needle_accuracy")
    record = json.loads(Path(grid_json).read_text())
    assert "read from the store" in summary and figure["type"] == "plotly"
    assert record["record"] == "needle_accuracy" and record["params"]["scores"]["params"] == hl.stored(lab, "retrieval").params
    intact, ablated = record["grid"]["intact"], record["grid"]["ablated"]
    assert sum(map(sum, intact)) > sum(map(sum, ablated))  # the top retrieval heads ablated lose the needle


# What each tab's opening view offers as JSON (each stored result it shows, as its record; the base model has a
# shipped Ships run but no stored refusal check or outcome study: those ship for embedded-refusal).
DOWNLOADS = {"/first_atlas": 1, "/first_ablate": 1, "/first_retrieval": 3, "/first_sinks": 1, "/first_successor": 2,
             "/first_select_copy": 1, "/first_safety": 1, "/first_channels": 2, "/first_compare_masks": 1, "/first_diff": 1}


def test_every_stored_result_shown_downloads_as_json(lab, serve_app, shipped_store_only):
    with serve_app(lab) as url:
        client = Client(url, verbose=False)
        found = {endpoint: [json.loads(Path(value).read_text()) for value in client.predict(api_name=endpoint)
                            if isinstance(value, str) and value.endswith(".json") and Path(value).is_file()]
                 for endpoint in DOWNLOADS}
    assert {endpoint: len(records) for endpoint, records in found.items()} == DOWNLOADS
    for records in found.values():
        assert all(record["format"].startswith("headlab.") and "raw_file" not in record for record in records)
    composition = next(r for r in found["/first_channels"] if r["record"] == "composition_map")
    assert len(composition["tensors"]["values"]) == lab.info.n_layers  # the numbers travel in the JSON itself
