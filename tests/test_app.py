"""The web app served in-process and driven through its API with gradio_client (and its input parsing directly)."""
import contextlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import Status

import headlab as hl
from app.inputs import FileAccess, format_heads, parse_heads, parse_ks
from app.main import launch, serving_access
from app.workbench import Workbench
from headlab.ablation import method_fields
from headlab.ablation.curve import AblationCurve
from headlab.heads import head_label

N = 8  # small samples: these tests run on a 2-core CPU
PROMPT = "The cat sat on the mat. The cat sat on the mat."


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def table_rows(table: dict) -> list[dict]:
    """A gradio_client Dataframe value ({headers, data}) as one dict per row."""
    return [dict(zip(table["headers"], row)) for row in table["data"]]


def facts(table: dict) -> dict:
    """The Model tab's table of the model's facts as {fact: value}."""
    return {row["fact"]: row["value"] for row in table_rows(table)}


def test_model_info_reports_the_embedded_shape_as_a_readable_table(client):
    status, info = client.predict(api_name="/model_info")
    shown = facts(info)
    assert (shown["layers"], shown["query heads per layer"], shown["KV heads per layer"]) == ("30", "9", "3")
    assert shown["name"] == "SmolLM2-135M-Instruct" and shown["context (tokens)"] == "8192" and shown["device"] == "cpu"
    assert shown["dtype"] in ("float32", "bfloat16", "float16") and "SmolLM2" in status


def test_scoring_induction_shows_heatmap_and_real_induction_heads(client, lab):
    plot, table, status, best, details, run_json = client.predict("induction", N, 0, False, api_name="/score")
    assert plot["type"] == "plotly"
    figure = json.loads(plot["plot"])
    assert figure["data"][0]["type"] == "heatmap"
    z = figure["data"][0]["z"]  # plotly packs arrays as {"dtype", "bdata", "shape"}
    shape = z["shape"] if isinstance(z, dict) else f"{len(z)}, {len(z[0])}"
    assert shape.replace(" ", "") == f"{lab.info.n_layers},{lab.info.n_heads}"
    rows = table_rows(table)
    assert len(rows) == 10 and [r["rank"] for r in rows[:3]] == [1, 2, 3]
    expected = [head_label(layer, head) for layer, head in hl.score(lab, "induction", n=N, seed=0).top_heads(3)]
    assert best == rows[0]["head"] == expected[0]
    assert rows[0]["induction"] > 0.5  # a real induction head puts most of its attention on the induction target
    assert [r["head"] for r in rows[:3]] == expected
    assert f"**{best}**" in status and "computed in" in status
    assert hl.HeadScores.load(run_json).top_heads(3) == parse_heads(", ".join(expected))  # the run downloads as its JSON record


def test_atlas_reads_a_stored_run_without_computing(client, induction_scores):
    stored_n, stored_seed = induction_scores.params["n"], induction_scores.params["seed"]
    kind, plot, table, status, n, seed, head, details, _ = client.predict("induction", stored_n, stored_seed, api_name="/stored_atlas")
    assert "read from the store" in status and kind == "induction"
    assert (n, seed) == (stored_n, stored_seed)
    assert head == head_label(*induction_scores.top_heads(1)[0]) == table_rows(table)[0]["head"]
    assert plot["type"] == "plotly" and f"**{head}**" in details and "rank 1 of 270" in details
    outline = json.loads(plot["plot"])["layout"]["shapes"][0]  # the chosen head is outlined on the heatmap
    assert (outline["x0"] + 0.5, outline["y0"] + 0.5) == tuple(reversed(parse_heads(head)[0]))
    # With no run for the asked (n, seed), the newest stored run is shown, and the inputs follow it.
    *_, status, n, seed, _, _, _ = client.predict("induction", 999, 0, api_name="/stored_atlas")
    assert "read from the store" in status and n != 999


