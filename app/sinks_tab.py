"""The Sinks tab: which heads are dormant (attention parked on the first token, little output) on which input domain.

Shows the head x domain dormancy matrix, the heads that switch between dormant and active across
domains, and one head's attention pattern on two domains side by side. The figure, table and summary
are `headlab.scorers.sinks`' (`dormancy_figure`, `switching_frame`, `sink_summary`).
"""
from dataclasses import dataclass
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import READ_EVENT, selected_row, shows_errors
from app.inputs import check_count, check_whole, parse_head
from app.workbench import Workbench
from app.views import clickable_heatmap, highlighted, json_button, link_heads, result_json, table
from headlab.datasets import domains
from headlab.heads import head_label
from headlab.scorers import scorer_fields
from headlab.scorers.sinks import domain_text, dormancy_figure, sink_summary, switching_frame
from headlab.viz import head_pattern_view

MAX_N = 64
MAX_SEED = 2**31 - 1
VIEW_TOKENS = 64
VIEW_HEIGHT = 700


@dataclass
class SinksTab:
    n: gr.Number
    seed: gr.Number
    compute_button: gr.Button
    status: gr.Markdown
    matrix: gr.Plot
    clicked: gr.Textbox  # hidden: the matrix row clicked (`app.page`)
    details: gr.Markdown
    switching: gr.Dataframe
    download: gr.DownloadButton
    head: gr.Textbox
    domain_a: gr.Dropdown
    domain_b: gr.Dropdown
    show_button: gr.Button
    view_a: gr.HTML
    view_b: gr.HTML
    first_view: Callable | None = None  # set by the wiring: the stored run of the form, computing nothing
    first_then: dict | None = None  # the two pattern views that follow it

    @property
    def first_inputs(self) -> list:
        return [self.n, self.seed]

    @property
    def first_outputs(self) -> list:
        return [self.matrix, self.switching, self.status, self.head, self.details, self.download]


def sink_scores(bench: Workbench, n: float, seed: float) -> hl.HeadScores:
    """The sink run (all built-in domains) of the current model, from the store or computed."""
    return hl.score(bench.lab, "sink", n=check_count(n, "n", 1, MAX_N), seed=check_count(seed, "seed", 0, MAX_SEED))


def head_view(bench: Workbench, head_text: str, domain: str, seed: int) -> str:
    """One head's pattern on a `VIEW_TOKENS`-token sample of `domain`, titled `L18H6 on code`."""
    layer, head = parse_head(head_text, bench.info)
    prompt = domain_text(bench.lab, domain, VIEW_TOKENS, seed)
    view = head_pattern_view(bench.lab, prompt, layer, head, whole_layer=False, height=VIEW_HEIGHT)
    return f"<h4>{head_label(layer, head)} on {domain}</h4>" + view


def layout() -> SinksTab:
    names, defaults = list(domains.BUILTIN_DOMAINS), scorer_fields("sink")
    gr.Markdown(
        "A head is **dormant** on an input when it parks its attention on the first token (the sink, whose "
        "value is tiny) and so writes almost nothing; **active** when it attends elsewhere and writes."
    )
    with gr.Row():
        n = gr.Number(defaults["n"], precision=0, label="n (samples per domain)", elem_id="sinks-n")
        seed = gr.Number(defaults["seed"], precision=0, label="seed", elem_id="sinks-seed")
        compute_button = gr.Button("Score sinks", variant="primary", elem_id="sinks-score")
    status = gr.Markdown("Reading the stored run…", elem_id="sinks-status")
    with gr.Row():
        with gr.Column(scale=2):
            matrix, clicked = clickable_heatmap("head x domain dormancy", "sinks-matrix")
        with gr.Column(scale=3):
            details = gr.Markdown(elem_id="sinks-details")
            download = json_button("sinks-json", "⬇ JSON of this run")
            switching = table(
                pd.DataFrame(columns=["head", "dormant on", "active on", "domain dependence"]),
                label="Heads that switch between domains — click a row", interactive=False, elem_id="sinks-switching",
            )
    gr.Markdown("### One head on two domains")
    with gr.Row():
        head = gr.Textbox(head_label(0, 0), label="head (L18H6 or 18.6)", elem_id="sinks-head")
        domain_a = gr.Dropdown(names, value="prose", label="domain A", elem_id="sinks-domain-a")
        domain_b = gr.Dropdown(names, value="code", label="domain B", elem_id="sinks-domain-b")
        show_button = gr.Button("Show patterns", elem_id="sinks-show")
    with gr.Row():
        view_a = gr.HTML(elem_id="sinks-view-a")
        view_b = gr.HTML(elem_id="sinks-view-b")
    return SinksTab(n=n, seed=seed, compute_button=compute_button, status=status, matrix=matrix, clicked=clicked,
                    details=details, switching=switching, download=download, head=head, domain_a=domain_a, domain_b=domain_b, show_button=show_button, view_a=view_a, view_b=view_b)


