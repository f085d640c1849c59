"""The headlab CLI: score into the store, list runs, ablate, and fail plainly on bad input."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from headlab import cli
from headlab.ablation import METHODS, AblationMethod, CurveConfig, method_fields
from headlab.heads import parse_heads
from headlab.masks import MaskConfig


def _cli(*args, runs_dir):
    env = {**os.environ, "HEADLAB_RUNS": str(runs_dir)}
    return subprocess.run([sys.executable, "-m", "headlab.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_score_runs_and_ablate(tmp_path, lab):
    scored = _cli("score", "induction", "--n", "4", "--seed", "3", "--json", runs_dir=tmp_path)
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["params"]["n"] == 4 and result["params"]["seed"] == 3
    assert result["top"][0]["value"] > 0.5
    assert os.path.exists(result["path"]) and result["path"].startswith(str(tmp_path))

    runs = json.loads(_cli("runs", "--json", runs_dir=tmp_path).stdout)
    assert [r["kind"] for r in runs if r["where"] == "yours"] == ["induction"]
    assert {r["where"] for r in runs} == {"yours", "shipped"}  # the shipped runs are listed, never written

    heads = ",".join(t["label"] for t in result["top"][:4])
    ablated = _cli("ablate", "--heads", heads, "--n", "2", "--json", runs_dir=tmp_path)
    assert ablated.returncode == 0, ablated.stderr
    row = json.loads(ablated.stdout)
    assert row["ablated"] > row["baseline"] + 1.0


def test_unknown_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline on purpose, not because this machine happens to be
    failed = _cli("score", "induction", "--model", "no-such-org/no-such-model", runs_dir=tmp_path)
    assert failed.returncode == 2
    assert "cannot be reached" in failed.stderr and "Traceback" not in failed.stderr


def test_scorer_and_task_parameters_pass_through(tmp_path, lab):
    scored = _cli("score", "sink", "--n", "1", "--param", "domain=code", "--param", "domains=[\"prose\",\"code\"]",
                  "--param", "seq_len=32", "--json", runs_dir=tmp_path)
    assert scored.returncode == 0, scored.stderr
    params = json.loads(scored.stdout)["params"]
    assert (params["domain"], params["domains"], params["seq_len"], params["n"]) == ("code", ["prose", "code"], 32, 1)
    bad = _cli("score", "sink", "--param", "seq_len", runs_dir=tmp_path)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    unknown = _cli("score", "induction", "--param", "depth=3", runs_dir=tmp_path)
    assert unknown.returncode == 2 and "takes no parameter ['depth']" in unknown.stderr
    ablated = _cli("ablate", "--heads", "16.0", "--task", "laundry_list", "--n", "4", "--task-param", "n_items=2",
                   "--json", runs_dir=tmp_path)
    assert ablated.returncode == 0, ablated.stderr
    assert json.loads(ablated.stdout)["task"] == "laundry_list"


def test_channels_command_reports_a_pair(tmp_path, lab):
    result = _cli("channels", "16.0", "18.6", "--kind", "k", "--top", "5", "--json", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "L16H0" in out["summary"] and len(out["directions"]) == 5 and os.path.exists(out["path"])
    backwards = _cli("channels", "18.6", "16.0", runs_dir=tmp_path)
    assert backwards.returncode == 2 and "earlier layers" in backwards.stderr


def test_export_mask_writes_json_and_duo_folders_that_load_back(tmp_path, lab):
    import headlab as hl

    out, duo = tmp_path / "mask.json", tmp_path / "duo"
    result = _cli("export-mask", "--source", "random", "--full-fraction", "0.25", "--sink", "8", "--recent", "32",
                  "--out", str(out), "--duo", str(duo), "--json", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    mask, imported = hl.HeadMask.load(out, info=lab.info), hl.HeadMask.load(duo, info=lab.info)
    assert mask.n_full == json.loads(result.stdout)["n_full"] == round(0.25 * 90)
    assert (mask.full == imported.full).all() and (imported.sink, imported.recent) == (8, 32)
    bad = _cli("export-mask", "--source", "random", "--full-fraction", "1.5", "--out", str(out), runs_dir=tmp_path)
    assert bad.returncode == 2 and "full_fraction must be in [0, 1]" in bad.stderr


def test_bench_runtime_measures_the_mask_against_the_full_cache(tmp_path, lab):
    result = _cli("bench-runtime", "--source", "all_streaming", "--sink", "4", "--recent", "16", "--contexts", "48",
                  "--new-tokens", "2", "--caches", "hf_full,hf_static,compressed", "--json", runs_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["cache"]: row for row in json.loads(result.stdout)["measure"]}
    assert rows["compressed"]["kv_bytes"] < rows["hf_full"]["kv_bytes"] <= rows["hf_static"]["kv_bytes"]
    assert rows["compressed"]["kv_bytes"] == rows["compressed"]["ideal_kv_bytes"]  # the runtime holds exactly what the mask needs
    bad = _cli("bench-runtime", "--contexts", "48,long", "--source", "all_streaming", runs_dir=tmp_path)
    assert bad.returncode == 2 and "--contexts must be whole numbers" in bad.stderr
    bad = _cli("bench-runtime", "--contexts", "48", "--source", "all_streaming", "--caches", "paged", runs_dir=tmp_path)
    assert bad.returncode == 2 and "kind must be one of" in bad.stderr


def _ablate_help(capsys) -> str:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["ablate", "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_defaults_are_read_from_the_contracts(capsys):
    parser = cli.build_parser()
    ablate, curve = vars(parser.parse_args(["ablate"])), CurveConfig()
    assert (ablate["task"], ablate["method"], ablate["n_random"]) == (curve.task, curve.method, curve.n_random)
    assert [int(k) for k in ablate["ks"].split(",")] == list(curve.ks)
    assert ablate["n"] is None and ablate["seed"] is None  # the task's / curve's own defaults apply
    for command in (["export-mask", "--out", "mask.json"], ["bench-runtime"]):
        mask = vars(parser.parse_args(command))
        assert {k: mask[k] for k in ("source", "kind", "full_fraction", "sink", "recent")} == {
            k: getattr(MaskConfig(), k) for k in ("source", "kind", "full_fraction", "sink", "recent")}
    help_text = _ablate_help(capsys)
    assert f"streaming_window (default {method_fields('streaming_window')['sink']})" in help_text
    assert f"scaled_query (default {method_fields('scaled_query')['epsilon']})" in help_text


def test_method_flags_go_to_the_chosen_method_only(tmp_path, capsys):
    chosen = _cli("ablate", "--heads", "L16H0", "--n", "2", "--method", "streaming_window", "--recent", "3", "--json",
                  runs_dir=tmp_path)
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["method_params"] == {"sink": method_fields("streaming_window")["sink"], "recent": 3}
    assert cli.main(["ablate", "--method", "streaming_window", "--epsilon", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--epsilon is not a parameter of ablation method 'streaming_window'" in err
    assert "--sink, --recent" in err
    assert cli.main(["ablate", "--method", "zero", "--sink", "2"]) == 2
    assert "it takes no parameters" in capsys.readouterr().err


def test_score_passes_n_and_seed_only_to_scorers_that_take_them(capsys):
    assert cli.main(["score", "successor", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'successor' takes no parameter 'seed'" in err and "embedding" in err
    assert "Traceback" not in err


@pytest.fixture()
def damped_method(monkeypatch):
    """A throwaway method, registered by subclassing as a real one is; taken out of METHODS afterwards."""
    monkeypatch.setitem(METHODS, "damped", None)  # so that the undo deletes the key the subclass fills

    @dataclasses.dataclass(frozen=True)
    class Damped(AblationMethod):
        """The heads' outputs (`hook_z` `[batch, pos, head, d_head]`) multiplied by `factor`."""

        name, point, head_axis = "damped", "z", 2
        factor: float = 0.5

        def edit(self, act, heads, state):
            act[:, :, heads] = act[:, :, heads] * self.factor

    assert METHODS["damped"] is Damped
    return Damped


