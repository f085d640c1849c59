"""The Retrieval tab: which heads copy the needle, and does the model still find it without them?

Scores retrieval heads on a needle-in-a-haystack grid, shows the top heads, the needle accuracy
over context length x depth intact and with the top-k heads ablated (`needle_accuracy`), and the
top-k vs random-k curve (`retrieval_curve`). The form's defaults are the retrieval scorer's, so the
shipped run in cached_runs/ answers it. The haystack is a built-in one, an uploaded text file, or a path
inside the app's files folder (`Workbench.files`).
"""
from dataclasses import dataclass

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import progress_to, shows_errors
from app.inputs import check_count, hiding_file_text, parse_numbers  # noqa: F401  (parse_numbers: also the runtime tab's)
from app.workbench import Workbench
from headlab.ablation import METHODS, method_fields
from headlab.ablation.methods import DEFAULT_METHOD
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
    grid: gr.Plot
    curve: gr.Plot

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
    status = gr.Markdown("Press **Score retrieval heads** (a stored run is read, not recomputed).", elem_id="retrieval-status")
    with gr.Row():
        with gr.Column(scale=2):
            top = gr.Dataframe(pd.DataFrame(columns=["rank", "head", SCORE_COLUMN]), label="Top retrieval heads",
                               interactive=False, elem_id="retrieval-top")
        with gr.Column(scale=3):
            grid = gr.Plot(label="needle accuracy, length x depth", elem_id="retrieval-grid-plot")
    curve = gr.Plot(label="top-k vs random-k", elem_id="retrieval-curve-plot")
    return RetrievalTab(shape=shape, haystack=haystack, haystack_file=haystack_file, lengths=lengths, depths=depths, n=n, k=k,
                        method=method, score_button=score_button, grid_button=grid_button, curve_button=curve_button, status=status,
                        top=top, grid=grid, curve=curve)


def wire(tab: RetrievalTab, bench: Workbench, concurrency_id: str) -> RetrievalTab:
    @shows_errors
    def score(shape, haystack, lengths_text, depths_text, n, haystack_file=None):
        scores = retrieval_scores(bench, shape, haystack, lengths_text, depths_text, n, haystack_file)
        return scores.top_frame(TOP_K, SCORE_COLUMN), retrieval_summary(scores)

    @shows_errors
    def accuracy(shape, haystack, lengths_text, depths_text, n, k, method, haystack_file=None):
        scores = retrieval_scores(bench, shape, haystack, lengths_text, depths_text, n, haystack_file)
        return needle_accuracy(bench.lab, scores, check_k(bench, k), method).figure()

    @shows_errors
    def ablation_curve(shape, haystack, lengths_text, depths_text, n, k, method, haystack_file=None, progress=gr.Progress()):
        scores = retrieval_scores(bench, shape, haystack, lengths_text, depths_text, n, haystack_file)
        ks = curve_ks(check_k(bench, k))
        return retrieval_curve(bench.lab, scores, ks, method=method, progress=progress_to(progress)).figure()

    lab_job = {"concurrency_id": concurrency_id}
    with_k = [*tab.form, tab.k, tab.method, tab.haystack_file]
    tab.score_button.click(score, inputs=[*tab.form, tab.haystack_file], outputs=[tab.top, tab.status], api_name="retrieval", **lab_job)
    tab.grid_button.click(accuracy, inputs=with_k, outputs=[tab.grid], api_name="needle_accuracy", **lab_job)
    tab.curve_button.click(ablation_curve, inputs=with_k, outputs=[tab.curve],
                           api_name="retrieval_curve", **lab_job)
    return tab


def build_retrieval_tab(bench: Workbench, concurrency_id: str) -> RetrievalTab:
    return wire(layout(), bench, concurrency_id)
