"""The Retrieval tab: which heads copy the needle, and does the model still find it without them?

Scores retrieval heads on a needle-in-a-haystack grid, shows the top heads, the needle accuracy
over context length x depth intact and with the top-k heads ablated (`needle_accuracy`), and the
top-k vs random-k curve (`retrieval_curve`), each read from the store when there (`headlab.needle_grid` keeps the
grid): the form's defaults are the retrieval scorer's, so the shipped runs in cached_runs/ answer them and those
buttons compute nothing. The heatmap of every head's score is linked (`app.views.link_heads`): a cell or a row of
the top table outlines a head and says its score and rank. The haystack is a built-in one, an uploaded text file, or a path
inside the app's files folder (`Workbench.files`).
"""
from dataclasses import dataclass
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import progress_to, shows_errors
from headlab.needle_grid import StoredGrid, grid_params, needle_grid, stored_grid
from app.inputs import check_count, hiding_file_text, parse_numbers  # noqa: F401  (parse_numbers: also the runtime tab's)
from app.workbench import Workbench
from app.views import clickable_heatmap, json_button, link_heads, result_json, table
from headlab.ablation import METHODS, method_fields
from headlab.ablation.methods import DEFAULT_METHOD
from headlab.heads import head_label
from headlab.datasets.needles import HAYSTACKS, NEEDLE_SHAPES
from headlab.scorers import scorer_fields
from headlab.scorers.retrieval import ABLATE_K, curve_ks, needle_accuracy, retrieval_curve, retrieval_summary

MAX_N = 64
TOP_K = 15
SCORE_COLUMN = "retrieval score"


@dataclass
class RetrievalTab:
    shape: gr.Dropdown
    haystack: gr.Dropdown
    haystack_file: gr.File
    lengths: gr.Textbox
    depths: gr.Textbox
    n: gr.Number
    k: gr.Number
    method: gr.Radio
    score_button: gr.Button
    grid_button: gr.Button
    curve_button: gr.Button
    status: gr.Markdown
    top: gr.Dataframe
    heatmap: gr.Plot
    clicked: gr.Textbox  # hidden: the heatmap cell clicked (`app.page`)
    head: gr.Textbox
    details: gr.Markdown
    scores_json: gr.DownloadButton
    grid: gr.Plot
    grid_summary: gr.Markdown
    grid_json: gr.DownloadButton
    curve: gr.Plot
    curve_json: gr.DownloadButton
    first_view: Callable | None = None  # set by the wiring: the stored run the form names, its stored grid and curve

    @property
    def first_inputs(self) -> list:
        return [*self.form, self.k, self.method]

    @property
    def score_outputs(self) -> list:
        return [self.top, self.status, self.heatmap, self.scores_json]

    @property
    def grid_outputs(self) -> list:
        return [self.grid, self.grid_summary, self.grid_json]

    @property
    def first_outputs(self) -> list:
        return [*self.score_outputs, *self.grid_outputs, self.curve, self.curve_json]

    @property
    def form(self) -> list:
        """The inputs naming one retrieval run but the uploaded haystack (each event's last input, so API calls may leave it out)."""
        return [self.shape, self.haystack, self.lengths, self.depths, self.n]


def retrieval_scores(bench: Workbench, shape: str, haystack: str, lengths_text: str, depths_text: str, n: float,
                     haystack_file: str | None = None) -> hl.HeadScores:
    """The retrieval run the form names, from the store when there (the shipped run is the form's defaults).

    An uploaded `haystack_file` replaces the `haystack` field; a typed path must lie in the app's files folder.
    """
    source = bench.files.user_file(haystack, haystack_file, HAYSTACKS, "haystack")
    lengths, depths = parse_numbers(lengths_text, "context lengths", int), parse_numbers(depths_text, "depths", float)
    with hiding_file_text(source if source not in HAYSTACKS else None):
        return hl.score(bench.lab, "retrieval", needle=shape, haystack=source, lengths=lengths, depths=depths,
                        n=check_count(n, "needles per cell", 1, MAX_N))


