"""The Retrieval tab: which heads copy the needle, and does the model still find it without them?

Scores retrieval heads on a needle-in-a-haystack grid, shows the top heads, the needle accuracy
over context length x depth intact and with the top-k heads ablated, and the top-k vs random-k curve.
"""
from dataclasses import dataclass

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import headlab as hl
from app.feedback import progress_to, shows_errors
from app.inputs import check_count
from app.workbench import Workbench
from headlab.ablation import ablation_hooks
from headlab.datasets.needles import HAYSTACKS, NEEDLE_SHAPES
from headlab.tasks import make_task

TASK_OF_SHAPE = {"fact": "needle", "passkey": "passkey"}
DEFAULT_SHAPE = "fact"  # the needle the embedded model can retrieve
DEFAULT_LENGTHS = "256, 512"  # the shipped run in cached_runs/
DEFAULT_DEPTHS = "0.1, 0.5, 0.9"
DEFAULT_N = 3  # needles per (length, depth) cell: the scorer's default, as shipped
MAX_N = 64
CURVE_TASK_N = 2  # needles per cell of the needle task in the curve: 6 prompts of the shortest length
CURVE_N_RANDOM = 5  # random head sets per k
TOP_COLUMNS = ["rank", "layer", "head", "retrieval score"]


@dataclass
class RetrievalTab:
    shape: gr.Dropdown
    haystack: gr.Dropdown
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