def picked_switch(table: pd.DataFrame, evt: gr.SelectData) -> tuple:
    """The clicked row's head and one domain it is dormant on and one it is active on."""
    picked = selected_row(table, evt)
    if picked is None:
        return gr.skip(), gr.skip(), gr.skip()
    return str(picked["head"]), str(picked["dormant on"]).split(", ")[0], str(picked["active on"]).split(", ")[0]


def wire(tab: SinksTab, bench: Workbench, concurrency_id: str) -> SinksTab:
    def view(scores: hl.HeadScores) -> tuple:
        """(matrix with the most domain-dependent head outlined, switching table, summary, that head, its row, JSON)."""
        table, figure = switching_frame(scores), dormancy_figure(scores)
        if not len(table):
            return figure, table, sink_summary(scores), gr.skip(), "", result_json(scores, "sink-scores")
        first = str(table.iloc[0]["head"])
        row = table.iloc[0]
        details = f"**{first}**: dormant on {row['dormant on']}, active on {row['active on']}."
        return (highlighted(figure, parse_head(first, bench.info)), table, sink_summary(scores), first, details,
                result_json(scores, "sink-scores"))

    @shows_errors
    def compute(n: float, seed: float) -> tuple:
        return view(sink_scores(bench, n, seed))

    def first_view(n: float, seed: float) -> tuple:
        scores = hl.stored(bench.lab, "sink", n=check_count(n, "n", 1, MAX_N), seed=check_count(seed, "seed", 0, MAX_SEED))
        if scores is None:
            return None, gr.skip(), f"No stored sink run for {bench.info.name} with this form: press **Score sinks**.", gr.skip(), "", None
        return view(scores)

    @shows_errors
    def show(head_text: str, a: str, b: str, seed: float) -> tuple:
        seed_number = check_whole(seed, "seed")
        return head_view(bench, head_text, a, seed_number), head_view(bench, head_text, b, seed_number)

    lab_job = {"concurrency_id": concurrency_id}
    show_event = dict(fn=show, inputs=[tab.head, tab.domain_a, tab.domain_b, tab.seed], outputs=[tab.view_a, tab.view_b], **READ_EVENT)
    tab.compute_button.click(
        compute, inputs=[tab.n, tab.seed], outputs=tab.first_outputs, api_name="sinks", **lab_job
    ).success(api_visibility="private", **show_event)
    tab.show_button.click(api_name="sink_patterns", **show_event)
    follow = link_heads(tab.matrix, tab.clicked, tab.head, tab.details, then=[show_event])
    follow(tab.switching.select(picked_switch, inputs=[tab.switching], outputs=[tab.head, tab.domain_a, tab.domain_b],
                                api_visibility="private", **READ_EVENT))
    tab.first_view, tab.first_then = first_view, show_event
    return tab


def build_sinks_tab(bench: Workbench, concurrency_id: str) -> SinksTab:
    return wire(layout(), bench, concurrency_id)
