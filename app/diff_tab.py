"""The Compare models tab: which heads did fine-tuning change, do their scores move, and do they matter (`hl.diff`).

Opens on a stored diff of the visitor's model (the default-config one first, so the embedded model shows the shipped
embedded -> embedded-refusal run; nothing is computed or loaded): the summary, the QK / OV / MLP weight-change
heatmaps, the most changed heads, the score shifts and the behaviour check. A job diffs the visitor's model (A)
against a second model (B) typed by name, loaded into the shared pool. Form defaults come from `DiffConfig`.
The per-head maps and tables are linked (`app.views.link_heads`): a click on a head's cell (weight change or score
shift) or a table row outlines it on both maps and shows its numbers in both models beside the weight map.
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
from app.views import clickable_heatmap, json_button, link_heads, result_json, table
from app.workbench import Workbench
from headlab import store
from headlab.ablation.methods import parameterless_methods
from headlab.diff import DiffConfig, ModelDiff, ModelId, run_path
from headlab.heads import head_label, parse_heads
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
HEAD_HINT = "Click a head on the weight or score map, or a table row: its numbers in both models show here."


@dataclass
class DiffTab:
    stored: gr.Dropdown
    show_button: gr.Button
    model_b: gr.Textbox
    config: list  # one component per `DiffConfig` field, in field order
    run_button: gr.Button
    summary: gr.Markdown
    weights: gr.Plot
    clicked: gr.Textbox  # hidden: the weight map cell clicked (`app.page`)
    head: gr.Textbox
    details: gr.Markdown  # the chosen head's numbers in both models
    heads: gr.Dataframe
    scores: gr.Plot
    scores_clicked: gr.Textbox  # hidden: the score map cell clicked
    moved: gr.Dataframe
    behaviour: gr.Plot
    behaviour_table: gr.Dataframe
    download: gr.DownloadButton  # the diff shown, as JSON
    shown: gr.State  # the `ModelDiff` shown, which the chosen head's numbers read
    first_view: Callable | None = None

    @property
    def first_outputs(self) -> list:
        return [self.stored, self.summary, self.weights, self.heads, self.scores, self.moved, self.behaviour,
                self.behaviour_table, self.download, self.details, self.shown]


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
    """Summary, weight heatmaps, the most changed heads, the first kind's score shift, rank moves, the behaviour check,
    the JSON, the head hint and the diff itself (`DiffTab.first_outputs` after the listing)."""
    first_kind = next(iter(result.scores), None)
    heads = result.to_frame().head(result.top)
    return (result.summary(), result.figure(), heads, result.score_figure(first_kind) if first_kind else None,
            moved_frame(result), result.behaviour_figure() if result.behaviour else None,
            result.behaviour_frame() if result.behaviour else None, result_json(result, "model-diff"), HEAD_HINT, result)


def head_in_both(result: ModelDiff | None, head_text: str) -> str:
    """A head's numbers in both models: how much its QK and OV circuits changed and, per score kind of the diff, its
    score and rank in A and in B (`ModelDiff.to_frame`'s row of the head)."""
    label = head_label(*parse_heads(head_text)[0])
    if result is None:
        return f"**{label}** (no diff shown yet)."
    frame = result.to_frame().set_index("head")
    if label not in frame.index:
        raise ValueError(f"{label} is not a head of this diff's models.")
    row = frame.loc[label]
    text = (f"**{label}** (change rank {int(row['change_rank'])} of {len(frame)}): QK circuit changed by {row['qk']:.4f}, "
            f"OV circuit by {row['ov']:.4f} (‖B − A‖ / ‖A‖).")
    if not result.scores:
        return text + " This diff compared no score kinds."
    lines = [f"Scores in A ({result.model_a}) → B ({result.model_b}):"]
    lines += [f"- **{kind}**: {row[f'{kind}_a']:.3f} (rank {int(row[f'{kind}_rank_a'])}) → {row[f'{kind}_b']:.3f} "
              f"(rank {int(row[f'{kind}_rank_b'])}), B − A {row[f'{kind}_delta']:+.3f}" for kind in result.scores]
    return text + "\n\n" + "\n".join(lines)


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


def maps_layout() -> tuple:
    """The linked per-head views: the weight map with the chosen head beside it, the most changed heads, the score map
    and the rank moves: (weights, clicked, head, details, download, heads, scores, scores_clicked, moved)."""
    with gr.Row():
        with gr.Column(scale=3):
            weights, clicked = clickable_heatmap("weight change per head (QK, OV) and per layer (MLP)", "diff-weights")
        with gr.Column(scale=2):
            head = gr.Textbox(head_label(0, 0), label="head (L18H6 or 18.6)", elem_id="diff-head")
            details = gr.Markdown(elem_id="diff-details")
            download = json_button("diff-json", "⬇ JSON of this diff")
    heads = table(label="most changed heads — click a row", elem_id="diff-heads")
    with gr.Row():
        with gr.Column(scale=3):
            scores, scores_clicked = clickable_heatmap("score in B − A (first kind)", "diff-scores")
        moved = table(label="ranks moved most near the top — click a row", elem_id="diff-moved", scale=2)
    return weights, clicked, head, details, download, heads, scores, scores_clicked, moved


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
    weights, clicked, head, details, download, heads, scores, scores_clicked, moved = maps_layout()
    with gr.Row():
        behaviour = gr.Plot(label="most changed heads vs random heads ablated", elem_id="diff-behaviour", scale=3)
        behaviour_table = table(label="behaviour per model", elem_id="diff-behaviour-table", scale=2)
    return DiffTab(stored, show_button, model_b, config, run_button, summary, weights, clicked, head, details, heads, scores,
                   scores_clicked, moved, behaviour, behaviour_table, download, gr.State())


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


def first_view(bench: Workbench) -> tuple:
    """`DiffTab.first_outputs`: the stored diffs of the visitor's model, the first one shown (nothing computed or loaded)."""
    runs = stored_runs(bench)
    listing = gr.update(choices=list(runs), value=next(iter(runs), None))
    if not runs:
        return listing, NO_RUN, None, None, None, None, None, None, None, HEAD_HINT, None
    return listing, *diff_view(load_chosen(bench, next(iter(runs))))


def link_head_views(tab: DiffTab) -> None:
    """A head chosen on either map (a cell), in either table (a row) or typed: outlined on both maps, its numbers in
    both models beside the weight map (read from the diff shown)."""
    numbers = dict(fn=reads_store(head_in_both), inputs=[tab.shown, tab.head], outputs=[tab.details], **READ_EVENT)
    link_heads(tab.weights, tab.clicked, tab.head, tab.details, tables=[tab.heads, tab.moved], then=[numbers],
               also=[(tab.scores, tab.scores_clicked)])


def wire(tab: DiffTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: show a stored diff, compare the visitor's model with model B, and the linked head views."""

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
    link_head_views(tab)
    tab.first_view = lambda: first_view(bench)


def build_diff_tab(bench: Workbench, concurrency_id: str) -> DiffTab:
    tab = layout()
    wire(tab, bench, concurrency_id)
    return tab
