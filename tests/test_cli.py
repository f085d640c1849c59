"""The headlab CLI: score into the store, list runs, ablate, and fail plainly on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from headlab.heads import parse_heads


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

    runs = _cli("runs", "--json", runs_dir=tmp_path)
    assert [r["kind"] for r in json.loads(runs.stdout)] == ["induction"]

    heads = ",".join(f"{t['layer']}.{t['head']}" for t in result["top"][:4])
    ablated = _cli("ablate", "--heads", heads, "--n", "2", "--json", runs_dir=tmp_path)
    assert ablated.returncode == 0, ablated.stderr
    row = json.loads(ablated.stdout)
    assert row["ablated"] > row["baseline"] + 1.0


def test_unknown_model_is_a_clear_error(tmp_path):
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
    assert rows["compressed"]["ideal_kv_bytes"] <= rows["compressed"]["kv_bytes"] <= 1.5 * rows["compressed"]["ideal_kv_bytes"]
    bad = _cli("bench-runtime", "--contexts", "48,long", "--source", "all_streaming", runs_dir=tmp_path)
    assert bad.returncode == 2 and "--contexts must be whole numbers" in bad.stderr
    bad = _cli("bench-runtime", "--contexts", "48", "--source", "all_streaming", "--caches", "paged", runs_dir=tmp_path)
    assert bad.returncode == 2 and "kind must be one of" in bad.stderr


def test_parse_heads():
    assert parse_heads("18.6, 17.3") == [(18, 6), (17, 3)]
    assert parse_heads("18:6 17:3") == [(18, 6), (17, 3)]
    with pytest.raises(ValueError, match="LAYER.HEAD"):
        parse_heads("18-6")


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
