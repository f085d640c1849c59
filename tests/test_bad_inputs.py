"""Every bad input of issue 11, through the CLI and the library: a clear one-line error, nothing computed, nothing written.

The CLI cases run in-process (`cli.main`) on the session's embedded model: `hl.load` hands back the loaded
`lab`, and every function that would start work (scoring, ablating, the curve, the runtime measure, the
channel and mask builders) is replaced by one that fails the test, so a case passes only when its input
is refused *before* any work. One case that used to run for minutes also runs as a subprocess under a timeout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import headlab as hl
from headlab import cli, validate
from headlab.masks import HeadMask

WORK = [  # (module, attribute): what a refused input must never reach
    ("headlab", "score"), ("headlab", "ablate"), ("headlab", "ablation_curve"), ("headlab", "channels"),
    ("headlab.scorers", "score"), ("headlab.runtime", "measure"), ("headlab.masks", "make_mask"),
    ("headlab.circuits", "composition_map"), ("headlab.circuits", "channel_experiment"),
]


class WorkStarted(BaseException):
    """Raised by a work function a refused input reached (a BaseException: no error path can swallow it)."""


@pytest.fixture()
def store_dir(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("HEADLAB_RUNS", str(runs))
    return runs


@pytest.fixture()
def no_work(lab, monkeypatch, store_dir):
    """`hl.load` returns the session's `lab`; every work function raises `WorkStarted`."""
    import importlib

    monkeypatch.setattr(hl, "load", lambda *args, **kwargs: lab)

    def forbidden(*args, **kwargs):
        raise WorkStarted("work started before the input was checked")

    for module, name in WORK:
        monkeypatch.setattr(importlib.import_module(module), name, forbidden)
    return store_dir


def refused(argv: list[str], capsys, store_dir, *written) -> str:
    """Run the CLI; assert exit 2, one stderr line `headlab: error: ...`, no traceback, nothing stored or written."""
    assert cli.main(argv) == 2, argv
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headlab: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert not [p for p in store_dir.rglob("*")], "the store was written"
    for path in written:
        assert not os.path.exists(path), f"{path} was written"
    return lines[0]


def _mask_file(tmp_path, lab, name: str, **fields) -> str:
    record = HeadMask.all_streaming(lab.info, sink=4, recent=16).to_record()
    record.update(fields)
    path = tmp_path / name
    path.write_text(json.dumps(record) if not isinstance(fields.get("raw"), str) else fields["raw"])
    return str(path)


# The "silent wrong results" and "tracebacks and hangs", and the cases added to them.
CLI_CASES = [
    (["ablate", "--heads", ""], "--heads is empty"),
    (["ablate", "--heads", "  , "], "--heads is empty"),
    (["ablate", "--k", "1000"], "must be at most 270"),
    (["ablate", "--k", "-3"], "must be at least 1, got -3"),
    (["ablate", "--k", "0"], "must be at least 1, got 0"),
    (["ablate", "--curve", "--ks", "0,1"], "--ks must be at least 1, got 0"),
    (["ablate", "--curve", "--ks", "1,200"], "allows k from 1 to 135"),
    (["ablate", "--curve", "--ks", ""], "--ks is empty"),
    (["ablate", "--curve", "--n-random", "0"], "--n-random must be at least 1"),
    (["ablate", "--heads", "L18H6", "--n", "0"], "--n must be at least 1, got 0"),
    (["ablate", "--heads", "40.2"], "Head 40.2 does not exist: SmolLM2-135M-Instruct has layers 0-29 and heads 0-8"),
    (["ablate", "--heads", "L18H6,18-6"], "Could not read '18-6' as a head"),
    (["ablate", "--heads", "L18H6,L17"], "Could not read 'L17' as a head"),
    (["score", "induction", "--param", "prompts=abc"], "parameter 'prompts' must be list[str] | None, got 'abc'"),
    (["score", "induction", "--param", "prompts=[1, 2]"], "parameter 'prompts' must be list[str] | None"),
    (["score", "retrieval", "--param", "lengths=256"], "parameter 'lengths' must be tuple[int, ...], got 256"),
    (["score", "induction", "--n", "0"], "parameter 'n' must be at least 1, got 0"),
    (["score", "sink", "--param", "seq_len=-4"], "parameter 'seq_len' must be at least 1"),
    (["score", "sink", "--param", "mass_threshold=NaN"], "parameter 'mass_threshold' must be float"),
    (["score", "induction", "--top", "0"], "--top must be at least 1"),
    (["bench-runtime", "--source", "all_streaming", "--contexts", "-5"], "--contexts must be at least 1, got -5"),
    (["bench-runtime", "--source", "all_streaming", "--contexts", "0"], "--contexts must be at least 1, got 0"),
    (["bench-runtime", "--source", "all_streaming", "--contexts", "100000"], "context of 8192 tokens"),
    (["bench-runtime", "--source", "all_streaming", "--contexts", "8190"], "with 20 generated tokens after it"),
    (["bench-runtime", "--source", "all_streaming", "--new-tokens", "0"], "--new-tokens must be at least 1"),
    (["bench-runtime", "--source", "all_streaming", "--recent", "0"], "recent (last tokens a streaming head keeps"),
    (["export-mask", "--source", "random", "--out", "mask.safetensors"], "--out must be a .json path"),
    (["export-mask", "--source", "random", "--full-fraction", "nan", "--out", "m.json"], "full_fraction must be in [0, 1]"),
    (["channels", "16.0", "18.6", "--top", "0"], "--top must be at least 1"),
    (["channels", "16.0", "40.2"], "Head 40.2 does not exist"),
    (["channels", "--map", "--layers", "10-99"], "Layer 99 does not exist"),
    (["app", "--host", "0.0.0.0"], "add --allow-remote"),
    (["app", "--auth", "alice"], "--auth must be USER:PASS"),
]


