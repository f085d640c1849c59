"""The Head atlas tab: score every head for one kind, see the heatmap and the top heads, and look at a head's attention pattern.

Scores come from `hl.stored` / `hl.score`, the table from `HeadScores.top_frame`, the heatmap from
`HeadScores.heatmap` and the pattern from `headlab.viz.head_pattern_view`: this module only lays out
the form and wires it.
"""
import time
from dataclasses import dataclass
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import READ_EVENT, progress_to, reads_store, shows_errors
from app.inputs import check_count, parse_head
from app.page import set_param_js
from app.views import clickable_heatmap, head_details, highlighted, json_button, link_heads, result_json, table
from app.workbench import Workbench
from headlab.heads import Head, head_label
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
    clicked: gr.Textbox  # hidden: the heatmap cell the visitor clicked (`app.page`)
    top: gr.Dataframe
    prompt: gr.Textbox
    head: gr.Textbox
    show_button: gr.Button
    details: gr.Markdown
    pattern: gr.HTML
    download: gr.DownloadButton
    first_view: Callable | None = None  # set by the wiring: the stored run of the chosen kind, computing nothing
    first_then: dict | None = None  # the pattern view that follows it

    @property
    def first_inputs(self) -> list:
        return [self.kind, self.n, self.seed]

    @property
    def first_outputs(self) -> list:
        return [self.kind, self.heatmap, self.top, self.status, self.n, self.seed, self.head, self.details, self.download]

    @property
    def stored_inputs(self) -> list:
        return self.first_inputs

    @property
    def stored_outputs(self) -> list:
        return self.first_outputs


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


def atlas_view(scores: hl.HeadScores, source: str, head: Head | None = None) -> tuple:
    """(heatmap with `head` outlined, top table, summary, head, details) of a run; `head` defaults to the best."""
    head = head or tuple(scores.top_heads(1)[0])
    return (highlighted(scores.heatmap(), head), scores.top_frame(TOP_K), f"{scores.summary()} Scores {source}.",
            head_label(*head), head_details(scores.values, head, scores.kind), result_json(scores, f"{scores.kind}-scores"))


def layout() -> AtlasTab:
    kinds = hl.kinds()
    fields = scorer_fields(DEFAULT_KIND)
    with gr.Row():
        kind = gr.Dropdown(kinds, value=DEFAULT_KIND if DEFAULT_KIND in kinds else kinds[0], label="Score kind", elem_id="atlas-kind")
        n = gr.Number(fields["n"], precision=0, label="n (samples)", elem_id="atlas-n")
        seed = gr.Number(fields["seed"], precision=0, label="seed", elem_id="atlas-seed")
        recompute = gr.Checkbox(False, label="recompute (ignore stored runs)", elem_id="atlas-recompute")
        score_button = gr.Button("Score", variant="primary", elem_id="atlas-score")
    status = gr.Markdown("Reading the stored run…", label="atlas summary", elem_id="atlas-status")
    with gr.Row():
        with gr.Column(scale=2):
            heatmap, clicked = clickable_heatmap("Score of every head", "atlas-heatmap")
            top = table(
                pd.DataFrame(columns=["rank", "head", DEFAULT_KIND]), label=f"Top {TOP_K} heads — click a row",
                elem_id="atlas-top",
            )
            download = json_button("atlas-json")
        with gr.Column(scale=3):
            with gr.Row():
                head = gr.Textbox(head_label(0, 0), label="head (L18H6 or 18.6)", scale=1, elem_id="atlas-head")
                show_button = gr.Button("Show pattern", scale=1, elem_id="atlas-show")
            prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=2, elem_id="atlas-prompt")
            details = gr.Markdown(elem_id="atlas-details")
            pattern = gr.HTML(label="attention pattern", elem_id="atlas-pattern")
    return AtlasTab(kind=kind, n=n, seed=seed, recompute=recompute, score_button=score_button, status=status,
                    heatmap=heatmap, clicked=clicked, top=top, prompt=prompt, head=head, show_button=show_button,
                    details=details, pattern=pattern, download=download)


def url_choice(request: gr.Request | None, kind: str) -> tuple[str, str | None]:
    """The score kind and head the page's address asks for (`?kind=induction&head=L18H6`), else `kind` and None."""
    query = dict(request.query_params) if request is not None else {}
    asked = query.get("kind")
    return (asked if asked in hl.kinds() else kind), query.get("head")


def wire(tab: AtlasTab, bench: Workbench, concurrency_id: str) -> AtlasTab:
    def stored_run(kind: str, n: float, seed: float) -> hl.HeadScores | None:
        return bench.stored_scores(kind, newest=True, **run_params(kind, n, seed))

    @shows_errors
    def score(kind: str, n: float, seed: float, recompute: bool, progress=gr.Progress()) -> tuple:
        return atlas_view(*atlas_scores(bench, kind, run_params(kind, n, seed), recompute, progress_to(progress)))

    @shows_errors
    def show_pattern(prompt: str, head_text: str) -> str:
        return head_pattern_view(bench.lab, prompt, *parse_head(head_text, bench.info))

    @reads_store
    def first_view(kind: str, n: float, seed: float, request: gr.Request) -> tuple:
        kind, head_text = url_choice(request, kind)
        scores = stored_run(kind, n, seed)
        if scores is None:
            message = f"No stored **{kind}** run for {bench.info.name} yet: press **Score** to compute it."
            return kind, None, pd.DataFrame(columns=["rank", "head", kind]), message, n, seed, head_label(0, 0), "", None
        head = parse_head(head_text, bench.info) if head_text else None
        plot, table, summary, best, details, download = atlas_view(scores, "read from the store", head)
        return kind, plot, table, summary, scores.params.get("n", n), scores.params.get("seed", seed), best, details, download

    show_event = dict(fn=show_pattern, inputs=[tab.prompt, tab.head], outputs=[tab.pattern], **READ_EVENT)
    tab.score_button.click(
        score, inputs=[tab.kind, tab.n, tab.seed, tab.recompute],
        outputs=[tab.heatmap, tab.top, tab.status, tab.head, tab.details, tab.download],
        api_name="score", concurrency_id=concurrency_id,
    ).success(api_visibility="private", **show_event)
    tab.show_button.click(api_name="pattern", **show_event)
    tab.prompt.submit(api_visibility="private", **show_event)
    link_heads(tab.heatmap, tab.clicked, tab.head, tab.details, tables=[tab.top], then=[show_event], api_name="focus_head")
    tab.head.change(None, inputs=[tab.head], js=set_param_js("head"))
    tab.kind.change(None, inputs=[tab.kind], js=set_param_js("kind"))
    tab.first_view = first_view
    tab.first_then = show_event
    tab.kind.input(first_view, inputs=tab.first_inputs, outputs=tab.first_outputs, api_name="stored_atlas", **READ_EVENT).success(
        api_visibility="private", **show_event)
    return tab


def build_atlas_tab(bench: Workbench, concurrency_id: str) -> AtlasTab:
    return wire(layout(), bench, concurrency_id)
