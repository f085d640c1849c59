"""`compare_masks`: every source at exactly the same number of full KV heads, KV bytes measured in the runtime."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
import pytest

import headlab as hl
from headlab import compare
from headlab.compare import CompareConfig

SMALL = dict(budgets=[0.25, 0.5, 0.75], lengths=[256], tasks=["niah_single", "prose_kl"], n=1, seeds=[0, 1], kl_samples=1,
             sink=4, recent=32)


@pytest.fixture(scope="module")
def comparison(tiny_lab):
    return hl.compare_masks(tiny_lab, sources=["random", "attention_area"], **SMALL)


def test_every_source_keeps_the_same_number_of_full_kv_heads(tiny_lab, comparison):
    frame = comparison.to_frame()
    total = tiny_lab.info.n_layers * tiny_lab.info.n_kv_heads
    sources = frame[~frame["source"].isin(["full cache", "all_streaming"])]
    assert set(sources["source"]) == {"random", "attention_area"}
    for budget, rows in sources.groupby("budget"):
        assert set(rows["n_full_kv_heads"]) == {round(budget * total)}
    assert set(frame.loc[frame["source"] == "random", "seed"]) == {0, 1}  # a seeded source: one mask per seed
    assert {m["mask"]["source"]["params"].get("seed") for m in comparison.masks if m["source"] == "random"} == {0, 1}


def test_measured_kv_bytes_fall_with_the_budget(tiny_lab, comparison):
    per_mask = comparison.per_mask()
    for source in ("random", "attention_area"):
        held = per_mask[per_mask["source"] == source].groupby("budget")["kv_mib"].max()
        assert list(held.index) == [0.25, 0.5, 0.75] and held.is_monotonic_increasing and held.iloc[0] < held.iloc[-1]
    full = per_mask.loc[per_mask["source"] == "full cache", "kv_mib"].iloc[0]
    streaming = per_mask.loc[per_mask["source"] == "all_streaming", "kv_mib"].iloc[0]
    assert streaming < per_mask["kv_mib"][per_mask["budget"] == 0.25].min() and per_mask["kv_mib"].max() == full
    info, size = tiny_lab.info, tiny_lab.dtype.itemsize  # the full cache holds K and V of every token of every KV head
    assert full * 2**20 == 2 * info.n_layers * info.n_kv_heads * 256 * info.d_head * size


def test_table_figure_winners_and_the_winning_mask(tiny_lab, comparison):
    frame = comparison.to_frame()
    assert list(frame.columns) == ["source", "seed", "budget", "n_full_kv_heads", "kv_bytes", "task", "length", "accuracy",
                                   "stderr", "ci_low", "ci_high", "n", "kl_vs_full", "time_s"]
    kl = frame[frame["task"] == "prose_kl"].set_index("source")["kl_vs_full"]
    assert kl["full cache"] == 0.0 and kl["all_streaming"] > 0.0
    winners = comparison.winners()
    assert list(winners["budget"]) == [0.25, 0.5, 0.75]
    mask = comparison.best_mask(0.5)
    assert mask.n_full == 2 and mask.source["source"] == winners.loc[1, "winner"]
    names = {trace.name for trace in comparison.figure().data}
    assert {"random", "attention_area", "full cache", "all_streaming"} <= names
    assert any("over seeds" in name for name in names)  # random as a band


def test_stored_and_keyed_by_every_parameter(tiny_lab, comparison, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a stored comparison must not run the runtime again")

    monkeypatch.setattr(compare, "evaluate_mask", fail)
    again = hl.compare_masks(tiny_lab, sources=["random", "attention_area"], **SMALL)
    assert again.rows == comparison.rows
    with pytest.raises(AssertionError, match="must not run"):
        hl.compare_masks(tiny_lab, sources=["random", "attention_area"], **{**SMALL, "n": 2})  # another suite


def test_a_run_cut_short_is_assembled_from_its_stored_evaluations(tiny_lab, comparison, monkeypatch):
    """A comparison cut short on another device: its copied evaluations give the same rows, computing nothing; a mask
    whose evaluation is missing is named, not run, and evaluations stored under another runtime key are not used."""
    monkeypatch.setattr(compare, "evaluate_mask", lambda *a, **k: pytest.fail("assembling must evaluate nothing"))
    config = CompareConfig(sources=("random", "attention_area"), **{k: tuple(v) if isinstance(v, list) else v
                                                                     for k, v in SMALL.items()})
    where = comparison.runtime
    whole, missing = compare.assemble_stored(tiny_lab, config, where)
    assert missing == [] and whole.rows == comparison.rows
    lost = next(e for e in compare.comparison_masks(tiny_lab, config.resolved()) if e.source == "attention_area" and e.budget == 0.5)
    path = compare.evaluation_path(tiny_lab, lost.mask, config.resolved(), where)
    monkeypatch.setattr(compare.store, "shipped_twin", lambda p: None)
    path.rename(path.with_suffix(".moved"))
    try:
        part, missing = compare.assemble_stored(tiny_lab, config, where)
    finally:
        path.with_suffix(".moved").rename(path)
    assert missing == ["attention_area at 50%"]
    assert len(part.rows) == len(comparison.rows) - 2  # its suite row and its KL row
    spec = importlib.util.spec_from_file_location("compare_masks_script", Path(__file__).parents[1] / "analyses/compare_masks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # the README's winners name, per budget, what a winner was not compared with
    assert list(script._winners(part, missing)["not_evaluated"]) == ["-", "attention_area", "-"]
    assert compare.assemble_stored(tiny_lab, config, {**where, "device": "cuda"})[1] == [
        "full cache at 100%", "all_streaming at 0%", *(f"{s}{' seed ' + str(seed) if s == 'random' else ''} at {b:.0%}"
                                                       for s in ("random", "attention_area") for b in (0.25, 0.5, 0.75)
                                                       for seed in ((0, 1) if s == "random" else (None,)))]


def test_unequal_budgets_are_refused(tiny_lab, monkeypatch):
    real = compare.make_mask

    def one_too_many(lab, source, **params):
        mask = real(lab, source, **params)
        if source == "random":
            mask.full[:] = True
        return mask

    monkeypatch.setattr(compare, "make_mask", one_too_many)
    with pytest.raises(AssertionError, match="exactly"):
        hl.compare_masks(tiny_lab, sources=["random"], save=False, **SMALL)


@pytest.mark.parametrize("bad, message", [
    (dict(budgets=(0.5, 1.5)), "strictly between 0 and 1"),
    (dict(tasks=("niah_triple",)), "tasks must be"),
    (dict(sources=("oracle",)), "Unknown mask source"),
    (dict(n=0), "n "),
    (dict(lengths=(16,)), "lengths"),
])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        CompareConfig(**bad)


def test_lengths_beyond_the_context_are_refused(tiny_lab):
    with pytest.raises(ValueError, match="does not fit"):
        hl.compare_masks(tiny_lab, sources=["random"], **{**SMALL, "lengths": [tiny_lab.info.n_ctx + 1]})


def test_app_tab_shows_the_stored_comparison_and_downloads_the_winning_mask(tiny_lab, comparison):
    import gradio as gr

    from app.compare_masks_tab import build_compare_masks_tab
    from app.workbench import Workbench

    bench = Workbench(tiny_lab, None)
    with gr.Blocks() as demo:
        tab = build_compare_masks_tab(bench, "jobs")
    listing, summary, figure, winners, table, budgets, result_file = tab.first_view()
    assert listing["value"] in listing["choices"] and "random" in summary
    assert len(table) == len(comparison.rows) and budgets["choices"] == ["0.25", "0.5", "0.75"]
    assert json.loads(Path(result_file).read_text())["kind"] == "compare_masks"  # the result downloads as JSON
    download = next(fn.fn for fn in demo.fns.values() if fn.api_name == "compare_download")
    path = download(listing["value"], "0.25")
    mask = hl.HeadMask.load(path, info=tiny_lab.info)
    assert mask.n_full == 1 and mask.source["source"] == winners.loc[0, "winner"]
    with pytest.raises(Exception, match="Pick a stored comparison"):
        download("../../etc/passwd", "0.25")  # only the list's own entries are read


def test_cli_flags_come_from_the_config_and_bad_input_exits_2(capsys):
    import dataclasses

    from headlab.cli import build_parser, main

    args = build_parser().parse_args(["compare-masks", "--budgets", "0.25,0.5", "--lengths", "1024", "--sources", "random"])
    assert {f.name for f in dataclasses.fields(CompareConfig)} <= set(vars(args))
    assert args.budgets == (0.25, 0.5) and args.lengths == (1024,) and args.n is None  # left out: the library's default
    assert main(["compare-masks", "--budgets", "0.5,2"]) == 2  # refused before any model loads
    assert "strictly between 0 and 1" in capsys.readouterr().err
