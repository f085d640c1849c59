"""The Sinks tab: which heads are dormant (attention parked on the first token, little output) on which input domain.

Shows the head x domain dormancy matrix, the heads that switch between dormant and active across
domains, and one head's attention pattern on two domains side by side.
"""
from dataclasses import dataclass

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

import headlab as hl
from app.feedback import shows_errors
from app.inputs import check_count, check_whole
from app.workbench import Workbench
from headlab.datasets import domains
from headlab.heads import check_head
from headlab.scorers.sinks import top_switching
from headlab.viz import attention_view_html, iframe

DEFAULT_N = 4  # the sink scorer's default, so a stored run answers the first view
VIEW_TOKENS = 64
VIEW_HEIGHT = 700
SWITCH_COLUMNS = ["layer", "head", "dormant on", "active on", "domain dependence"]


@dataclass
class SinksTab:
    n: gr.Number
    seed: gr.Number
    compute_button: gr.Button
    status: gr.Markdown
    matrix: gr.Plot
    switching: gr.Dataframe
    layer: gr.Number
    head: gr.Number
    domain_a: gr.Dropdown
    domain_b: gr.Dropdown
    show_button: gr.Button
    view_a: gr.HTML
    view_b: gr.HTML


def sink_scores(bench: Workbench, n: int, seed: int) -> hl.HeadScores:
    """The sink run (all built-in domains) of the current model, from the store or computed."""
    return hl.score(bench.lab, "sink", n=n, seed=seed)


