"""The shipped runs in cached_runs/ answer the app's first views: with the repository's store and computing
forbidden, every score kind's default run is found and every tab's default button reads its result."""
from __future__ import annotations

import pytest
from gradio_client import Client

import headlab as hl
from headlab import store

# Each tab's first view, called with the form's defaults (gradio_client fills them in).
FIRST_VIEWS = ["/stored_atlas", "/ablation_curve", "/retrieval", "/retrieval_curve", "/sinks", "/successor",
               "/select_copy", "/composition_map", "/channel_experiment"]


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


def test_every_score_kind_ships_its_default_run(lab, shipped_store_only):
    missing = [kind for kind in hl.kinds() if hl.stored(lab, kind) is None]
    assert not missing, f"no shipped default run for {missing}: run `make cache`"
    assert hl.score(lab, "induction").top_heads(1) == [(18, 6)]  # read, not computed (computing would raise)


def test_the_first_views_read_the_shipped_runs(lab, serve_app, shipped_store_only):
    failed = {}
    with serve_app(lab) as url:  # built on the shipped store, as `make app` opens it
        client = Client(url, verbose=False)
        for endpoint in FIRST_VIEWS:
            try:
                client.predict(api_name=endpoint)
            except Exception as err:  # an AppError when the view tried to compute
                failed[endpoint] = str(err)
    assert not failed, failed
