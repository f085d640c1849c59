"""The Head atlas tab: score every head for one kind, see the heatmap and the top heads, and look at a head's attention pattern.

Scores come from `hl.stored` / `hl.score`, the table from `HeadScores.top_frame`, the heatmap from
`HeadScores.heatmap` and the pattern from `headlab.viz.head_pattern_view`: this module only lays out
the form and wires it.
"""
import html
import time
from dataclasses import dataclass
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import progress_to, selected_row, shows_errors
from app.inputs import check_count, parse_head
from app.workbench import Workbench
from headlab.heads import head_label
from headlab.scorers import scorer_fields
from headlab.viz import head_pattern_view

DEFAULT_KIND = "induction"
DEFAULT_PROMPT = (
    "The old lighthouse keeper climbed the stairs. Years later, the old lighthouse keeper climbed the stairs again."
)
MAX_N = 1024
MAX_SEED = 2**31 - 1
TOP_K = 10


@dataclass
class AtlasTab:
    kind: gr.Dropdown
    n: gr.Number
    seed: gr.Number
    recompute: gr.Checkbox
    score_button: gr.Button
    status: gr.Markdown
    heatmap: gr.Plot
    top: gr.Dataframe
    prompt: gr.Textbox
    head: gr.Textbox
    show_button: gr.Button
    pattern: gr.HTML
    show_stored: Callable | None = None  # handler set by the wiring: the stored run of the chosen kind, computing nothing

    @property
    def stored_inputs(self) -> list:
        return [self.kind, self.n, self.seed, self.prompt]

    @property
    def stored_outputs(self) -> list:
        return [self.heatmap, self.top, self.status, self.n, self.seed, self.head, self.pattern]


def run_params(kind: str, n: float | None, seed: float | None) -> dict:
    """The form's `n` and `seed` as parameters of a `kind` run, each only if the kind takes it (an empty
    `n` means the kind's own default where that default is None)."""
    fields, params = scorer_fields(kind), {}
    if "n" in fields and not (n is None and fields["n"] is None):
        params["n"] = check_count(n, "n", 1, MAX_N)
    if "seed" in fields:
        params["seed"] = check_count(seed, "seed", 0, MAX_SEED)
    return params


def atlas_scores(bench: Workbench, kind: str, params: dict, recompute: bool, progress) -> tuple[hl.HeadScores, str]:
    """The run of `kind` with `params` and where it came from: the store, or computed now."""
    if kind not in hl.kinds():
        raise ValueError(f"Unknown score kind '{kind}'. Known kinds: {', '.join(hl.kinds())}.")
    stored = None if recompute else hl.stored(bench.lab, kind, **params)
    if stored is not None:
        return stored, "read from the store"
    progress(0.0, f"computing {kind} scores")
    started = time.perf_counter()
    scores = hl.score(bench.lab, kind, recompute=recompute, **params)
    return scores, f"computed in {time.perf_counter() - started:.1f} s"


def atlas_view(scores: hl.HeadScores, source: str) -> tuple:
    """(heatmap, top table, summary, best head) of a run."""
    best = head_label(*scores.top_heads(1)[0])
    return scores.heatmap(), scores.top_frame(TOP_K), f"{scores.summary()} Scores {source}.", best


def _error_html(message: str) -> str:
    return f"<p style='color:#b91c1c'>{html.escape(message)}</p>"