def check_k(bench: Workbench, k: float) -> int:
    return check_count(k, "k", 1, bench.info.n_layers * bench.info.n_heads // 2)


def scores_view(scores: hl.HeadScores, note: str = "") -> tuple:
    """(top table, summary, heatmap, JSON download) of a retrieval run."""
    return (scores.top_frame(TOP_K, SCORE_COLUMN), retrieval_summary(scores) + note,
            scores.heatmap(f"retrieval score — {scores.model}"), result_json(scores, "retrieval-scores"))


def grid_view(scores: hl.HeadScores, k: int, method: str, grid, read: bool) -> tuple:
    """(grid figure, summary saying whether it was read or computed, JSON download) of an accuracy grid."""
    source = "read from the store" if read else "computed now and stored"
    record = StoredGrid(grid, grid_params(scores, k, method))
    return grid.figure(), f"{grid.summary()} (Grid {source}.)", result_json(record, "retrieval-grid")


def layout() -> RetrievalTab:
    defaults = scorer_fields("retrieval")
    plain_methods = [name for name in sorted(METHODS) if not method_fields(name)]  # methods without parameters
    gr.Markdown(
        "A **retrieval head** attends to the needle token it is about to copy while the model answers "
        "(Wu et al. 2024). Ablating them should make the needle impossible to find; random heads should not."
    )
    with gr.Row():
        shape = gr.Dropdown(list(NEEDLE_SHAPES), value=defaults["needle"], label="needle", elem_id="retrieval-shape")
        haystack = gr.Dropdown(list(HAYSTACKS), value=defaults["haystack"], allow_custom_value=True,
                               label="haystack (or a path in the app's files folder)", elem_id="retrieval-haystack")
        haystack_file = gr.File(label="or upload a text file as the haystack", type="filepath", file_count="single",
                                elem_id="retrieval-haystack-file")
        lengths = gr.Textbox(", ".join(map(str, defaults["lengths"])), label="context lengths (tokens)", elem_id="retrieval-lengths")
        depths = gr.Textbox(", ".join(map(str, defaults["depths"])), label="depths (0 = start, 1 = end)", elem_id="retrieval-depths")
        n = gr.Number(defaults["n"], precision=0, label="needles per cell (scoring)", elem_id="retrieval-n")
    with gr.Row():
        k = gr.Number(ABLATE_K, precision=0, label="k (heads to ablate)", elem_id="retrieval-k")
        method = gr.Radio(plain_methods, value=DEFAULT_METHOD, label="ablation", elem_id="retrieval-method")
        score_button = gr.Button("Score retrieval heads", variant="primary", elem_id="retrieval-score")
        grid_button = gr.Button("Accuracy intact vs ablated", elem_id="retrieval-grid")
        curve_button = gr.Button("Top-k vs random-k curve", elem_id="retrieval-curve")
    status = gr.Markdown("Reading the stored run…", elem_id="retrieval-status")
    with gr.Row():
        with gr.Column(scale=2):
            top = table(pd.DataFrame(columns=["rank", "head", SCORE_COLUMN]), label="Top retrieval heads — click a row",
                        elem_id="retrieval-top")
            scores_json = json_button("retrieval-json", "⬇ JSON of this run")
        with gr.Column(scale=3):
            heatmap, clicked = clickable_heatmap("retrieval score of every head", "retrieval-heatmap")
            head = gr.Textbox(head_label(0, 0), label="head (L18H6 or 18.6)", elem_id="retrieval-head")
            details = gr.Markdown(elem_id="retrieval-details")
    with gr.Row():
        with gr.Column(scale=3):
            grid = gr.Plot(label="needle accuracy, length x depth", elem_id="retrieval-grid-plot")
        with gr.Column(scale=2):
            grid_summary = gr.Markdown(elem_id="retrieval-grid-summary")
            grid_json = json_button("retrieval-grid-json")
    curve = gr.Plot(label="top-k vs random-k", elem_id="retrieval-curve-plot")
    curve_json = json_button("retrieval-curve-json")
    return RetrievalTab(shape=shape, haystack=haystack, haystack_file=haystack_file, lengths=lengths, depths=depths, n=n, k=k,
                        method=method, score_button=score_button, grid_button=grid_button, curve_button=curve_button, status=status,
                        top=top, heatmap=heatmap, clicked=clicked, head=head, details=details, scores_json=scores_json,
                        grid=grid, grid_summary=grid_summary, grid_json=grid_json, curve=curve, curve_json=curve_json)


def wire(tab: RetrievalTab, bench: Workbench, concurrency_id: str) -> RetrievalTab:
    @shows_errors
    def score(shape, haystack, lengths_text, depths_text, n, haystack_file=None):
        return scores_view(retrieval_scores(bench, shape, haystack, lengths_text, depths_text, n, haystack_file))

    @shows_errors
    def accuracy(shape, haystack, lengths_text, depths_text, n, k, method, haystack_file=None):
        scores = retrieval_scores(bench, shape, haystack, lengths_text, depths_text, n, haystack_file)
        k_heads = check_k(bench, k)
        return grid_view(scores, k_heads, method, *needle_grid(bench.lab, scores, k_heads, method))

    @shows_errors
    def ablation_curve(shape, haystack, lengths_text, depths_text, n, k, method, haystack_file=None, progress=gr.Progress()):
        scores = retrieval_scores(bench, shape, haystack, lengths_text, depths_text, n, haystack_file)
        ks = curve_ks(check_k(bench, k))
        curve = retrieval_curve(bench.lab, scores, ks, method=method, progress=progress_to(progress))
        return curve.figure(), result_json(curve, "retrieval-curve")

    lab_job = {"concurrency_id": concurrency_id}
    with_k = [*tab.form, tab.k, tab.method, tab.haystack_file]
    tab.score_button.click(score, inputs=[*tab.form, tab.haystack_file], outputs=tab.score_outputs, api_name="retrieval", **lab_job)
    tab.grid_button.click(accuracy, inputs=with_k, outputs=tab.grid_outputs, api_name="needle_accuracy", **lab_job)
    tab.curve_button.click(ablation_curve, inputs=with_k, outputs=[tab.curve, tab.curve_json],
                           api_name="retrieval_curve", **lab_job)
    link_heads(tab.heatmap, tab.clicked, tab.head, tab.details, tables=[tab.top])

    def first_view(shape, haystack, lengths_text, depths_text, n, k, method) -> tuple:
        """The stored run of the form, its stored grid and curve (nothing computed: a missing one is left empty)."""
        lengths, depths = parse_numbers(lengths_text, "context lengths", int), parse_numbers(depths_text, "depths", float)
        scores = hl.stored(bench.lab, "retrieval", needle=shape, haystack=haystack, lengths=lengths, depths=depths,
                           n=check_count(n, "needles per cell", 1, MAX_N)) if haystack in HAYSTACKS else None
        if scores is None:
            return (gr.skip(), f"No stored retrieval run for {bench.info.name} with this form: press **Score retrieval heads**.",
                    None, None, None, "", None, None, None)
        k_heads = check_k(bench, k)
        grid = stored_grid(bench.lab, scores, k_heads, method)
        shown = grid_view(scores, k_heads, method, grid, True) if grid else (
            None, "Press **Accuracy intact vs ablated** (no stored grid for this k and ablation).", None)
        curve = bench.stored_curve(scores)
        return (*scores_view(scores), *shown, curve.figure() if curve else None,
                result_json(curve, "retrieval-curve") if curve else None)

    tab.first_view = first_view
    return tab


def build_retrieval_tab(bench: Workbench, concurrency_id: str) -> RetrievalTab:
    return wire(layout(), bench, concurrency_id)
