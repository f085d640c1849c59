"""The Compare masks tab: every mask source at the same KV budgets on the RULER-style suite (`hl.compare_masks`).

Shows a stored comparison of the current model (the newest on opening; any other from the list) as the Pareto
figure, the winners and the full table, lets a user run a new one (a job: minutes on the CPU), and download the
winning mask at a budget as `headlab.head_mask/v1` JSON. A view only: everything comes from `headlab.compare`.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import READ_EVENT, progress_to, reads_store, shows_errors
from app.inputs import check_count, parse_numbers
from app.views import json_button, result_json, table
from app.workbench import Workbench
from headlab import store
from headlab.compare import DEFAULTS, KL_TASK, default_sources
from headlab.comparison import MaskComparison
from headlab.datasets import ruler

MAX_N = 200
NO_RUN = "No stored comparison for this model yet: choose sources and press **Run comparison** (minutes on a CPU)."


@dataclass
class CompareTab:
    stored: gr.Dropdown
    show_button: gr.Button
    sources: gr.CheckboxGroup
    budgets: gr.Textbox
    lengths: gr.Textbox
    tasks: gr.CheckboxGroup
    n: gr.Number
    run_button: gr.Button
    summary: gr.Markdown
    plot: gr.Plot
    winners: gr.Dataframe
    table: gr.Dataframe
    budget: gr.Dropdown
    download_button: gr.Button
    mask_file: gr.File
    download: gr.DownloadButton  # the comparison shown, as JSON
    first_view: Callable | None = None

    @property
    def first_outputs(self) -> list:
        return [self.stored, self.summary, self.plot, self.winners, self.table, self.budget, self.download]


def stored_runs(bench: Workbench) -> dict[str, str]:
    """`{label: path}` of the current model's stored comparisons, newest first."""
    rows = [r for r in store.list_runs() if r["record"] == "compare_masks" and r["model"] == bench.info.slug]
    rows.sort(key=lambda r: Path(r["path"]).stat().st_mtime, reverse=True)
    out = {}
    for r in rows:
        c = r["params"].get("config", {})
        label = (f"{', '.join(c.get('sources', []))} · budgets {c.get('budgets')} · lengths {c.get('lengths')} · "
                 f"n={c.get('n')} ({r['where']}, {Path(r['path']).stem})")
        out[label] = r["path"]
    return out