def test_a_new_method_class_gets_its_flags_without_a_cli_edit(damped_method, lab, capsys):
    import headlab as hl

    help_text = _ablate_help(capsys)
    assert "--factor FACTOR" in help_text and "damped (default 0.5)" in help_text
    heads = [(16, 0), (18, 6)]
    args = ["ablate", "--heads", "L16H0,L18H6", "--n", "2", "--method", "damped", "--device", "cpu", "--json"]
    assert cli.main([*args, "--factor", "0"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["method"], row["method_params"]) == ("damped", {"factor": 0.0})
    zero = hl.ablate(lab, heads, method="zero", n=2)
    assert row["ablated"] == pytest.approx(zero.ablated, rel=1e-4) and row["ablated"] != pytest.approx(row["baseline"])
    assert cli.main(args) == 0  # no --factor: the class's own default, 0.5
    assert json.loads(capsys.readouterr().out)["method_params"] == {"factor": 0.5}
    assert cli.main(["ablate", "--method", "mean", "--factor", "0"]) == 2
    assert "--factor is not a parameter of ablation method 'mean'" in capsys.readouterr().err


def test_parse_heads():
    assert parse_heads("18.6, 17.3") == [(18, 6), (17, 3)]
    assert parse_heads("18:6 17:3") == [(18, 6), (17, 3)]
    with pytest.raises(ValueError, match="LAYER.HEAD"):
        parse_heads("18-6")
    # The library's head arguments (hl.ablate(lab, ["L18H6"]), masks, channels) read the same spellings.
    from headlab.heads import as_heads
    assert as_heads(["L18H6", "17.3"]) == as_heads("L18H6, 17:3") == as_heads([(18, 6, 0.9), [17, 3]]) == [(18, 6), (17, 3)]


def test_app_command_serves_the_page(tmp_path, free_port):
    """`headlab app` (what `make app` runs) loads the model and serves the three tabs."""
    import time
    import urllib.request

    port = free_port
    env = {**os.environ, "HEADLAB_RUNS": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "headlab.cli", "app", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 240, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(1)
        assert page is not None, server.stdout.read() if server.poll() is not None else "no answer in 240 s"
        config = json.loads(page)
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert {"Model", "Head atlas", "Ablate", "Retrieval", "Sinks", "Successor", "Select & copy", "Safety", "Channels", "Export & runtime"} <= labels
    finally:
        server.terminate()
        server.wait(timeout=30)


LOADING_COMMANDS = [  # every command that loads a model, with inputs valid enough to reach the load
    ["score", "induction"], ["ablate", "--heads", "L18H6"], ["export-mask", "--source", "random", "--out", "{tmp}/m.json"],
    ["bench-runtime", "--source", "all_streaming"], ["channels", "16.0", "18.6"], ["app"],
]


@pytest.mark.parametrize("argv", LOADING_COMMANDS, ids=[argv[0] for argv in LOADING_COMMANDS])
def test_trust_remote_code_is_an_explicit_flag_of_every_loading_command(argv, tmp_path, monkeypatch, capsys):
    import headlab as hl
    from headlab.loading import ModelLoadError

    calls = []

    def load(*args, **kwargs):
        calls.append(kwargs)
        raise ModelLoadError("stopped after the load call")

    monkeypatch.setattr(hl, "load", load)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert cli.main(argv) == 2 and cli.main([*argv, "--trust-remote-code"]) == 2
    assert "stopped after the load call" in capsys.readouterr().err
    assert [call.get("trust_remote_code", False) for call in calls] == [False, True]


def test_app_serves_beyond_loopback_only_on_purpose(tmp_path, monkeypatch, capsys):
    import app.main
    import headlab as hl

    launched, lab = [], object()
    monkeypatch.setattr(hl, "load", lambda *args, **kwargs: lab)
    monkeypatch.setattr(app.main, "launch", lambda **kwargs: launched.append(kwargs))
    assert cli.main(["app", "--host", "0.0.0.0", "--port", "9999"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-remote" in err and not launched
    assert cli.main(["app", "--host", "0.0.0.0", "--port", "9999", "--allow-remote", "--auth", "alice:s3:cret",
                     "--files-dir", str(tmp_path)]) == 0
    assert launched.pop() == {"host": "0.0.0.0", "port": 9999, "lab": lab, "allow_remote": True,
                              "auth": ("alice", "s3:cret"), "files_dir": tmp_path.resolve()}
    for host in ("127.0.0.1", "localhost", "::1"):
        assert cli.main(["app", "--host", host]) == 0
        assert launched.pop() == {"host": host, "port": 7860, "lab": lab, "allow_remote": False, "auth": None,
                                  "files_dir": None}
    assert cli.main(["app", "--files-dir", str(tmp_path / "missing")]) == 2
    assert "is not an existing folder" in capsys.readouterr().err and not launched


def test_usage_errors_are_one_line_too(capsys):
    assert cli.main(["ablate", "--n", "many"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("headlab: error: headlab ablate: argument --n")
