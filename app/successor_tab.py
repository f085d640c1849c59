"""The Successor tab (Gould et al. 2023): which heads' OV circuits map an ordinal item to the next one.

1. The succession score of every head as a heatmap (variant chosen: effective embedding, final
   norm, centring; the defaults are the paper's), the top heads, the lists used and what was dropped.
2. One head: its accuracy per ordinal list and its prediction for every item.
3. The behavioural check: continuation accuracy on "Monday, Tuesday, Wednesday," prompts intact,
   with the top-k successor heads ablated, and with random k-head sets ablated.

A view only: scores, tables, figures and summaries come from `headlab.scorers.successor`.
"""
from dataclasses import dataclass
from typing import Callable

import gradio as gr

import headlab as hl
import headlab.scorers.successor as succ
import headlab.tasks.successor  # noqa: F401  (registers the "successor" task)
from app.feedback import progress_to, shows_errors
from app.forms import CheckForm, check_form
from app.inputs import check_count
from app.workbench import Workbench
from app.views import clickable_heatmap, head_details, highlighted, json_button, link_heads, result_json, table
from headlab.heads import format_heads, parse_heads
from headlab.scorers import scorer_fields

TOP_ROWS = 15
MAX_N_RANDOM = 20
INTRO = (
    "**Successor heads** (Gould et al. 2023) turn an ordinal item into the next one (Monday → Tuesday). "
    "Succession score: the item's effective embedding (by default MLP0's output on its token embedding) through the "
    "head's OV circuit, the final norm and the unembedding; a hit when the successor is the top item of its list."
)


@dataclass
class SuccessorTab:
    embedding: gr.Dropdown
    final_norm: gr.Checkbox
    center: gr.Checkbox
    exclude_self: gr.Checkbox
    score_button: gr.Button
    status: gr.Markdown
    heatmap: gr.Plot
    clicked: gr.Textbox  # hidden: the heatmap cell clicked (`app.page`)
    details: gr.Markdown
    top: gr.Dataframe
    download: gr.DownloadButton
    head: gr.Textbox
    head_button: gr.Button
    head_tasks: gr.Dataframe
    head_items: gr.Dataframe
    check: CheckForm
    first_view: Callable | None = None  # set by the wiring: the stored run of the variant and its stored check

    @property
    def variant(self) -> list:
        return [self.embedding, self.final_norm, self.center, self.exclude_self]

    @property
    def first_inputs(self) -> list:
        return self.variant

    @property
    def first_outputs(self) -> list:
        return [*self.score_outputs, self.head_tasks, *self.check.outputs]

    @property
    def score_outputs(self) -> list:
        return [self.heatmap, self.top, self.status, self.head, self.details, self.download]


def successor_scores(bench: Workbench, embedding: str | None = None, final_norm: bool | None = None,
                     center: bool | None = None, exclude_self: bool | None = None) -> hl.HeadScores:
    """The succession scores of the current model for one variant (the scorer's defaults where not given)."""
    form = {"embedding": embedding, "final_norm": final_norm, "center": center, "exclude_self": exclude_self}
    return hl.score(bench.lab, "successor", **{key: value for key, value in form.items() if value is not None})


def layout() -> SuccessorTab:
    """The tab's components, defaults read from the `Successor` scorer and the behavioural check's config."""
    fields, check = scorer_fields("successor"), succ.CHECK
    gr.Markdown(INTRO)
    with gr.Row():
        embedding = gr.Dropdown(list(succ.EMBEDDINGS), value=fields["embedding"], label="effective embedding", elem_id="successor-embedding")
        final_norm = gr.Checkbox(fields["final_norm"], label="final norm", elem_id="successor-final-norm")
        center = gr.Checkbox(fields["center"], label="centre per list", elem_id="successor-center")
        exclude_self = gr.Checkbox(fields["exclude_self"], label="argmax over the other items (not the paper's)", elem_id="successor-exclude-self")
        score_button = gr.Button("Score successor heads", variant="primary", elem_id="successor-score")
    status = gr.Markdown("Press **Score successor heads** (a stored run is read; computing takes seconds).", elem_id="successor-status")
    with gr.Row():
        with gr.Column(scale=3):
            heatmap, clicked = clickable_heatmap("succession score per head", "successor-heatmap")
        with gr.Column(scale=2):
            with gr.Row():
                head = gr.Textbox("L0H0", label="head (L18H6 or 18.6)", elem_id="successor-head")
                head_button = gr.Button("Show head", elem_id="successor-show-head")
            details = gr.Markdown(elem_id="successor-details")
            top = table(label=f"Top {TOP_ROWS} heads — click a row", interactive=False, elem_id="successor-top")
            download = json_button("successor-json", "⬇ JSON of this run")
    gr.Markdown("### The chosen head, list by list")
    with gr.Row():
        head_tasks = table(label="accuracy per list", interactive=False, elem_id="successor-head-tasks")
        head_items = table(label="prediction per item", interactive=False, elem_id="successor-head-items")
    gr.Markdown("### Behaviour: continue 'Monday, Tuesday, Wednesday,' with the top heads ablated vs random heads")
    form = check_form(check, "successor", "prompts (n)", "Run behavioural check", "accuracy per k")
    return SuccessorTab(embedding, final_norm, center, exclude_self, score_button, status, heatmap, clicked, details, top,
                        download, head, head_button, head_tasks, head_items, check=form)


