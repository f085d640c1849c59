"""HeadScores round-trip through the store; writes are atomic; a record and its raw data are one unit, whole after
a kill or two writers; damaged records are skipped and recomputed; NaN is strict-JSON null and ranks last; a
parameter naming a file keys the run by the file's content; hl.score reads the store first."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import headlab as hl
from headlab import store
from headlab.scorers import make_scorer, scorer_class


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



# --- a record and its raw data are one unit: kills, concurrent writers, damaged records --------------------------

CHILD = """
import sys, time
import torch
from safetensors.torch import save_file
import headlab as hl
from headlab import store

path, value, mode, marker = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]


def pause(*args):
    open(marker, "w").close()
    time.sleep(600)


def half_then_pause(tmp, data):
    with open(tmp, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
    pause()


if mode == "kill-in-raw":
    store.write_bytes = half_then_pause
elif mode == "kill-before-json":
    store.write_json = pause
else:  # "writes:<count>": save the record `count` times, once `marker` exists, on a slow disk
    import os, random

    swap = store.write_json

    def slow_swap(*args):
        time.sleep(random.uniform(0, 0.2))  # the raw file is written, the JSON not yet: another writer may run
        swap(*args)

    store.write_json = slow_swap
    while not os.path.exists(marker):
        time.sleep(0.01)
for _ in range(1 if mode.startswith("kill") else int(mode.split(":")[1])):
    hl.HeadScores("induction", "m", {"n": 2}, torch.full((4, 3), value),
                  raw={"per_sample": torch.full((16, 256, 256), value)}).save(path)  # 4 MiB of raw data
"""


def _record(value: float) -> hl.HeadScores:
    return hl.HeadScores("induction", "m", {"n": 2}, torch.full((4, 3), value),
                         raw={"per_sample": torch.full((16, 256, 256), value)})


def _child(path: Path, value: float, mode: str, marker: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(value), mode, str(marker)],
                            cwd=Path(__file__).resolve().parent.parent)


def _assert_whole(path: Path, value: float) -> None:
    """The record at `path` loads, its values and the raw file it names come from the same write, of `value`."""
    back = hl.HeadScores.load(path)
    assert torch.all(back.values == value) and torch.all(back.raw["per_sample"] == value)
    raw_files = sorted(p.name for p in path.parent.glob("*.safetensors"))
    assert raw_files == [store.read_json(path)["raw_file"]]  # one raw file, the one the JSON names


@pytest.mark.parametrize("mode", ["kill-in-raw", "kill-before-json"])
def test_a_write_killed_midway_leaves_the_old_record_whole_and_its_debris_is_swept(tmp_path, mode):
    path = tmp_path / "m" / "induction-0123456789.json"
    _record(1.0).save(path)
    marker = tmp_path / "paused"
    child = _child(path, 2.0, mode, marker)
    deadline = time.time() + 120
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the writer never reached the point where it is killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    debris = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    if mode == "kill-in-raw":
        assert debris, "the killed write should have left its partial temporary file"
    old = hl.HeadScores.load(path)  # the old record, loadable, with its own raw data
    assert torch.all(old.values == 1.0) and torch.all(old.raw["per_sample"] == 1.0)
    runs = store.list_runs(tmp_path)
    assert [r["path"] for r in runs] == [str(path)] and runs.damaged == []
    for tmp in debris:  # a few minutes later, the next write sweeps what the killed one left
        os.utime(tmp, (time.time() - 2 * store.STALE_SECONDS,) * 2)
    _record(3.0).save(path)
    _assert_whole(path, 3.0)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_two_writers_of_one_run_end_with_one_consistent_record(tmp_path):
    path = tmp_path / "m" / "induction-0123456789.json"
    go = tmp_path / "go"
    writers = [_child(path, value, "writes:12", go) for value in (1.0, 2.0)]
    go.touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a reader meeting a damaged record would warn: fail instead
        while any(w.poll() is None for w in writers):  # a reader meanwhile always sees one whole record
            seen = store.stored_run(path, hl.HeadScores.load)
            if seen is not None:
                value = seen.values[0, 0].item()
                assert torch.all(seen.values == value) and torch.all(seen.raw["per_sample"] == value)
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    final = hl.HeadScores.load(path).values[0, 0].item()
    assert final in (1.0, 2.0)
    _assert_whole(path, final)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_the_raw_file_is_named_by_its_content_and_old_ones_are_removed(tmp_path):
    path = tmp_path / "induction-0123456789.json"
    _record(1.0).save(path)
    first = store.read_json(path)["raw_file"]
    assert re.fullmatch(r"induction-0123456789\.[0-9a-f]{12}\.safetensors", first)
    (tmp_path / "induction-0123456789.safetensors").write_bytes(b"legacy")  # the old naming of the same record
    _record(2.0).save(path)
    _assert_whole(path, 2.0)
    assert store.read_json(path)["raw_file"] != first


def test_a_shipped_style_record_naming_stem_safetensors_still_loads(tmp_path):
    path = tmp_path / "induction-0123456789.json"
    scores = _record(1.0)
    save_file(scores.raw, str(path.with_suffix(".safetensors")))  # as the shipped records were written
    store.write_json(path, {"format": "headlab.head_scores/v1", "record": "head_scores", "kind": "induction",
                            "model": "m", "params": {"n": 2}, "values": scores.values.tolist(),
                            "raw_file": path.with_suffix(".safetensors").name, "meta": {}})
    back = hl.HeadScores.load(path)
    assert torch.all(back.raw["per_sample"] == 1.0)


def _bad_json(path: Path) -> None:
    path.write_text('{"format": "headlab.head_scores/v1", "values": [[0.1')


def _json_list(path: Path) -> None:
    path.write_text("[1, 2]")


def _wrong_format(path: Path) -> None:
    path.write_text('{"format": "something/else"}')


def _truncated_raw(path: Path) -> None:
    raw = path.parent / store.read_json(path)["raw_file"]
    raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])


def _missing_raw(path: Path) -> None:
    (path.parent / store.read_json(path)["raw_file"]).unlink()


@pytest.mark.parametrize("damage", [_bad_json, _json_list, _truncated_raw, _missing_raw])
def test_a_damaged_record_is_skipped_and_reported_by_list_runs(tmp_path, damage):
    path = _record(1.0).save(tmp_path / "m" / "induction-0123456789.json")
    intact = _record(2.0).save(tmp_path / "m" / "induction-9876543210.json")
    damage(path)
    with pytest.warns(UserWarning, match="damaged"):
        runs = store.list_runs(tmp_path)
    assert [r["path"] for r in runs] == [str(intact)] and [d["path"] for d in runs.damaged] == [str(path)]


@pytest.mark.parametrize("damage", [_bad_json, _json_list, _wrong_format, _truncated_raw, _missing_raw])
def test_a_damaged_record_is_recomputed_and_overwritten(tiny_lab, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("HEADLAB_RUNS", str(tmp_path))
    first = hl.score(tiny_lab, "previous_token", n=2, seq_len=8)
    path = first.path()
    damage(path)
    calls = []
    compute = scorer_class("previous_token").compute
    monkeypatch.setattr(scorer_class("previous_token"), "compute", lambda self, lab: calls.append(1) or compute(self, lab))
    with pytest.warns(UserWarning, match="damaged .* recomputing it and overwriting it"):
        again = hl.score(tiny_lab, "previous_token", n=2, seq_len=8)
    assert calls == [1]  # recomputed, not raised
    torch.testing.assert_close(again.values, first.values)
    torch.testing.assert_close(hl.HeadScores.load(path).raw["per_sample"], first.raw["per_sample"])  # overwritten whole
    assert store.list_runs().damaged == []


def test_store_writes_sweep_only_stale_temporaries(tmp_path):
    stale, fresh = tmp_path / ".run.json.abc.tmp", tmp_path / ".run.json.def.tmp"
    stale.write_text("half"), fresh.write_text("half")
    os.utime(stale, (time.time() - 2 * store.STALE_SECONDS,) * 2)
    store.write_json(tmp_path / "other.json", {"a": 1})
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a write in progress


# --- strict JSON: NaN is null on disk and ranks last --------------------------------------------------------------

def test_nan_and_infinity_are_written_as_null_read_back_as_nan_and_ranked_last(tmp_path):
    values = torch.tensor([[float("nan"), 0.5, 0.25], [float("inf"), 0.75, float("-inf")]])
    path = hl.HeadScores("induction", "m", {"n": 2}, values, meta={"ratio": float("nan"), "ok": 1.5}).save(tmp_path / "r.json")

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    record = json.loads(path.read_text(), parse_constant=refuse)  # strict JSON readers accept it
    assert record["values"] == [[None, 0.5, 0.25], [None, 0.75, None]] and record["meta"] == {"ratio": None, "ok": 1.5}
    back = hl.HeadScores.load(path)
    assert back.values.isnan().tolist() == [[True, False, False], [True, False, True]]
    assert back.top(3) == [(1, 1, 0.75), (0, 1, 0.5), (0, 2, 0.25)]
    assert back.top_heads(6)[3:] == [(0, 0), (1, 0), (1, 2)]  # every NaN after every number
    assert back.to_frame()["value"].iloc[:3].tolist() == [0.75, 0.5, 0.25]


def test_top_ranks_nan_last_in_memory_too():
    scores = hl.HeadScores("induction", "m", {}, torch.tensor([[float("nan"), -1.0], [float("-inf"), 2.0]]))
    assert scores.top_heads(4) == [(1, 1), (0, 1), (1, 0), (0, 0)]


# --- a parameter naming a file is keyed by the file's content -----------------------------------------------------

@pytest.mark.parametrize("kind, param, name, text", [
    ("retrieval", "haystack", "hay.txt", "The grass is green. The sky is blue. "),
    ("select_copy", "dataset", "qs.csv", "question,A,B,answer\nWhich is a fruit?,apple,chair,A\n"),
    ("safety", "prompts", "requests.csv", "prompt\nHow do I pick a lock?\n"),
])
def test_a_parameter_naming_a_file_is_keyed_by_its_content(tiny_lab, tmp_path, kind, param, name, text):
    file = tmp_path / name
    file.write_text(text)
    config = make_scorer(kind, **{param: str(file)})
    assert config.params()["files"] == {param: hashlib.sha256(text.encode()).hexdigest()}
    before = config.run_path(tiny_lab)
    file.write_text(text + "Edited.\n")  # same path, edited content
    after = make_scorer(kind, **{param: str(file)}).run_path(tiny_lab)
    assert after != before
    file.write_text(text)
    assert make_scorer(kind, **{param: str(file)}).run_path(tiny_lab) == before


def test_built_in_names_are_never_taken_for_files(tiny_lab, tmp_path, monkeypatch):
    default = make_scorer("retrieval").run_path(tiny_lab)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "filler").write_text("a file that happens to be called filler")
    config = make_scorer("retrieval", haystack="filler")
    assert "files" not in config.params() and config.run_path(tiny_lab) == default


def test_user_results_go_to_the_users_folder_and_shipped_runs_are_read_never_written(tiny_lab, tmp_path, monkeypatch):
    """The design's rule: cached_runs/ is read-only at run time. A lookup reads the user's folder, then the shipped
    twin; a computation (or a recompute) writes to the user's folder and leaves the shipped file untouched."""
    monkeypatch.delenv("HEADLAB_RUNS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.runs_dir() == tmp_path / "xdg" / "headlab" / "runs"
    assert store.REPO_RUNS not in store.runs_dir().parents and store.runs_dir() != store.REPO_RUNS
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    monkeypatch.setenv("HEADLAB_SHIPPED_RUNS", str(shipped))
    monkeypatch.setenv("HEADLAB_RUNS", str(shipped))  # a maintainer ships a run (as `make cache` does)
    first = hl.score(tiny_lab, "previous_token", n=2, seq_len=8)
    shipped_file = make_scorer("previous_token", n=2, seq_len=8).run_path(tiny_lab)
    before = shipped_file.read_bytes()
    monkeypatch.setenv("HEADLAB_RUNS", str(user))  # a user's session
    calls = []
    compute = scorer_class("previous_token").compute
    monkeypatch.setattr(scorer_class("previous_token"), "compute", lambda self, lab: calls.append(1) or compute(self, lab))
    read = hl.score(tiny_lab, "previous_token", n=2, seq_len=8)
    assert calls == [] and torch.equal(read.values, first.values)  # the shipped run answered
    assert [row["where"] for row in store.list_runs()] == ["shipped"]
    hl.score(tiny_lab, "previous_token", n=2, seq_len=8, recompute=True)
    assert calls == [1] and shipped_file.read_bytes() == before  # recomputed into the user's folder only
    assert (user / shipped_file.relative_to(shipped)).exists()
    assert [row["where"] for row in store.list_runs()] == ["yours"]  # the user's run shadows the shipped one
    monkeypatch.setenv("HEADLAB_SHIPPED_RUNS", "")
    assert store.shipped_twin(user / "x" / "y.json") is None  # shipped runs turned off
