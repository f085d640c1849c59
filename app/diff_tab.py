"""The Compare models tab: which heads did fine-tuning change, do their scores move, and do they matter (`hl.diff`).

Opens on a stored diff of the visitor's model (the default-config one first, so the embedded model shows the shipped
embedded -> embedded-refusal run; nothing is computed or loaded): the summary, the QK / OV / MLP weight-change
heatmaps, the most changed heads, the score shifts and the behaviour check. A job diffs the visitor's model (A)
against a second model (B) typed by name, loaded into the shared pool. Form defaults come from `DiffConfig`.
A view only: every number, table and figure comes from `headlab.diff`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import READ_EVENT, progress_to, reads_store, shows_errors
from app.inputs import check_count, check_whole
from app.views import json_button, result_json, table
from app.workbench import Workbench
from headlab import store
from headlab.ablation.methods import parameterless_methods
from headlab.diff import DiffConfig, ModelDiff, ModelId, run_path
from headlab.tasks import task_names

DEFAULTS = DiffConfig()
DEFAULT_B = "embedded-refusal"  # the shipped pair's model B (the embedded model with the refusal LoRA merged in)
MAX_TOP, MAX_K, MAX_N_RANDOM, MAX_N = 100, 20, 20, 500
NO_RUN = "No stored diff of this model yet: type model B and press **Compare models** (weights: seconds; scores and behaviour: minutes on a CPU)."
INTRO = (
    "**What did fine-tuning change, head by head?** Model B against your model (A), same shape: the relative change "
    "‖C_B − C_A‖ / ‖C_A‖ of each head's QK and OV circuit (TransformerLens `FactoredMatrix`) and of each MLP; the score "
    "kinds on both models and the heads whose rank moved; and the most changed heads ablated in each model on a task "
    "against random head sets (does a changed head matter?)."
)
MOVED = ["a", "b", "delta", "rank_a", "rank_b", "moved"]  # `ModelDiff.moved` columns, without the kind prefix


@dataclass
class DiffTab:
    stored: gr.Dropdown
    show_button: gr.Button
    model_b: gr.Textbox
    config: list  # one component per `DiffConfig` field, in field order
    run_button: gr.Button
    summary: gr.Markdown
    weights: gr.Plot
    heads: gr.Dataframe
    scores: gr.Plot
    moved: gr.Dataframe
    behaviour: gr.Plot
    behaviour_table: gr.Dataframe
    download: gr.DownloadButton  # the diff shown, as JSON
    first_view: Callable | None = None

    @property
    def first_outputs(self) -> list:
        return [self.stored, self.summary, self.weights, self.heads, self.scores, self.moved, self.behaviour,
                self.behaviour_table, self.download]


def stored_runs(bench: Workbench) -> dict[str, str]:
    """`{label: path}` of the stored diffs with the current model as A: the default config first, then newest first."""
    rows = [r for r in store.list_runs() if r["record"] == "model_diff" and r["model"] == bench.info.slug]
    rows.sort(key=lambda r: (r["params"].get("config") != DEFAULTS.params(), -Path(r["path"]).stat().st_mtime))
    out = {}
    for r in rows:
        c, b = r["params"].get("config", {}), r["params"].get("b", {}).get("name", "?")
        check = f"{c.get('method')}-ablating {c.get('k')} heads on {c.get('task')}" if c.get("behaviour") else "no behaviour check"
        out[f"vs {b} · kinds {', '.join(c.get('kinds', [])) or 'none'} · {check} ({r['where']}, {Path(r['path']).stem})"] = r["path"]
    return out


def moved_frame(result: ModelDiff) -> pd.DataFrame | None:
    """The heads whose rank moved most, every score kind of the diff in one table (a `kind` column)."""
    frames = [result.moved(kind).rename(columns={f"{kind}_{c}": c for c in MOVED}).assign(kind=kind) for kind in result.scores]
    return pd.concat(frames, ignore_index=True)[["kind", "head", *MOVED, "change_rank"]] if frames else None


def diff_view(result: ModelDiff) -> tuple:
    """Summary, weight heatmaps, the most changed heads, the first kind's score shift, rank moves and the behaviour check."""
    first_kind = next(iter(result.scores), None)
    heads = result.to_frame().head(result.top)
    return (result.summary(), result.figure(), heads, result.score_figure(first_kind) if first_kind else None,
            moved_frame(result), result.behaviour_figure() if result.behaviour else None,
            result.behaviour_frame() if result.behaviour else None, result_json(result, "model-diff"))


def config_inputs() -> list:
    """One input per `DiffConfig` field, its default read from `DEFAULTS` (an empty `n`: the task's default)."""
    made = {
        "kinds": lambda v, **kw: gr.CheckboxGroup(hl.kinds(), value=list(v), label="score kinds compared", **kw),
        "top": lambda v, **kw: gr.Number(v, precision=0, label="heads listed (top)", **kw),
        "behaviour": lambda v, **kw: gr.Checkbox(v, label="behaviour check (most changed heads vs random heads ablated)", **kw),
        "task": lambda v, **kw: gr.Dropdown(task_names(), value=v, label="task", **kw),
        "k": lambda v, **kw: gr.Number(v, precision=0, label="k (most changed heads ablated)", **kw),
        "n_random": lambda v, **kw: gr.Number(v, precision=0, label="random head sets", **kw),
        "n": lambda v, **kw: gr.Number(v, precision=0, label="task samples (empty: the task's default)", **kw),
        "method": lambda v, **kw: gr.Dropdown(parameterless_methods(), value=v, label="ablation", **kw),
        "seed": lambda v, **kw: gr.Number(v, precision=0, label="seed", **kw),
    }
    return [made[f.name](getattr(DEFAULTS, f.name), elem_id=f"diff-{f.name.replace('_', '-')}") for f in dataclasses.fields(DiffConfig)]