def test_pattern_view_is_a_circuitsvis_iframe(client):
    view = client.predict(PROMPT, "L18H6", api_name="/pattern")
    assert view.startswith("<iframe srcdoc=") and "circuits-vis" in view and "L18H6" in view
    same = client.predict(PROMPT, "18.6", api_name="/pattern")  # the old spelling reads the same head
    assert "L18H6" in same and same.index("L18H6") == view.index("L18H6")


def test_ablating_top4_induction_heads_raises_repeated_token_loss(client):
    heads_text = client.predict("induction", 4, N, 0, api_name="/top_heads")
    assert len(heads_text.split(",")) == 4 and heads_text.startswith("L")
    summary, table, result_json = client.predict(heads_text, "repeated_tokens", "mean", N, api_name="/ablate")
    (row,) = table_rows(table)
    assert row["heads"] == heads_text
    assert row["ablated"] > row["intact"] + 1.0
    assert row["damage"] > 1.0 and "repeated_tokens" in summary
    record = json.loads(Path(result_json).read_text())  # the ablation downloads as its JSON record, unrounded
    assert record["record"] == "ablation_result" and record["heads"] == heads_text.split(", ")
    assert (record["task"], record["method"], record["n"], record["model"]) == ("repeated_tokens", "mean", N, "SmolLM2-135M-Instruct")
    assert round(record["damage"], 4) == row["damage"] and round(record["baseline"], 4) == row["intact"]


def test_streaming_window_ablation_takes_its_window_from_the_form(client):
    """A 16-token window hides the first copy from the induction heads; a 200-token one hides nothing."""
    heads_text = client.predict("induction", 4, N, 0, api_name="/top_heads")
    window = {"task": "repeated_tokens", "method": "streaming_window", "n": 2, "streaming_window_sink": 4}
    _, narrow, narrow_json = client.predict(heads_text, **window, streaming_window_recent=16, api_name="/ablate")
    _, wide, _ = client.predict(heads_text, **window, streaming_window_recent=200, api_name="/ablate")
    assert table_rows(narrow)[0]["damage"] > 2.0
    assert abs(table_rows(wide)[0]["damage"]) < 1e-3
    assert json.loads(Path(narrow_json).read_text())["method_params"] == {"sink": 4, "recent": 16}  # the window ablated
    with pytest.raises(AppError, match="recent >= 1"):
        client.predict("18.6", **window, streaming_window_recent=0, api_name="/ablate")


