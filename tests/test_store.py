"""HeadScores round-trip through the store; writes are atomic; hl.score reads the store first."""
from __future__ import annotations

import json

import pytest
import torch

import headlab as hl
from headlab import store
from headlab.scorers import scorer_class


def _scores() -> hl.HeadScores:
    values = torch.rand(4, 3)
    return hl.HeadScores("induction", "Tiny Model", {"n": 2, "seed": 1}, values, raw={"per_sample": torch.rand(2, 4, 3)})


def test_round_trip(tmp_path):
    scores = _scores()
    path = scores.save(tmp_path / "run.json")
    back = hl.HeadScores.load(path)
    assert back.kind == "induction" and back.model == "Tiny Model" and back.params == {"n": 2, "seed": 1}
    torch.testing.assert_close(back.values, scores.values)
    torch.testing.assert_close(back.raw["per_sample"], scores.raw["per_sample"])
    assert back.top(2) == scores.top(2)
    frame = back.to_frame()
    assert list(frame.columns) == ["layer", "head", "value", "rank"] and len(frame) == 12
    assert frame.iloc[0]["value"] == scores.values.max().item()
    assert back.heatmap().data[0].z.shape == (4, 3)


def test_default_path_is_model_slug_kind_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path))
    path = _scores().save()
    assert path.parent == tmp_path / "tiny-model"
    assert path.name == f"induction-{store.params_hash({'n': 2, 'seed': 1})}.json"
    assert store.list_runs()[0]["kind"] == "induction"


def test_a_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    store.write_json(path, {"a": 1})

    def broken_dump(obj, fh, **kw):
        fh.write('{"half": ')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        store.write_json(path, {"a": 2})
    monkeypatch.undo()
    assert store.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left behind


def test_not_a_scores_file_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"format": "something/else"}')
    with pytest.raises(ValueError, match="not a headlab head-scores file"):
        hl.HeadScores.load(path)


def test_score_reads_the_store_before_computing(lab, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path))
    first = hl.score(lab, "previous_token", n=2)
    assert first.path().exists()

    def must_not_run(self, lab):
        raise AssertionError("the stored run should have been used")

    monkeypatch.setattr(scorer_class("previous_token"), "compute", must_not_run)
    again = hl.score(lab, "previous_token", n=2)
    torch.testing.assert_close(again.values, first.values)
    with pytest.raises(AssertionError, match="stored run"):
        hl.score(lab, "previous_token", n=2, recompute=True)