def dormancy_figure(scores: hl.HeadScores) -> go.Figure:
    """Heatmap: one row per head (`L{layer}H{head}`), one column per domain, colour = dormancy."""
    names = scores.meta["domains"]
    matrix = scores.raw["dormancy"].flatten(1).T  # [layer * head, domain]
    labels = [f"L{l}H{h}" for l in range(scores.n_layers) for h in range(scores.n_heads)]
    fig = go.Figure(go.Heatmap(
        z=matrix.numpy(), x=names, y=labels, colorscale="Viridis", zmin=0, zmax=1,
        colorbar={"title": "dormancy"}, hovertemplate="%{y} on %{x}<br>dormancy %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(
        title=f"Dormancy of every head per domain — {scores.model}", xaxis_title="domain", yaxis_title="head",
        height=1400, margin={"l": 70, "r": 20, "t": 50, "b": 50}, yaxis={"autorange": "reversed"},
    )
    return fig


def switching_table(scores: hl.HeadScores) -> pd.DataFrame:
    """The switching heads, those whose dormancy depends most on the domain first."""
    by_head = {(r["layer"], r["head"]): r for r in scores.meta["switching_heads"]}
    dependence = scores.raw["domain_dependence"]
    rows = [
        [l, h, ", ".join(by_head[l, h]["dormant_on"]), ", ".join(by_head[l, h]["active_on"]), round(float(dependence[l, h]), 3)]
        for l, h in top_switching(scores, len(by_head))
    ]
    return pd.DataFrame(rows, columns=SWITCH_COLUMNS)


def summary(scores: hl.HeadScores) -> str:
    counts = ", ".join(f"{d}: {c}" for d, c in scores.meta["n_dormant"].items())
    mass = scores.raw["sink_mass"].mean(dim=(1, 2))
    masses = ", ".join(f"{d}: {float(m):.2f}" for d, m in zip(scores.meta["domains"], mass))
    return (
        f"**Dormant heads** per domain (of {scores.n_layers * scores.n_heads}) — {counts}. "
        f"**Mean attention on the first token** — {masses}. "
        f"**{len(scores.meta['switching_heads'])} heads switch** between dormant and active."
    )


def domain_prompt(bench: Workbench, domain: str, seed: int) -> str:
    """A `VIEW_TOKENS`-token sample of `domain` as text (its leading BOS dropped: the view adds it)."""
    tokens = domains.domain_tokens(bench.lab, domain, 1, VIEW_TOKENS, seed)[0, 1:]
    return bench.lab.tokenizer.decode(tokens)


def head_view(bench: Workbench, layer: int, head: int, domain: str, seed: int) -> str:
    layer, head = check_head(bench.info, layer, head)
    document = attention_view_html(bench.lab, domain_prompt(bench, domain, seed), layer, heads=[head])
    return f"<h4>L{layer}H{head} on {domain}</h4>" + iframe(document, height=VIEW_HEIGHT)


def build_sinks_tab(bench: Workbench, concurrency_id: str) -> SinksTab:
    names = list(domains.BUILTIN_DOMAINS)
    gr.Markdown(
        "A head is **dormant** on an input when it parks its attention on the first token (the sink, whose "
        "value is tiny) and so writes almost nothing; **active** when it attends elsewhere and writes."
    )
    with gr.Row():
        n = gr.Number(DEFAULT_N, precision=0, label="n (samples per domain)", elem_id="sinks-n")
        seed = gr.Number(0, precision=0, label="seed", elem_id="sinks-seed")
        compute_button = gr.Button("Score sinks", variant="primary", elem_id="sinks-score")
    status = gr.Markdown("Press **Score sinks** (a stored run is read, not recomputed).", elem_id="sinks-status")
    with gr.Row():
        with gr.Column(scale=2):
            matrix = gr.Plot(label="head x domain dormancy", elem_id="sinks-matrix")
        with gr.Column(scale=3):
            switching = gr.Dataframe(
                pd.DataFrame(columns=SWITCH_COLUMNS), label="Heads that switch between domains — click a row",
                interactive=False, elem_id="sinks-switching",
            )
    gr.Markdown("### One head on two domains")
    with gr.Row():
        layer = gr.Number(0, precision=0, label="layer", elem_id="sinks-layer")
        head = gr.Number(0, precision=0, label="head", elem_id="sinks-head")
        domain_a = gr.Dropdown(names, value="prose", label="domain A", elem_id="sinks-domain-a")
        domain_b = gr.Dropdown(names, value="code", label="domain B", elem_id="sinks-domain-b")
        show_button = gr.Button("Show patterns", elem_id="sinks-show")
    with gr.Row():
        view_a = gr.HTML(elem_id="sinks-view-a")
        view_b = gr.HTML(elem_id="sinks-view-b")

    @shows_errors
    def compute(n_value: float, seed_value: float) -> tuple:
        scores = sink_scores(bench, check_count(n_value, "n", 1, 64), check_count(seed_value, "seed", 0, 2**31 - 1))
        table = switching_table(scores)
        first = (int(table.iloc[0]["layer"]), int(table.iloc[0]["head"])) if len(table) else (gr.skip(), gr.skip())
        return dormancy_figure(scores), table, summary(scores), *first

    @shows_errors
    def show(layer_value: float, head_value: float, a: str, b: str, seed_value: float) -> tuple:
        layer_index, head_index = check_whole(layer_value, "layer"), check_whole(head_value, "head")
        seed_number = check_whole(seed_value, "seed")
        return (head_view(bench, layer_index, head_index, a, seed_number),
                head_view(bench, layer_index, head_index, b, seed_number))

    def pick_row(table: pd.DataFrame, evt: gr.SelectData) -> tuple:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(row, int) or not 0 <= row < len(table):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        dormant_on = str(table.iloc[row]["dormant on"]).split(", ")[0]
        active_on = str(table.iloc[row]["active on"]).split(", ")[0]
        return int(table.iloc[row]["layer"]), int(table.iloc[row]["head"]), dormant_on, active_on

    lab_job = {"concurrency_id": concurrency_id}
    show_event = dict(fn=show, inputs=[layer, head, domain_a, domain_b, seed], outputs=[view_a, view_b], **lab_job)
    compute_button.click(
        compute, inputs=[n, seed], outputs=[matrix, switching, status, layer, head], api_name="sinks", **lab_job
    ).success(api_visibility="private", **show_event)
    show_button.click(api_name="sink_patterns", **show_event)
    switching.select(pick_row, inputs=[switching], outputs=[layer, head, domain_a, domain_b], api_visibility="private").success(
        api_visibility="private", **show_event
    )
    return SinksTab(
        n=n, seed=seed, compute_button=compute_button, status=status, matrix=matrix, switching=switching, layer=layer,
        head=head, domain_a=domain_a, domain_b=domain_b, show_button=show_button, view_a=view_a, view_b=view_b,
    )