def comparison_view(cmp: MaskComparison) -> tuple:
    """Summary text, Pareto figure, winners, table and the budgets to download a mask at."""
    winners = cmp.winners()
    lines = [f"**{cmp.title()}**."] + [
        f"At **{w.budget:.0%}**: **{w.winner}** {w.accuracy:.3f} (full cache {w.full_cache:.3f}, gap {w.gap_points:.1f} points)"
        for w in winners.itertuples()]
    budgets = [f"{b:g}" for b in winners["budget"]]
    return ("  \n".join(lines), cmp.figure(), winners.round(4), cmp.to_frame().round(4),
            gr.update(choices=budgets, value=budgets[len(budgets) // 2] if budgets else None), result_json(cmp, "mask-comparison"))


def layout() -> CompareTab:
    """The tab's components, defaults from `CompareConfig`."""
    gr.Markdown(
        "**Which heads may stream?** Every mask source (retrieval score, DuoAttention, RazorAttention, attention area, "
        "random) at exactly the same number of full KV heads, run through headlab's compressed-KV runtime on a "
        "RULER-style suite (needles, variable tracking, common words; RULER's exact-match scoring) and the KL on prose. "
        "KV bytes are measured in the runtime after prefill. Random masks are a band over seeds."
    )
    with gr.Row():
        stored = gr.Dropdown([], label="stored comparisons of this model", elem_id="compare-stored", scale=4)
        show_button = gr.Button("Show", elem_id="compare-show", scale=1)
    sources = default_sources()
    with gr.Row():
        source_box = gr.CheckboxGroup(sources, value=[s for s in sources if s != "duo"], label="sources (duo trains: ~10 min on CPU)",
                                      elem_id="compare-sources")
        tasks = gr.CheckboxGroup([*ruler.TASKS, KL_TASK], value=list(DEFAULTS.tasks), label="tasks", elem_id="compare-tasks")
    with gr.Row():
        budgets = gr.Textbox(", ".join(map(str, DEFAULTS.budgets)), label="budgets (share of KV heads full)", elem_id="compare-budgets")
        lengths = gr.Textbox(", ".join(map(str, DEFAULTS.lengths)), label="lengths (tokens)", elem_id="compare-lengths")
        n = gr.Number(DEFAULTS.n, precision=0, label="samples per task and length", elem_id="compare-n")
        run_button = gr.Button("Run comparison", variant="primary", elem_id="compare-run")
    summary = gr.Markdown(NO_RUN, elem_id="compare-summary")
    with gr.Row():
        plot = gr.Plot(label="quality vs KV bytes", elem_id="compare-plot", scale=3)
        winners = table(label="winner per budget", elem_id="compare-winners", scale=2)
    with gr.Row():
        budget = gr.Dropdown([], label="budget", elem_id="compare-budget")
        download_button = gr.Button("Download the winning mask", elem_id="compare-download")
        mask_file = gr.File(label="headlab.head_mask/v1 JSON", elem_id="compare-mask-file")
    rows = table(label="every mask, task and length", elem_id="compare-table")
    download = json_button("compare-json", "⬇ JSON of this comparison")
    return CompareTab(stored, show_button, source_box, budgets, lengths, tasks, n, run_button, summary, plot, winners, rows,
                      budget, download_button, mask_file, download)


def load_chosen(bench: Workbench, label: str | None) -> MaskComparison:
    """The stored comparison picked in the list (only the list's own entries are read)."""
    runs = stored_runs(bench)
    if label not in runs:
        raise ValueError("Pick a stored comparison from the list (or run one).")
    return MaskComparison.load(Path(runs[label]))


def wire(tab: CompareTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: show a stored comparison, run one, download a winning mask."""

    def first_view() -> tuple:
        runs = stored_runs(bench)
        listing = gr.update(choices=list(runs), value=next(iter(runs), None))
        if not runs:
            return listing, NO_RUN, None, None, None, gr.update(choices=[], value=None), None
        return listing, *comparison_view(load_chosen(bench, next(iter(runs))))

    @reads_store
    def show(label: str) -> tuple:
        return comparison_view(load_chosen(bench, label))

    @shows_errors
    def run(sources, budgets_text, lengths_text, tasks, n_value, progress=gr.Progress()) -> tuple:
        cmp = hl.compare_masks(bench.lab, sources=sources, budgets=parse_numbers(budgets_text, "budgets"),
                               lengths=parse_numbers(lengths_text, "lengths", int), tasks=tasks,
                               n=check_count(n_value, "samples", 1, MAX_N), progress=progress_to(progress))
        runs = stored_runs(bench)
        return gr.update(choices=list(runs), value=next(iter(runs), None)), *comparison_view(cmp)

    @reads_store
    def download(label: str, budget: str) -> str:
        if not budget:
            raise ValueError("Pick a budget first (show a comparison).")
        mask = load_chosen(bench, label).best_mask(float(budget))
        return str(mask.save(Path(tempfile.mkdtemp(prefix="headlab-mask-")) / f"winning_mask_{budget}.json"))

    tab.show_button.click(show, inputs=[tab.stored], outputs=tab.first_outputs[1:], api_name="compare_show", **READ_EVENT)
    tab.run_button.click(run, inputs=[tab.sources, tab.budgets, tab.lengths, tab.tasks, tab.n], outputs=tab.first_outputs,
                         api_name="compare_masks", concurrency_id=concurrency_id)
    tab.download_button.click(download, inputs=[tab.stored, tab.budget], outputs=[tab.mask_file], api_name="compare_download",
                              **READ_EVENT)
    tab.first_view = first_view


def build_compare_masks_tab(bench: Workbench, concurrency_id: str) -> CompareTab:
    tab = layout()
    wire(tab, bench, concurrency_id)
    return tab