@pytest.mark.parametrize("argv, message", CLI_CASES, ids=[" ".join(argv) for argv, _ in CLI_CASES])
def test_cli_refuses_before_any_work(argv, message, no_work, capsys):
    assert message in refused(argv, capsys, no_work)


def test_out_never_overwrites_raw_data_nor_writes_beside_a_folder(no_work, tmp_path, capsys):
    raw = tmp_path / "x.safetensors"
    raw.write_bytes(b"raw data")
    assert "--out must be a .json path" in refused(["score", "induction", "--out", str(raw)], capsys, no_work)
    assert raw.read_bytes() == b"raw data"
    folder = tmp_path / "results"
    folder.mkdir()
    assert "is a folder" in refused(["score", "induction", "--out", str(folder)], capsys, no_work,
                                    tmp_path / "results.safetensors")
    assert list(folder.iterdir()) == []
    missing = tmp_path / "nowhere" / "x.json"
    assert "does not exist: create it first" in refused(["score", "induction", "--out", str(missing)], capsys, no_work,
                                                         missing.parent)
    duo_file = tmp_path / "duo"
    duo_file.write_text("a file")
    assert "is a file: give a folder path" in refused(
        ["export-mask", "--source", "random", "--out", str(tmp_path / "m.json"), "--duo", str(duo_file)], capsys, no_work,
        tmp_path / "m.json")


MASK_CASES = [  # (file contents or fields, what the message names)
    ({"recent": 1e30}, "recent (last tokens a streaming head keeps"),
    ({"raw": '{"format": "headlab.head_mask/v1", "n_layers": 30, "n_kv_heads": 3, "full": [], "sink": 4, '
             '"recent": Infinity}'}, "recent (last tokens a streaming head keeps; the query sees itself) must be a whole"),
    ({"sink": "64"}, "sink (first tokens a streaming head keeps) must be a whole number, got '64'"),
    ({"raw": "[1, 2, 3]"}, "its top level is a JSON array, expected an object"),
    ({"full": [[1, 0, 1]] * 29}, "'full' must be 30 rows (one per layer), got 29 rows"),
    ({"full": [[1, 0]] * 30}, "'full' row 0 must be 3 values of 0 or 1"),
    ({"n_layers": "30"}, "n_layers must be a whole number, got '30'"),
    ({"scores": [[float("nan")] * 9] * 30}, "'scores' row 0 must be 9 finite numbers"),
    ({"raw": "{not json"}, "is not valid JSON"),
]


@pytest.mark.parametrize("fields, message", MASK_CASES, ids=[m for _, m in MASK_CASES])
def test_a_bad_mask_file_is_refused_through_the_cli_and_the_library(fields, message, no_work, lab, tmp_path, capsys):
    path = _mask_file(tmp_path, lab, "mask.json", **fields)
    argv = ["bench-runtime", "--mask", path, "--contexts", "48"]
    assert message in refused(argv, capsys, no_work)
    with pytest.raises(ValueError, match="mask.json") as err:
        HeadMask.load(path, info=lab.info)
    assert message in str(err.value)