def read_config(values: tuple) -> dict:
    """The form's values as `DiffConfig` keyword arguments, counts checked with the input's name."""
    form = dict(zip((f.name for f in dataclasses.fields(DiffConfig)), values))
    for name, high in (("top", MAX_TOP), ("k", MAX_K), ("n_random", MAX_N_RANDOM)):
        form[name] = check_count(form[name], name, 1, high)
    form["n"] = None if form["n"] is None or form["n"] != form["n"] else check_count(form["n"], "task samples", 1, MAX_N)
    form["seed"] = check_whole(form["seed"], "seed")
    return form


def layout() -> DiffTab:
    gr.Markdown(INTRO)
    with gr.Row():
        stored = gr.Dropdown([], label="stored diffs of this model (A)", elem_id="diff-stored", scale=4)
        show_button = gr.Button("Show", elem_id="diff-show", scale=1)
    with gr.Row():
        model_b = gr.Textbox(DEFAULT_B, label="model B (same shape): 'embedded-refusal', a Hugging Face name or a folder",
                             elem_id="diff-model-b", scale=3)
        run_button = gr.Button("Compare models", variant="primary", elem_id="diff-run", scale=1)
    with gr.Row():
        config = config_inputs()
    summary = gr.Markdown(NO_RUN, elem_id="diff-summary")
    download = json_button("diff-json", "⬇ JSON of this diff")
    weights = gr.Plot(label="weight change per head (QK, OV) and per layer (MLP)", elem_id="diff-weights")
    heads = table(label="most changed heads", elem_id="diff-heads")
    with gr.Row():
        scores = gr.Plot(label="score in B − A (first kind)", elem_id="diff-scores", scale=3)
        moved = table(label="ranks moved most near the top", elem_id="diff-moved", scale=2)
    with gr.Row():
        behaviour = gr.Plot(label="most changed heads vs random heads ablated", elem_id="diff-behaviour", scale=3)
        behaviour_table = table(label="behaviour per model", elem_id="diff-behaviour-table", scale=2)
    return DiffTab(stored, show_button, model_b, config, run_button, summary, weights, heads, scores, moved, behaviour,
                   behaviour_table, download)


def load_chosen(bench: Workbench, label: str | None) -> ModelDiff:
    """The stored diff picked in the list (only the list's own entries are read)."""
    runs = stored_runs(bench)
    if label not in runs:
        raise ValueError("Pick a stored diff from the list (or compare models).")
    return ModelDiff.load(Path(runs[label]))


def model_b_lab(bench: Workbench, name: str):
    """Model B from the shared pool (loaded if not held; what the app's `FileAccess` allows), not the visitor's own."""
    name = (name or "").strip()
    if not name:
        raise ValueError("Type model B: 'embedded-refusal', a Hugging Face name such as 'gpt2', or a local folder.")
    entry = bench.pool.get(name)
    if entry.lab is bench.lab:
        raise ValueError(f"Model B ('{name}') is your current model: type another model of the same shape.")
    return entry


def wire(tab: DiffTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: show a stored diff, compare the visitor's model with model B."""

    def first_view() -> tuple:
        runs = stored_runs(bench)
        listing = gr.update(choices=list(runs), value=next(iter(runs), None))
        if not runs:
            return listing, NO_RUN, None, None, None, None, None, None, None
        return listing, *diff_view(load_chosen(bench, next(iter(runs))))

    @reads_store
    def show(label: str) -> tuple:
        return diff_view(load_chosen(bench, label))

    @shows_errors
    def run(name: str, *values, progress=gr.Progress()) -> tuple:
        params = read_config(values)
        DiffConfig(**params)  # a bad form fails before model B loads
        entry = model_b_lab(bench, name)
        # Model B's lock, as a job on it would hold (jobs run one at a time, so holding two locks cannot deadlock).
        with entry.lock:
            result = hl.diff(bench.lab, entry.lab, progress=progress_to(progress), **params)
        runs = stored_runs(bench)
        path, _ = run_path(ModelId.of(bench.lab), ModelId.of(entry.lab), DiffConfig(**params))
        chosen = next((label for label, stored in runs.items() if Path(stored).name == path.name), None)
        return gr.update(choices=list(runs), value=chosen), *diff_view(result)

    tab.show_button.click(show, inputs=[tab.stored], outputs=tab.first_outputs[1:], api_name="diff_show", **READ_EVENT)
    tab.run_button.click(run, inputs=[tab.model_b, *tab.config], outputs=tab.first_outputs, api_name="diff",
                         concurrency_id=concurrency_id)
    tab.first_view = first_view


def build_diff_tab(bench: Workbench, concurrency_id: str) -> DiffTab:
    tab = layout()
    wire(tab, bench, concurrency_id)
    return tab