def layout() -> AtlasTab:
    kinds = hl.kinds()
    fields = scorer_fields(DEFAULT_KIND)
    with gr.Row():
        kind = gr.Dropdown(kinds, value=DEFAULT_KIND if DEFAULT_KIND in kinds else kinds[0], label="Score kind", elem_id="atlas-kind")
        n = gr.Number(fields["n"], precision=0, label="n (samples)", elem_id="atlas-n")
        seed = gr.Number(fields["seed"], precision=0, label="seed", elem_id="atlas-seed")
        recompute = gr.Checkbox(False, label="recompute (ignore stored runs)", elem_id="atlas-recompute")
        score_button = gr.Button("Score", variant="primary", elem_id="atlas-score")
    status = gr.Markdown("Choose a kind and press **Score**.", label="atlas summary", elem_id="atlas-status")
    with gr.Row():
        with gr.Column(scale=3):
            heatmap = gr.Plot(label="Score of every head", elem_id="atlas-heatmap")
        with gr.Column(scale=2):
            top = gr.Dataframe(
                pd.DataFrame(columns=["rank", "head", DEFAULT_KIND]), label=f"Top {TOP_K} heads — click a row to view its pattern",
                interactive=False, elem_id="atlas-top",
            )
    gr.Markdown("### Attention pattern\nThe chosen head is shown first; the other heads of its layer follow.")
    with gr.Row():
        prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=2, scale=4, elem_id="atlas-prompt")
        head = gr.Textbox(head_label(0, 0), label="head (L18H6 or 18.6)", scale=1, elem_id="atlas-head")
        show_button = gr.Button("Show pattern", scale=1, elem_id="atlas-show")
    pattern = gr.HTML(label="attention pattern", elem_id="atlas-pattern")
    return AtlasTab(kind=kind, n=n, seed=seed, recompute=recompute, score_button=score_button, status=status,
                    heatmap=heatmap, top=top, prompt=prompt, head=head, show_button=show_button, pattern=pattern)


def picked_head(table: pd.DataFrame, evt: gr.SelectData):
    """The `head` cell of the clicked row (skip for a header or an empty table)."""
    row = selected_row(table, evt)
    return gr.skip() if row is None else str(row["head"])


def wire(tab: AtlasTab, bench: Workbench, concurrency_id: str) -> AtlasTab:
    @shows_errors
    def score(kind: str, n: float, seed: float, recompute: bool, progress=gr.Progress()) -> tuple:
        return atlas_view(*atlas_scores(bench, kind, run_params(kind, n, seed), recompute, progress_to(progress)))

    @shows_errors
    def show_pattern(prompt: str, head_text: str) -> str:
        return head_pattern_view(bench.lab, prompt, *parse_head(head_text, bench.info))

    @shows_errors
    def show_stored(kind: str, n: float, seed: float, prompt: str) -> tuple:
        scores = bench.stored_scores(kind, newest=True, **run_params(kind, n, seed))
        if scores is None:
            message = f"No stored **{kind}** run for {bench.info.name} yet: press **Score** to compute it."
            return None, pd.DataFrame(columns=["rank", "head", kind]), message, gr.skip(), gr.skip(), gr.skip(), ""
        plot, table, summary, best = atlas_view(scores, "read from the store")
        try:
            view = head_pattern_view(bench.lab, prompt, *scores.top_heads(1)[0])
        except ValueError as err:
            view = _error_html(str(err))
        params = scores.params
        return plot, table, summary, params.get("n", n), params.get("seed", seed), best, view

    lab_job = {"concurrency_id": concurrency_id}
    show_event = dict(fn=show_pattern, inputs=[tab.prompt, tab.head], outputs=[tab.pattern], **lab_job)
    tab.score_button.click(
        score, inputs=[tab.kind, tab.n, tab.seed, tab.recompute], outputs=[tab.heatmap, tab.top, tab.status, tab.head],
        api_name="score", **lab_job,
    ).success(api_visibility="private", **show_event)
    tab.show_button.click(api_name="pattern", **show_event)
    tab.prompt.submit(api_visibility="private", **show_event)
    tab.top.select(picked_head, inputs=[tab.top], outputs=[tab.head], api_visibility="private").success(
        api_visibility="private", **show_event
    )
    tab.show_stored = show_stored
    tab.kind.input(show_stored, inputs=tab.stored_inputs, outputs=tab.stored_outputs, api_visibility="private", **lab_job)
    return tab


def build_atlas_tab(bench: Workbench, concurrency_id: str) -> AtlasTab:
    return wire(layout(), bench, concurrency_id)