def parse_numbers(text: str, name: str, cast):
    """'256, 512' -> [256, 512] (with `cast`), or `ValueError` naming the input."""
    try:
        values = [cast(item) for item in (text or "").replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{name} must be numbers separated by commas; got {text!r}.") from None
    if not values:
        raise ValueError(f"Fill in {name}.")
    return values


def retrieval_scores(bench: Workbench, shape: str, haystack: str, lengths: list[int], depths: list[float], n: int) -> hl.HeadScores:
    """The retrieval run for this form, from the store when there (the shipped run is the form's defaults)."""
    return hl.score(bench.lab, "retrieval", needle=shape, haystack=haystack, lengths=lengths, depths=depths, n=n)


def top_table(scores: hl.HeadScores, k: int = 15) -> pd.DataFrame:
    rows = [(rank, l, h, round(v, 4)) for rank, (l, h, v) in enumerate(scores.top(k), 1)]
    return pd.DataFrame(rows, columns=TOP_COLUMNS)


def summary(scores: hl.HeadScores) -> str:
    meta = scores.meta
    stability = ", ".join(f"{pair}: {value}" for pair, value in meta["stability_across_lengths"].items()) or "one length"
    return (
        f"**{scores.params['needle']}** needles in **{scores.params['haystack']}**, {meta['n_samples']} prompts: "
        f"model accuracy **{meta['accuracy']:.0%}**; {meta['fraction_above_threshold']:.1%} of heads score above "
        f"{meta['threshold']}; top-{scores.params['stability_k']} Jaccard across lengths — {stability}."
    )


def accuracy_grids(bench: Workbench, shape: str, haystack: str, lengths: list[int], depths: list[float], heads, method: str):
    """`([length, depth] intact, [length, depth] ablated)` accuracy of the needle task."""
    task = make_task(TASK_OF_SHAPE[shape], bench.lab, n=1, haystack=haystack, lengths=lengths, depths=depths)
    return task.cell_accuracy(), task.cell_accuracy(ablation_hooks(bench.lab, heads, method, task))


def grid_figure(intact, ablated, lengths: list[int], depths: list[float], k: int) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=["intact", f"top-{k} retrieval heads ablated"])
    for col, grid in enumerate((intact, ablated), 1):
        fig.add_trace(go.Heatmap(
            z=grid.numpy(), x=[str(d) for d in depths], y=[str(l) for l in lengths], zmin=0, zmax=1,
            colorscale="RdYlGn", showscale=col == 2, hovertemplate="length %{y}, depth %{x}<br>accuracy %{z:.2f}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(title_text="needle depth", type="category", row=1, col=col)
        fig.update_yaxes(title_text="context length", type="category", row=1, col=col)
    fig.update_layout(height=360, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig


def build_retrieval_tab(bench: Workbench, concurrency_id: str) -> RetrievalTab:
    gr.Markdown(
        "A **retrieval head** attends to the needle token it is about to copy while the model answers "
        "(Wu et al. 2024). Ablating them should make the needle impossible to find; random heads should not."
    )
    with gr.Row():
        shape = gr.Dropdown(list(NEEDLE_SHAPES), value=DEFAULT_SHAPE, label="needle", elem_id="retrieval-shape")
        haystack = gr.Dropdown(list(HAYSTACKS), value="filler", allow_custom_value=True,
                               label="haystack (or a text file's path)", elem_id="retrieval-haystack")
        lengths = gr.Textbox(DEFAULT_LENGTHS, label="context lengths (tokens)", elem_id="retrieval-lengths")
        depths = gr.Textbox(DEFAULT_DEPTHS, label="depths (0 = start, 1 = end)", elem_id="retrieval-depths")
        n = gr.Number(DEFAULT_N, precision=0, label="needles per cell (scoring)", elem_id="retrieval-n")
    with gr.Row():
        k = gr.Number(10, precision=0, label="k (heads to ablate)", elem_id="retrieval-k")
        method = gr.Radio(["mean", "zero"], value="mean", label="ablation", elem_id="retrieval-method")
        score_button = gr.Button("Score retrieval heads", variant="primary", elem_id="retrieval-score")
        grid_button = gr.Button("Accuracy intact vs ablated", elem_id="retrieval-grid")
        curve_button = gr.Button("Top-k vs random-k curve", elem_id="retrieval-curve")
    status = gr.Markdown("Press **Score retrieval heads** (a stored run is read, not recomputed).", elem_id="retrieval-status")
    with gr.Row():
        with gr.Column(scale=2):
            top = gr.Dataframe(pd.DataFrame(columns=TOP_COLUMNS), label="Top retrieval heads", interactive=False, elem_id="retrieval-top")
        with gr.Column(scale=3):
            grid = gr.Plot(label="needle accuracy, length x depth", elem_id="retrieval-grid-plot")
    curve = gr.Plot(label="top-k vs random-k", elem_id="retrieval-curve-plot")

    def read_form(shape_value, haystack_value, lengths_text, depths_text, n_value):
        """(shape, haystack, lengths, depths, n): the scoring run the form names."""
        return (shape_value, haystack_value, parse_numbers(lengths_text, "context lengths", int),
                parse_numbers(depths_text, "depths", float), check_count(n_value, "needles per cell", 1, MAX_N))

    @shows_errors
    def score(shape_value, haystack_value, lengths_text, depths_text, n_value):
        scores = retrieval_scores(bench, *read_form(shape_value, haystack_value, lengths_text, depths_text, n_value))
        return top_table(scores), summary(scores)

    @shows_errors
    def accuracy(shape_value, haystack_value, lengths_text, depths_text, n_value, k_value, method_value):
        form = read_form(shape_value, haystack_value, lengths_text, depths_text, n_value)
        k_heads = check_count(k_value, "k", 1, bench.info.n_layers * bench.info.n_heads // 2)
        heads = retrieval_scores(bench, *form).top_heads(k_heads)
        intact, ablated = accuracy_grids(bench, *form[:4], heads, method_value)
        return grid_figure(intact, ablated, form[2], form[3], k_heads)

    @shows_errors
    def ablation_curve(shape_value, haystack_value, lengths_text, depths_text, n_value, k_value, method_value, progress=gr.Progress()):
        form = read_form(shape_value, haystack_value, lengths_text, depths_text, n_value)
        most = check_count(k_value, "k", 1, bench.info.n_layers * bench.info.n_heads // 2)
        ks = sorted({max(1, most // 4), max(1, most // 2), most})
        curve_result = hl.ablation_curve(
            bench.lab, retrieval_scores(bench, *form), TASK_OF_SHAPE[form[0]], ks, method=method_value,
            n_random=CURVE_N_RANDOM, n=CURVE_TASK_N,
            task_params={"haystack": form[1], "lengths": [min(form[2])], "depths": form[3]}, progress=progress_to(progress),
        )
        return curve_result.figure()

    form_inputs = [shape, haystack, lengths, depths, n]
    lab_job = {"concurrency_id": concurrency_id}
    score_button.click(score, inputs=form_inputs, outputs=[top, status], api_name="retrieval", **lab_job)
    grid_button.click(accuracy, inputs=[*form_inputs, k, method], outputs=[grid], api_name="needle_accuracy", **lab_job)
    curve_button.click(ablation_curve, inputs=[*form_inputs, k, method], outputs=[curve], api_name="retrieval_curve", **lab_job)
    return RetrievalTab(
        shape=shape, haystack=haystack, lengths=lengths, depths=depths, n=n, k=k, method=method, score_button=score_button,
        grid_button=grid_button, curve_button=curve_button, status=status, top=top, grid=grid, curve=curve,
    )