def wire(tab: SuccessorTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: each reads the variant from the form and shows what the library returns."""

    def view(scores: hl.HeadScores) -> tuple:
        """(heatmap with the best head outlined, top table, summary, that head, its details, JSON)."""
        best = tuple(scores.top_heads(1)[0])
        return (highlighted(scores.heatmap(title=f"succession score — {scores.model}"), best), scores.top_frame(TOP_ROWS, "score"),
                succ.summary(scores), format_heads([best]), head_details(scores.values, best, scores.kind),
                result_json(scores, "successor-scores"))

    @shows_errors
    def score(*variant) -> tuple:
        return view(successor_scores(bench, *variant))

    def first_view(*variant) -> tuple:
        form = dict(zip(("embedding", "final_norm", "center", "exclude_self"), variant))
        scores = hl.stored(bench.lab, "successor", **form)
        if scores is None:
            message = f"No stored successor run for {bench.info.name} with this variant: press **Score successor heads**."
            return None, gr.skip(), message, gr.skip(), "", None, gr.skip(), "", None, gr.skip(), None
        curve = bench.stored_curve(scores)
        check = (f"{curve.summary()} (stored run)", curve.figure(), curve.to_frame(), result_json(curve, "successor-check")) if curve else (
            "Press **Run behavioural check** (no stored check for this variant).", None, gr.skip(), None)
        return *view(scores), succ.list_accuracy(scores, *scores.top_heads(1)[0]), *check

    @shows_errors
    def show_head(*form) -> tuple:
        *variant, head_text = form
        heads = parse_heads(head_text, bench.info)
        if len(heads) != 1:
            raise ValueError(f"Give one head, e.g. L18H6; got {len(heads)}.")
        layer, head = heads[0]
        scores = successor_scores(bench, *variant)
        params = {key: scores.params[key] for key in ("embedding", "final_norm", "center", "exclude_self")}
        return succ.list_accuracy(scores, layer, head), succ.head_predictions(bench.lab, layer, head, **params)

    @shows_errors
    def run_check(*form, progress=gr.Progress()) -> tuple:
        *variant, k_value, n_random_value, n_value, method_value = form
        k_heads = check_count(k_value, "k", 1, bench.info.n_layers * bench.info.n_heads // 2)
        n_sets = check_count(n_random_value, "random sets", 1, MAX_N_RANDOM)
        curve = succ.behaviour_check(bench.lab, successor_scores(bench, *variant), k_heads, n_sets,
                                     check_count(n_value, "prompts (n)", 1, 1024), method_value, progress=progress_to(progress))
        return (f"{curve.summary()} Top-{k_heads}: {format_heads(curve.top_heads[0])}.", curve.figure(), curve.to_frame(),
                result_json(curve, "successor-check"))

    variant = [tab.embedding, tab.final_norm, tab.center, tab.exclude_self]
    lab_job = {"concurrency_id": concurrency_id}
    head_event = dict(fn=show_head, inputs=[*variant, tab.head], outputs=[tab.head_tasks, tab.head_items], **lab_job)
    tab.score_button.click(score, inputs=variant, outputs=tab.score_outputs, api_name="successor", **lab_job)
    tab.head_button.click(api_name="successor_head", **head_event)
    link_heads(tab.heatmap, tab.clicked, tab.head, tab.details, tables=[tab.top], then=[head_event])
    tab.check.button.click(run_check, inputs=[*variant, *tab.check.inputs],
                           outputs=tab.check.outputs, api_name="successor_check", **lab_job)
    tab.first_view = first_view


def build_successor_tab(bench: Workbench, concurrency_id: str) -> SuccessorTab:
    tab = layout()
    wire(tab, bench, concurrency_id)
    return tab