def test_missing_kvpress_says_how_to_install_it(no_work, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # as if not installed, whether or not it is
    line = refused(["bench-runtime", "--source", "all_streaming", "--caches", "hf_full,kvpress_duo"], capsys, no_work)
    assert "pip install kvpress" in line


def test_an_over_long_prompt_is_refused_before_the_forward_pass(lab, monkeypatch, store_dir, capsys):
    """Real scoring (no stand-ins): the 9000-token prompt is refused when tokenized, nothing is stored."""
    monkeypatch.setattr(hl, "load", lambda *args, **kwargs: lab)
    long_text = " ".join(["word"] * 9000)
    line = refused(["score", "induction", "--param", f"prompts={json.dumps([long_text])}"], capsys, store_dir)
    assert "longer than SmolLM2-135M-Instruct's context of 8192 tokens" in line


def test_a_context_beyond_the_model_is_refused_at_once_not_after_minutes(tmp_path):
    """`bench-runtime --contexts 100000` on the 8k model used to run for minutes: a subprocess, under a timeout."""
    env = {**os.environ, "HEADLAB_RUNS": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "headlab.cli", "bench-runtime", "--source", "all_streaming",
                             "--contexts", "100000", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("headlab: error: --contexts: 100000 tokens") and "8192" in lines[-1]
    assert not list(tmp_path.rglob("*"))


# --- the same checks through the library ------------------------------------------------------------

def test_library_scoring_refuses_wrongly_typed_parameters(lab, store_dir):
    with pytest.raises(ValueError, match=r"parameter 'prompts' must be list\[str\] \| None, got 'abc'"):
        hl.score(lab, "induction", prompts="abc")
    with pytest.raises(ValueError, match="parameter 'n' must be at least 1, got 0"):
        hl.score(lab, "induction", n=0)
    with pytest.raises(ValueError, match="parameter 'chat' must be bool"):
        hl.score(lab, "select_copy", chat="yes")
    with pytest.raises(ValueError, match="parameter 'texts' must be dict"):
        hl.score(lab, "sink", texts=["a text"])
    assert not list(store_dir.rglob("*"))
    from headlab.scorers import make_scorer

    scorer = make_scorer("retrieval", n=2.0, lengths=[256.0, 512])  # what a slider gives: whole floats become ints
    assert scorer.n == 2 and type(scorer.n) is int and scorer.params()["lengths"] == [256, 512]
    assert make_scorer("retrieval", n=2).params() == make_scorer("retrieval", n=2.0).params()


def test_library_validation_names_the_models_real_sizes(lab):
    info = lab.info
    with pytest.raises(ValueError, match="--heads is empty"):
        validate.heads("", info)
    assert validate.heads("L18H6, 17.3", info) == [(18, 6), (17, 3)]
    with pytest.raises(ValueError, match="layers 0-29 and heads 0-8"):
        validate.heads("40.2", info)
    for k in (0, -3, 1000, 2.5, True):
        with pytest.raises(ValueError, match="--k"):
            validate.top_k(k, info)
    assert validate.top_k(270, info) == 270 and validate.curve_ks([1, 135], info) == [1, 135]
    with pytest.raises(ValueError, match="allows k from 1 to 135"):
        validate.curve_ks([1, 136], info)
    with pytest.raises(ValueError, match="at most 8192"):
        validate.contexts([512, 100000], info)
    with pytest.raises(ValueError, match="at least 1"):
        validate.contexts([0], info)


def test_library_curve_and_mask_refuse_bad_sizes(lab, induction_scores):
    with pytest.raises(ValueError, match="ks must be whole numbers of heads >= 1"):
        hl.ablation_curve(lab, induction_scores, ks=[0, 1], save=False)
    with pytest.raises(ValueError, match="half of its heads"):
        hl.ablation_curve(lab, induction_scores, ks=[1, 200], save=False)
    from headlab.masks import make_mask

    with pytest.raises(ValueError, match="recent"):
        make_mask(lab, "random", recent=float("inf"))
    with pytest.raises(ValueError, match="parameter 'prompts'"):
        make_mask(lab, "score", kind="induction", score_params={"prompts": "abc"})
    with pytest.raises(ValueError, match="must be a .json path"):
        HeadMask.all_streaming(lab.info).save("mask.safetensors")