def test_ablate_tab_has_a_number_for_every_method_parameter(client):
    """The method fields are generated from the methods' dataclasses, defaults included."""
    parameters = {p["parameter_name"]: p.get("parameter_default") for p in client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/ablate"]["parameters"]}
    for method in ("streaming_window", "scaled_query"):
        for field, default in method_fields(method).items():
            assert parameters[f"{method}_{field}"] == default


def test_ablation_curve_top_k_beats_random_k(client):
    figure, table, status, sets, curve_json = client.predict(
        "induction", N, 0, "repeated_tokens", "1, 2", "mean", 1, N, api_name="/ablation_curve"
    )
    rows = table_rows(table)
    assert [r["k"] for r in rows] == [1, 2]
    assert rows[-1]["top_k"] > rows[-1]["random_mean"]
    assert json.loads(figure["plot"])["data"] and "intact" in status
    listed = table_rows(sets)  # every ablated set with its heads: top-k and the random set per k
    assert [(r["k"], r["set"]) for r in listed] == [(1, "top-1"), (1, "random 1"), (2, "top-2"), (2, "random 2")] or \
        [r["set"] for r in listed] == ["top-1", "random 1", "top-2", "random 1"]
    assert all(parse_heads(r["heads"]) for r in listed) and listed[2]["value"] == rows[1]["top_k"]
    assert [round(value, 4) for value in AblationCurve.load(Path(curve_json)).top] == [row["top_k"] for row in rows]


@pytest.mark.parametrize(
    ("endpoint", "args", "message"),
    [
        ("/ablate", ("18-6, 17.3", "repeated_tokens", "zero", N), "LAYER.HEAD"),
        ("/ablate", ("40.2", "repeated_tokens", "zero", N), "Head 40.2 does not exist"),
        ("/pattern", (PROMPT, "40.2"), "Head 40.2 does not exist"),
        ("/pattern", ("word " * 600, "L18H6"), "at most 512"),
        ("/ablation_curve", ("induction", N, 0, "repeated_tokens", "1, two", "zero", 1, N), "k values must be whole numbers.*'1, two'"),
        ("/score", ("induction", 0, 0, False), "n must be from 1"),
    ],
)
def test_bad_inputs_give_clear_errors_and_the_app_lives_on(client, endpoint, args, message):
    with pytest.raises(AppError, match=message):
        client.predict(*args, api_name=endpoint)
    _, info = client.predict(api_name="/model_info")
    assert facts(info)["layers"] == "30"


def test_failed_model_load_keeps_the_previous_model(client, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once, like an offline machine
    status, _ = client.predict("nonexistent/model", api_name="/load_model")
    assert "Could not load `nonexistent/model`" in status and "Hugging Face" in status
    assert "keep using **SmolLM2-135M-Instruct**" in status
    status, info = client.predict(api_name="/model_info")
    assert facts(info)["name"] == "SmolLM2-135M-Instruct" and "SmolLM2" in status
    view = client.predict(PROMPT, "L18H6", api_name="/pattern")
    assert "circuits-vis" in view


def test_loading_an_empty_name_explains_what_to_type(client):
    status, _ = client.predict("  ", api_name="/load_model")
    assert "Could not load" in status and "Type a model" in status


@pytest.fixture()
def tiny_model_dir(tmp_path, lab) -> str:
    """A 2-layer random Llama saved with save_pretrained (the embedded model's tokenizer): a local model to load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(lab.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=lab.tokenizer.bos_token_id, eos_token_id=lab.tokenizer.eos_token_id,
    )
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    lab.tokenizer.save_pretrained(folder)
    return str(folder)


def test_loading_a_local_folder_switches_every_tab_to_it(lab, tiny_model_dir, serve_app):
    with serve_app(lab) as url:  # its own app: loading a model here must not change the shared one
        client = Client(url, verbose=False)
        status, info = client.predict(tiny_model_dir, api_name="/load_model")
        assert (facts(info)["name"], facts(info)["layers"], facts(info)["query heads per layer"]) == ("tiny-llama", "2", "4") and "tiny-llama" in status
        stored = client.predict("induction", N, 0, api_name="/stored_atlas")
        assert "No stored **induction** run for tiny-llama" in stored[3]
        with pytest.raises(AppError, match="tiny-llama has layers 0-1"):
            client.predict(PROMPT, "L18H6", api_name="/pattern")
        _, table, _, best, _, _ = client.predict("induction", 2, 0, False, api_name="/score")
        (layer, head), = parse_heads(best)
        assert len(table["data"]) == 8 and 0 <= layer < 2 and 0 <= head < 4  # 2 x 4 heads in all


def test_parse_heads_accepts_common_spellings(lab):
    assert parse_heads("18.6, 17.3", lab.info) == [(18, 6), (17, 3)]
    assert parse_heads("L18H6; 17:3 18.6", lab.info) == [(18, 6), (17, 3)]
    assert format_heads(parse_heads("l0h8, 17.3", lab.info)) == "L0H8, L17H3"
    with pytest.raises(ValueError, match="No heads given"):
        parse_heads("  ", lab.info)
    with pytest.raises(ValueError, match="does not exist"):
        parse_heads("3.9", lab.info)


def test_parse_ks_sorts_and_bounds(lab):
    assert parse_ks("8, 1 2,4,2", lab.info) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="half of its heads"):
        parse_ks("200", lab.info)


def test_retrieval_tab_scores_heads_and_rejects_bad_lengths(client):
    table, status, heatmap, run_json = client.predict("fact", "filler", "256, 384", "0.1, 0.5, 0.9", 1, api_name="/retrieval")
    rows = table_rows(table)
    assert rows[0]["retrieval score"] > 0.1 and "accuracy" in status  # a real retrieval head copies the needle
    layer, _ = parse_heads(rows[0]["head"])[0]
    assert 15 <= layer <= 25  # retrieval heads sit in the mid-to-late layers
    assert heatmap["type"] == "plotly" and hl.HeadScores.load(run_json).top_heads(1) == [(layer, parse_heads(rows[0]["head"])[0][1])]
    with pytest.raises(AppError, match="context lengths must be whole numbers"):
        client.predict("fact", "filler", "256, long", "0.5", 1, api_name="/retrieval")
    with pytest.raises(AppError, match="more than the context of 16 tokens"):
        client.predict("fact", "filler", "16", "0.5", 1, api_name="/retrieval")


def test_sinks_tab_shows_the_domain_matrix_and_two_patterns(client):
    plot, table, status, head, details, run_json = client.predict(1, 0, api_name="/sinks")
    assert json.loads(plot["plot"])["data"][0]["type"] == "heatmap"
    rows = table_rows(table)
    assert rows and rows[0]["head"] == head and "switch" in status
    assert rows[0]["dormant on"] and rows[0]["active on"]  # a switching head is dormant somewhere, active elsewhere
    assert f"**{head}**" in details and hl.HeadScores.load(run_json).kind == "sink"
    view_a, view_b = client.predict(head, "prose", "code", 0, api_name="/sink_patterns")
    assert view_a.startswith(f"<h4>{head} on prose</h4><iframe") and "<iframe" in view_b and view_a != view_b


def test_channels_tab_analyses_the_previous_token_to_induction_pair(client):
    kind = "K-composition (sender → receiver's keys)"
    summary, spectrum, shares, directions, tokens, report_json = client.predict(kind, "16.0", "18.6", api_name="/channels")
    assert "L16H0" in summary and table_rows(directions) and spectrum["type"] == "plotly"
    record = json.loads(Path(report_json).read_text())  # the report downloads as one JSON, its tensors written in
    assert record["record"] == "channel_report" and len(record["tensors"]["singular_values"]) > 0
    with pytest.raises(AppError, match="earlier layers"):
        client.predict(kind, "18.6", "16.0", api_name="/channels")


def test_export_tab_writes_both_formats_and_only_the_retrieval_mask_keeps_the_needle(client, lab, tmp_path):
    import zipfile

    from app.runtime_tab import SOURCES, default_prompt
    from app.workbench import Workbench

    by_score, streaming = list(SOURCES)[0], list(SOURCES)[2]
    status, _, memory, json_path, duo_zip = client.predict(by_score, "retrieval", 0.5, 64, 256, api_name="/export_mask")
    mask = hl.HeadMask.load(json_path, info=lab.info)
    assert mask.n_full == 45 and mask.source["kind"] == "retrieval" and "| budget | 45/90 KV heads full (50%) |" in status
    per_layer = " ".join(str(int(n)) for n in mask.full.sum(1).tolist())
    assert f"`{per_layer}`" in status and "| streaming heads keep | 64 sink + 256 recent tokens |" in status
    assert "HeadMask(" not in status  # a table, not the object's repr
    with zipfile.ZipFile(duo_zip) as archive:
        archive.extractall(tmp_path / "duo")
    assert (hl.HeadMask.load(tmp_path / "duo", info=lab.info).full == mask.full).all()

    prompt = default_prompt(Workbench(lab))  # a fact needle early in ~600 tokens of filler
    full, kept, table, generation_json = client.predict(by_score, "retrieval", 0.5, 64, 256, prompt, 6, api_name="/runtime_generate")
    assert "paprika" in full and kept == full  # the retrieval heads keep the needle in their full cache
    rows = table_rows(table)
    assert rows[1]["KV MiB held"] < rows[0]["KV MiB held"]
    record = json.loads(Path(generation_json).read_text())  # the JSON download is this generation, bytes unrounded
    assert record["record"] == "runtime_generation" and record["full_text"] == full and record["new_tokens"] == 6
    assert record["held_bytes"] < record["full_bytes"] and len(record["rows"]) == 2
    assert record["mask"]["record"] == "head_mask" and record["prompt"] == prompt
    _, lost, table, _ = client.predict(streaming, "retrieval", 0.5, 64, 256, prompt, 6, api_name="/runtime_generate")
    assert "paprika" not in lost  # sink + 256 recent tokens no longer hold it
    assert table_rows(table)[1]["KV MiB held"] < rows[1]["KV MiB held"]


def test_runtime_tab_measures_memory_live_and_rejects_a_context_beyond_the_model(client):
    from app.runtime_tab import SOURCES

    streaming = list(SOURCES)[2]
    table, measure_json = client.predict(streaming, "retrieval", 0.5, 4, 16, "48", api_name="/runtime_measure")
    rows = {row["cache"]: row for row in table_rows(table)}
    assert rows["compressed"]["KV MiB held"] < rows["hf_full"]["KV MiB held"] and rows["compressed"]["held / ideal"] == 1.0
    record = json.loads(Path(measure_json).read_text())  # the measurement downloads as JSON: the mask and every row, in bytes
    assert record["record"] == "runtime_measure" and record["contexts"] == [48] and record["mask"]["record"] == "head_mask"
    measured = {row["cache"]: row for row in record["rows"]}
    assert measured.keys() == rows.keys() and measured["compressed"]["kv_bytes"] < measured["hf_full"]["kv_bytes"]
    assert measured["compressed"]["kv_bytes"] / 2**20 == pytest.approx(rows["compressed"]["KV MiB held"], abs=0.006)
    with pytest.raises(AppError, match="longer than SmolLM2-135M-Instruct's context"):
        client.predict(streaming, "retrieval", 0.5, 4, 16, "99999", api_name="/runtime_measure")


def test_runtime_quality_downloads_its_rows_as_json(client):
    from app.runtime_tab import SOURCES

    table, quality_json = client.predict(list(SOURCES)[2], "retrieval", 0.5, 4, 16, 64, api_name="/runtime_quality")
    record = json.loads(Path(quality_json).read_text())
    assert record["record"] == "runtime_quality" and record["length"] == 64 and record["mask"]["n_layers"] == 30
    assert [row["mask"] for row in record["rows"]] == [row["mask"] for row in table_rows(table)]
    assert [row["needle_accuracy"] for row in record["rows"]] == pytest.approx([row["needle_accuracy"] for row in table_rows(table)], abs=1e-4)


# --- what the app reads of the server, who may reach it, and jobs that overlap ----------------------------------------

SECRET = "hunter2-not-for-the-page"  # in files the app must not show
HAYSTACK_TEXT = "The river runs past the old mill and the miller counts his sacks of flour. " * 30
RETRIEVAL_RUN = ("fact", "filler", "256", "0.5", 1)  # one needle: one short generation


def without(message: str, typed: str) -> str:
    """An error message with the typed input taken out, to compare the refusals of different inputs."""
    return message.replace(repr(typed), "<input>").replace(typed, "<input>")


@contextlib.contextmanager
def app_client(lab: hl.Lab, port: int, **launch_kw):
    """Its own app (its model may change) on loopback with `launch_kw`, and a client of it."""
    demo = launch(host="127.0.0.1", port=port, lab=lab, prevent_thread_lock=True, quiet=True, **launch_kw)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


@pytest.mark.parametrize("endpoint", ["/retrieval", "/select_copy"])
def test_server_files_are_refused_as_haystack_or_dataset_and_never_shown(client, tmp_path, endpoint):
    secret = tmp_path / "secret.csv"
    secret.write_text(f"question,A,B,answer\n{SECRET}?,yes,no,A\n{SECRET}?,yes,no,B\n")
    messages = set()
    for path in ("/etc/passwd", str(secret), str(tmp_path / "missing.csv")):
        args = ("fact", path, "256", "0.5", 1) if endpoint == "/retrieval" else (4, 0, False, path)
        with pytest.raises(AppError, match="refused") as caught:
            client.predict(*args, api_name=endpoint)
        assert "root:" not in str(caught.value) and SECRET not in str(caught.value)
        messages.add(without(str(caught.value), path))
    assert len(messages) == 1  # an existing file and a missing one read the same
    _, info = client.predict(api_name="/model_info")
    assert facts(info)["layers"] == "30"


def test_an_uploaded_haystack_is_the_one_read(client, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    with pytest.raises(AppError, match="haystack is empty"):  # the upload replaced 'filler'
        client.predict(*RETRIEVAL_RUN, handle_file(str(blank)), api_name="/retrieval")
    hay = tmp_path / "mill-haystack.txt"
    hay.write_text(HAYSTACK_TEXT)
    table, status, *_ = client.predict(*RETRIEVAL_RUN, handle_file(str(hay)), api_name="/retrieval")
    assert "mill-haystack.txt" in status and len(table_rows(table)) == 15


def test_an_uploaded_dataset_is_scored_and_a_bad_row_is_named_not_shown(client, tmp_path):
    good = tmp_path / "fruit.csv"
    rows = [f"Which one is a fruit ({i})?,{fruit},stone,A" for i, fruit in enumerate(["apple", "pear", "plum", "fig"])]
    good.write_text("question,A,B,answer\n" + "\n".join(rows) + "\n")
    _, _, _, example_text, _, run_json = client.predict(4, 0, False, "", dataset_file=handle_file(str(good)), api_name="/select_copy")
    assert "Which one is a fruit" in example_text  # the example question comes from the upload
    assert hl.HeadScores.load(run_json).params["n"] == 4
    bad_row = tmp_path / "bad-row.csv"
    bad_row.write_text(f"question,A,B,answer\nWhat is 2 + 2?,4,5,A\nWhat is {SECRET}?,yes,no,{SECRET}\n")
    bad_header = tmp_path / "bad-header.csv"
    bad_header.write_text(f"{SECRET},question\nx,y\n")
    for upload, line in ((bad_row, "line 3"), (bad_header, "line 1")):
        with pytest.raises(AppError, match=line) as caught:
            client.predict(4, 0, False, "", dataset_file=handle_file(str(upload)), api_name="/select_copy")
        assert SECRET not in str(caught.value)


def test_typed_paths_and_model_folders_work_only_inside_files_dir(lab, tiny_model_dir, tmp_path, free_port):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hay.txt").write_text(HAYSTACK_TEXT)
    (shared / "blank.txt").write_text(" ")
    (tmp_path / "outside.txt").write_text(HAYSTACK_TEXT)
    (shared / "escape.txt").symlink_to(tmp_path / "outside.txt")
    with app_client(lab, free_port, files_dir=shared) as client:
        _, status, *_ = client.predict("fact", "hay.txt", "256", "0.5", 1, api_name="/retrieval")
        assert str(shared / "hay.txt") in status
        with pytest.raises(AppError, match="haystack is empty"):  # an absolute path inside is read too
            client.predict("fact", str(shared / "blank.txt"), "256", "0.5", 1, api_name="/retrieval")
        refusals = set()
        for path in ("../outside.txt", "../missing.txt", str(tmp_path / "outside.txt"), "escape.txt", "/etc/passwd"):
            with pytest.raises(AppError, match="refused") as caught:
                client.predict("fact", path, "256", "0.5", 1, api_name="/retrieval")
            refusals.add(without(str(caught.value), path))
        assert len(refusals) == 1
        # A model folder outside files_dir and a missing one get the same message; one inside loads.
        outside, missing = tiny_model_dir, str(tmp_path / "no-such-model")
        statuses = {without(client.predict(path, api_name="/load_model")[0], path) for path in (outside, missing)}
        assert len(statuses) == 1 and "Could not load" in statuses.pop()
        shutil.copytree(tiny_model_dir, shared / "tiny-llama")
        _, info = client.predict("tiny-llama", api_name="/load_model")
        assert (facts(info)["name"], facts(info)["layers"]) == ("tiny-llama", "2")


def test_a_remote_app_loads_no_local_folder_and_never_says_which_paths_exist(lab, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub name fails at once
    monkeypatch.chdir(tmp_path)  # 'tiny-llama' is now also a relative path that exists
    bench = Workbench(lab, FileAccess(remote=True))
    messages = set()
    for typed in (tiny_model_dir, str(tmp_path / "missing"), "/etc", "tiny-llama", "no-such-org/no-such-model"):
        with pytest.raises(hl.ModelLoadError) as caught:
            bench.load(typed, session="visitor")
        messages.add(without(str(caught.value), typed))
    assert len(messages) == 1 and "no local folder" in messages.pop()
    assert bench.lab is lab and bench.loads == 0 and bench.model_key("visitor") == "embedded" and bench.pool.keys() == ["embedded"]


def test_serving_beyond_loopback_needs_allow_remote_warns_and_can_ask_a_login(lab, free_port, capsys):
    with pytest.raises(ValueError, match="allow_remote=True"):  # refused before any model loads
        launch(host="0.0.0.0", port=free_port, model="no-such-org/no-such-model", prevent_thread_lock=True)
    with pytest.raises(ValueError, match="allow_remote=True"):
        launch(port=free_port, lab=lab, prevent_thread_lock=True, share=True)
    assert not any(serving_access(host, False, None, None).remote for host in ("127.0.0.1", "localhost", "::1"))
    demo = launch(host="0.0.0.0", port=free_port, lab=lab, prevent_thread_lock=True, quiet=True, allow_remote=True, auth=("ada", "s3cret"))
    try:
        warning = capsys.readouterr().err
        assert "WARNING" in warning and f"0.0.0.0:{free_port}" in warning and "no server files" in warning
        url = f"http://127.0.0.1:{free_port}/"
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(api_name="/model_info")  # no login, no app
        _, info = Client(url, auth=("ada", "s3cret"), verbose=False).predict(api_name="/model_info")
        assert facts(info)["layers"] == "30"
    finally:
        demo.close()


def queued(job, timeout_s: float = 60) -> None:
    """Wait until the server has queued `job`, so that a job submitted next arrives after it."""
    deadline = time.monotonic() + timeout_s
    while job.status().code in (Status.STARTING, Status.JOINING_QUEUE) and time.monotonic() < deadline:
        time.sleep(0.01)


def pattern_values(view: str) -> str:
    """A CircuitsVis view without its random element id: equal views show the same attention."""
    return re.sub(r"circuits-vis-[0-9a-f-]+", "circuits-vis", view)


def test_a_pattern_read_during_an_ablation_waits_for_the_model_and_sees_no_hook(client):
    ablate = ("L18H6, L17H3, L16H0", "repeated_tokens", "zero", N)  # L16H0 zeroed changes what layer 17 attends to
    _, expected_table, _ = client.predict(*ablate, api_name="/ablate")
    expected_view = client.predict(PROMPT, "L17H3", api_name="/pattern")
    first = client.submit(*ablate, api_name="/ablate")
    queued(first)
    second = client.submit(PROMPT, "L17H3", api_name="/pattern")  # arrives while the ablation runs (seconds)
    view = second.result(timeout=300)
    assert table_rows(first.result(timeout=300)[1]) == table_rows(expected_table)
    assert pattern_values(view) == pattern_values(expected_view)  # no ablation hook leaked into the pattern read
    _, info = client.predict(api_name="/model_info")
    assert facts(info)["layers"] == "30"


# --- linked views and readable figures --------------------------------------------------------------------------------

def plot_data(figure):
    """A figure as a `gr.Plot` input arrives in a handler."""
    from gradio.components.plot import PlotData

    return PlotData(type="plotly", plot=figure.to_json())


def outlines(figure: dict) -> list[dict]:
    from app.views import OUTLINE

    return [shape for shape in figure["layout"].get("shapes", []) if shape.get("name") == OUTLINE]


def test_a_linked_heatmap_outlines_the_chosen_head_and_says_what_it_holds(induction_scores):
    """The one link every per-head heatmap uses: the cell of a layer x head grid, the row of a head x domain matrix."""
    from app.views import focus, highlighted
    from headlab.scorers.sinks import dormancy_figure

    shown = highlighted(induction_scores.heatmap(), (18, 6))  # a first view: the best head outlined
    figure, head, details = focus(plot_data(shown), "17.3")
    (outline,) = outlines(json.loads(figure.plot))  # the earlier outline is gone
    assert head == "L17H3" and (outline["x0"], outline["y0"]) == (2.5, 16.5)
    rank = int((induction_scores.values > induction_scores.values[17, 3]).sum()) + 1
    assert details == f"**L17H3**: induction {float(induction_scores.values[17, 3]):.3f}, rank {rank} of 270."
    matrix = dormancy_figure(hl.HeadScores(kind="sink", model="m", params={}, values=induction_scores.values,
                                           raw={"dormancy": torch.stack([induction_scores.values, 1 - induction_scores.values])},
                                           meta={"domains": ["prose", "code"]}))
    figure, head, details = focus(plot_data(matrix), "L1H2")
    (outline,) = outlines(json.loads(figure.plot))
    assert (outline["y0"], outline["y1"], outline["x0"], outline["x1"]) == (10.5, 11.5, -0.5, 1.5)  # row 1 * 9 + 2
    value = float(induction_scores.values[1, 2])
    assert details == f"**L1H2**, dormancy: prose {value:.3f} · code {1 - value:.3f}"
    with pytest.raises(ValueError, match="Could not read"):
        focus(plot_data(shown), "head six")


def test_the_channel_map_is_ticked_per_layer_and_still_names_every_head_on_hover(client, lab):
    plot, pairs, status, _, _ = client.predict("K-composition (sender → receiver's keys)", 0, lab.info.n_layers - 1,
                                               api_name="/composition_map")
    figure = json.loads(plot["plot"])
    for axis in ("xaxis", "yaxis"):
        assert figure["layout"][axis]["ticktext"] == [f"L{layer}" for layer in range(lab.info.n_layers)]
        assert figure["layout"][axis]["tickvals"] == [f"L{layer}H0" for layer in range(lab.info.n_layers)]
    assert len(figure["data"][0]["x"]) == lab.info.n_layers * lab.info.n_heads  # one column per head, as before
    assert "sender %{y} → receiver %{x}" in figure["data"][0]["hovertemplate"]
    _, _, narrow, _, hint = client.predict("K-composition (sender → receiver's keys)", 14, 18, api_name="/composition_map")
    assert "14–18" in narrow and "Click a cell" in hint


def test_a_pair_picked_on_the_channel_map_is_outlined_and_its_composition_shown(lab):
    """A click on the pair map (`L16H0>L18H6`) fills the pair form; the cell is outlined and its composition shown."""
    from app.channels_tab import focus_pair, pair_of_click
    from app.page import clicked_pair
    from headlab.circuits.composition import stored_map

    assert pair_of_click("L16H0>L18H6@1733400000000") == ("L16H0", "L18H6") == clicked_pair("L16H0>L18H6@1")
    cmap, bench = stored_map(lab, "k"), Workbench(lab)
    shown = plot_data(cmap.heatmap((16, 18)))  # 27 heads a side: L16H0 is row 0, L18H6 column 2 * 9 + 6
    figure, details = focus_pair(bench, shown, cmap, "L16H0", "18.6")
    (outline,) = outlines(json.loads(figure.plot))
    assert (outline["x0"], outline["x1"], outline["y0"], outline["y1"]) == (23.5, 24.5, -0.5, 0.5)
    score = cmap.score((16, 0), (18, 6))
    rank = int((cmap.values[cmap.valid()] > score).sum()) + 1
    assert details.startswith(f"**L16H0 → L18H6**, K-composition: score {score:.3f}, rank {rank:,} of {int(cmap.valid().sum()):,} pairs, "
                              f"{cmap.z_score(score):.0f} sd above random matrices")
    assert "no composition" in focus_pair(bench, shown, cmap, "L18H6", "L16H0")[1]  # a receiver before its sender
    with pytest.raises(ValueError, match="not on this map"):
        focus_pair(bench, shown, cmap, "L2H0", "L18H6")
