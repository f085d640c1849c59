"""The Channels tab (Talking Heads): which earlier heads write what later heads read, and through how few directions.

1. The composition heatmap of every (earlier sender, later receiver) pair for Q, K or V, filtered
   to a layer range, with the random-matrix baseline and the strongest pairs. A click on a cell (or a row of the
   strongest pairs) picks that pair: it fills the form below, is outlined on the map, and its composition (score,
   rank, distance from random matrices) is shown beside the map.
2. One pair (or a sender and a group of receivers): the receiver's singular spectrum, the sender's
   composition into each direction, the channel's size (directions for 50% / 90%), the tokens at
   both ends of the top directions.
3. The causal test: remove the channel from the sender's output and compare with random subspaces
   of the same rank on a task.

A view only: maps, reports and experiments come from `headlab.circuits`.
"""
from dataclasses import dataclass
from typing import Callable

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import READ_EVENT, progress_to, reads_store, selected_row, shows_errors
from app.inputs import check_count
from app.page import clicked_pair, edited_js
from app.workbench import Workbench
from app.views import clickable_heatmap, json_button, outline_pair, result_json, table
from headlab.circuits import CompositionMap, composition_map
from headlab.circuits.composition import KIND_NAMES, stored_map
from headlab.circuits.intervention import DEFAULTS, ChannelExperiment
from headlab.heads import Head, format_heads, head_label, parse_heads

KINDS = {"K-composition (sender → receiver's keys)": "k", "Q-composition (→ queries)": "q", "V-composition (→ values)": "v"}
MAX_N_RANDOM = 20
TOP_PAIRS = 20
DIRECTION_ROWS = 24
N_RECEIVERS = 5
NO_MAP = "Press **Show composition map** (stored runs are read; computing takes ~30 s)."
PICK_HINT = "Click a cell of the map (or a row below) to pick that pair: it fills the pair form, and its composition shows here."


@dataclass
class ChannelsTab:
    kind: gr.Radio
    layer_low: gr.Number
    layer_high: gr.Number
    map_button: gr.Button
    map_status: gr.Markdown
    heatmap: gr.Plot
    clicked: gr.Textbox  # hidden: the pair map cell the visitor clicked (`app.page`)
    map_details: gr.Markdown  # the picked pair's composition, beside the map
    shown_map: gr.State  # the `CompositionMap` on screen, which the picked pair's details read
    pairs: gr.Dataframe
    map_json: gr.DownloadButton
    sender: gr.Textbox
    receivers: gr.Textbox
    fill_button: gr.Button
    pair_button: gr.Button
    pair_summary: gr.Markdown
    spectrum: gr.Plot
    shares: gr.Plot
    directions: gr.Dataframe
    tokens: gr.Dataframe
    pair_json: gr.DownloadButton
    task: gr.Dropdown
    task_n: gr.Number
    n_random: gr.Number
    ranks: gr.Textbox
    experiment_button: gr.Button
    experiment_summary: gr.Markdown
    experiment_plot: gr.Plot
    experiment_table: gr.Dataframe
    experiment_json: gr.DownloadButton
    first_view: Callable | None = None  # set by the wiring: the stored map, pair and channel experiment

    @property
    def first_outputs(self) -> list:
        return [*self.map_outputs, self.sender, self.receivers, *self.experiment_outputs]

    @property
    def map_outputs(self) -> list:
        return [self.heatmap, self.pairs, self.map_status, self.map_json, self.map_details, self.shown_map]

    @property
    def experiment_outputs(self) -> list:
        return [self.experiment_summary, self.experiment_plot, self.experiment_table, self.experiment_json]


def layer_range(bench: Workbench, low: float, high: float) -> tuple[int, int]:
    last = bench.info.n_layers - 1
    low, high = check_count(low, "from layer", 0, last), check_count(high, "to layer", 0, last)
    if low >= high:
        raise ValueError(f"'from layer' ({low}) must be below 'to layer' ({high}): a pair needs two layers.")
    return low, high


def map_summary(cmap: CompositionMap, layers: tuple[int, int], source: str) -> str:
    base = cmap.baseline
    (sender, receiver, best), = cmap.top(1, layers) or [((0, 0), (0, 0), float("nan"))]
    return (
        f"**{cmap.title}**, layers {layers[0]}–{layers[1]} ({source}). Random matrices of the same shapes score "
        f"{base['mean']:.3f} ± {base['std']:.4f}; {100 * cmap.fraction_above():.0f}% of all pairs exceed its 99th percentile "
        f"(real weights share directions, so the random baseline is a floor, not a threshold). Strongest pair here: "
        f"**{head_label(*sender)} → {head_label(*receiver)}** ({best:.3f}, {cmap.z_score(best):.0f} sd above random)."
    )


def previous_to_induction(prev: hl.HeadScores, induction: hl.HeadScores) -> tuple[str, str]:
    """Sender = the top previous-token head, receivers = the top induction heads in later layers."""
    sender = prev.top_heads(1)[0]
    later = [h for h in induction.top_heads(3 * N_RECEIVERS) if h[0] > sender[0]][:N_RECEIVERS]
    if not later:
        raise ValueError(f"No induction head of {prev.model} sits after its previous-token head {head_label(*sender)}.")
    return format_heads([sender]), format_heads(later)


def stored_default_pair(bench: Workbench) -> tuple[str, str]:
    """The previous-token -> induction pair from stored score runs (nothing computed); empty when none are stored."""
    prev, induction = hl.stored(bench.lab, "previous_token"), hl.stored(bench.lab, "induction")
    try:
        return previous_to_induction(prev, induction) if prev and induction else ("", "")
    except ValueError:
        return "", ""


def parse_pair(bench: Workbench, sender_text: str, receivers_text: str) -> tuple[Head, list[Head]]:
    senders = parse_heads(sender_text, bench.info)
    if len(senders) != 1:
        raise ValueError(f"Give exactly one sender head (e.g. 'L16H0'); got {len(senders)}.")
    return senders[0], parse_heads(receivers_text, bench.info)


def parse_ranks(text: str) -> list[int] | None:
    items = [item for item in (text or "").replace(",", " ").split() if item]
    if not items:
        return None
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ValueError(f"Write channel ranks as whole numbers like '8, 16' (or leave empty for 50%/90%); got {text!r}.")
    return [int(item) for item in items]


def map_layout(bench: Workbench) -> dict:
    """The composition map's components, showing the stored K map when there is one; beside it the picked pair."""
    last, initial = bench.info.n_layers - 1, stored_map(bench.lab, "k")
    with gr.Row():
        kind = gr.Radio(list(KINDS), value=list(KINDS)[0], label="composition kind", elem_id="channels-kind", scale=3)
        layer_low = gr.Number(0, precision=0, label="from layer", elem_id="channels-layer-low", scale=1)
        layer_high = gr.Number(last, precision=0, label="to layer", elem_id="channels-layer-high", scale=1)
        map_button = gr.Button("Show composition map", variant="primary", elem_id="channels-map", scale=1)
    map_status = gr.Markdown(map_summary(initial, (0, last), "stored run") if initial else NO_MAP, elem_id="channels-map-status")
    with gr.Row():
        heatmap, clicked = clickable_heatmap("sender × receiver composition", "channels-heatmap", value=initial.heatmap() if initial else None, scale=3)
        with gr.Column(scale=2):
            map_details = gr.Markdown(elem_id="channels-map-details")  # the hint comes with the first view
            pairs = table(initial.to_frame(TOP_PAIRS) if initial else None, label=f"Top {TOP_PAIRS} pairs — click a row to analyse it",
                          interactive=False, elem_id="channels-pairs")
            map_json = json_button("channels-map-json", "⬇ JSON of this map")
    return dict(kind=kind, layer_low=layer_low, layer_high=layer_high, map_button=map_button, map_status=map_status,
                heatmap=heatmap, clicked=clicked, map_details=map_details, shown_map=gr.State(), pairs=pairs, map_json=map_json)


def pair_layout(bench: Workbench) -> dict:
    """One pair's components: the heads, the spectrum and shares, the directions and their tokens."""
    gr.Markdown("### One pair: the receiver's directions and the sender's composition into each")
    default_sender, default_receivers = stored_default_pair(bench)
    with gr.Row():
        sender = gr.Textbox(default_sender, label="sender head", placeholder="L16H0", elem_id="channels-sender", scale=1)
        receivers = gr.Textbox(default_receivers, label="receiver head(s) — several are read as one group",
                               placeholder="L18H6, L17H3", elem_id="channels-receivers", scale=3)
        fill_button = gr.Button("Fill: previous-token → induction heads", elem_id="channels-fill", scale=1)
        pair_button = gr.Button("Analyse pair", variant="primary", elem_id="channels-pair", scale=1)
    pair_summary = gr.Markdown(elem_id="channels-pair-summary")
    with gr.Row():
        spectrum = gr.Plot(label="spectrum and composition per direction", elem_id="channels-spectrum")
        shares = gr.Plot(label="cumulative share of the composition", elem_id="channels-shares")
    with gr.Row():
        directions = table(label="directions by share of the composition", interactive=False, elem_id="channels-directions")
        tokens = table(label="tokens at both ends of the top directions", interactive=False, elem_id="channels-tokens")
    pair_json = json_button("channels-pair-json", "⬇ JSON of this pair")
    return dict(sender=sender, receivers=receivers, fill_button=fill_button, pair_button=pair_button,
                pair_summary=pair_summary, spectrum=spectrum, shares=shares, directions=directions, tokens=tokens,
                pair_json=pair_json)


def experiment_layout() -> dict:
    """The causal test's components, defaults read from `ChannelExperimentConfig`."""
    gr.Markdown(
        "### Remove the channel\nThe sender's output inside the channel (its top-r directions) is replaced by its mean "
        "(a hook on `hook_attn_out`); controls: random r-dim subspaces of the sender's own output space, and its r "
        "highest-variance output directions. Ranks default to the channels holding 50% and 90% of the composition."
    )
    with gr.Row():
        tasks = hl.task_names()
        task = gr.Dropdown(tasks, value=DEFAULTS.task, label="task", elem_id="channels-task")
        task_n = gr.Number(DEFAULTS.n, precision=0, label="task samples (n)", elem_id="channels-task-n")
        n_random = gr.Number(DEFAULTS.n_random, precision=0, label="random subspaces per rank", elem_id="channels-n-random")
        ranks = gr.Textbox("", label="ranks (empty: 50% / 90%)", elem_id="channels-ranks")
        experiment_button = gr.Button("Remove channel vs random subspaces", variant="primary", elem_id="channels-experiment")
    experiment_summary = gr.Markdown(elem_id="channels-experiment-summary")
    with gr.Row():
        experiment_plot = gr.Plot(label="channel removal vs controls", elem_id="channels-experiment-plot", scale=3)
        with gr.Column(scale=2):
            experiment_table = table(label="per rank", interactive=False, elem_id="channels-experiment-table")
            experiment_json = json_button("channels-experiment-json", "⬇ JSON of this experiment")
    return dict(task=task, task_n=task_n, n_random=n_random, ranks=ranks, experiment_button=experiment_button,
                experiment_summary=experiment_summary, experiment_plot=experiment_plot, experiment_table=experiment_table,
                experiment_json=experiment_json)


def layout(bench: Workbench) -> ChannelsTab:
    gr.Markdown(
        "**Composition** (Elhage et al.): how much of what an earlier head writes lands where a later head reads, "
        "`‖W_OV(sender) · W_side(receiver)‖ / (‖·‖‖·‖)`, ln1 weights folded in, un-rotated W_Q/W_K. **Channels** "
        "(Merullo et al., *Talking Heads*): decompose the receiver's input side by SVD and see which few directions "
        "carry the sender's composition; then remove them from the sender's output and measure."
    )
    return ChannelsTab(**map_layout(bench), **pair_layout(bench), **experiment_layout())


def map_view(cmap: CompositionMap, layers: tuple[int, int], source: str) -> tuple:
    """`ChannelsTab.map_outputs` of a map over `layers`: heatmap, strongest pairs, summary, JSON, pick hint, the map."""
    return (cmap.heatmap(layers), cmap.to_frame(TOP_PAIRS, layers), map_summary(cmap, layers, source),
            result_json(cmap, f"composition-{cmap.kind}"), PICK_HINT, cmap)


def pair_details(cmap: CompositionMap | None, sender: Head, receiver: Head) -> str:
    """One line on a pair of the map on screen: its score, rank among all pairs and distance from random matrices."""
    pair = f"**{head_label(*sender)} → {head_label(*receiver)}**"
    if cmap is None:
        return f"{pair} (no map shown yet)."
    if receiver[0] <= sender[0]:
        return f"{pair}: no composition: the receiver must sit in a later layer than the sender."
    score, valid = cmap.score(sender, receiver), cmap.values[cmap.valid()]
    rank, z = int((valid > score).sum()) + 1, cmap.z_score(score)
    return (f"{pair}, {KIND_NAMES[cmap.kind]}: score {score:.3f}, rank {rank:,} of {valid.numel():,} pairs, "
            f"{abs(z):.0f} sd {'above' if z >= 0 else 'below'} random matrices ({cmap.baseline['mean']:.3f} ± {cmap.baseline['std']:.4f}). "
            f"It is in the pair form below: press **Analyse pair** for its channel.")


def focus_pair(bench: Workbench, plot, cmap: CompositionMap | None, sender_text: str, receiver_text: str) -> tuple:
    """A pair picked on the map or in its table: (the map with its cell outlined, its `pair_details`)."""
    sender, receivers = parse_pair(bench, sender_text, receiver_text)
    if len(receivers) != 1:
        raise ValueError(f"Pick one receiver on the map; the form holds {len(receivers)}.")
    return outline_pair(plot, sender, receivers[0]), pair_details(cmap, sender, receivers[0])


def pair_of_click(value: str) -> tuple:
    """The (sender, receiver) boxes' values from a pair-map click (skipped for a click that is no pair)."""
    sender, receiver = clicked_pair(value)
    return (sender, receiver) if sender and receiver else (gr.skip(), gr.skip())


def pick_pair(frame: pd.DataFrame, evt: gr.SelectData) -> tuple:
    """The (sender, receiver) of the clicked row of the strongest pairs (skipped for a header click)."""
    row = selected_row(frame, evt)
    return (gr.skip(), gr.skip()) if row is None else (str(row["sender"]), str(row["receiver"]))


def stored_experiment_view(bench: Workbench) -> tuple:
    """`ChannelsTab.experiment_outputs` of the newest stored channel experiment (K), or a hint: nothing computed."""
    path = bench.newest_run("channel_experiment", "k")
    exp = ChannelExperiment.load(path) if path else None
    if exp is None:
        return "Press **Remove channel vs random subspaces** (no stored experiment).", None, gr.skip(), None
    return f"{exp.summary()} (stored run)", exp.figure(), exp.to_frame(), result_json(exp, "channel-experiment")


def first_view(bench: Workbench) -> tuple:
    """`ChannelsTab.first_outputs`: the stored K map, the previous-token -> induction pair and the newest stored channel
    experiment (nothing computed)."""
    cmap = stored_map(bench.lab, "k")
    shown = map_view(cmap, (0, bench.info.n_layers - 1), "stored run") if cmap else (None, gr.skip(), NO_MAP, None, "", None)
    return *shown, *stored_default_pair(bench), *stored_experiment_view(bench)


def wire_map(tab: ChannelsTab, bench: Workbench, lab_job: dict) -> None:
    """The map button: the stored map of the chosen kind (computed when missing) over the chosen layers."""

    @shows_errors
    def show_map(kind_label: str, low: float, high: float, progress=gr.Progress()) -> tuple:
        layers = layer_range(bench, low, high)
        stored = stored_map(bench.lab, KINDS[kind_label])
        cmap = stored or composition_map(bench.lab, KINDS[kind_label], progress=progress_to(progress))
        return map_view(cmap, layers, "stored run" if stored else "computed")

    tab.map_button.click(show_map, inputs=[tab.kind, tab.layer_low, tab.layer_high], outputs=tab.map_outputs,
                         api_name="composition_map", **lab_job)


def wire_pair(tab: ChannelsTab, bench: Workbench, lab_job: dict) -> dict:
    """Fill (previous-token -> induction heads) and Analyse pair; returns the analysis event (a picked row runs it too)."""

    @shows_errors
    def fill_pair(progress=gr.Progress()) -> tuple[str, str]:
        progress(0.0, desc="previous-token and induction scores (stored runs are read)")
        return previous_to_induction(hl.score(bench.lab, "previous_token"), hl.score(bench.lab, "induction"))

    @shows_errors
    def analyse_pair(kind_label: str, sender_text: str, receivers_text: str, progress=gr.Progress()) -> tuple:
        sender, receivers = parse_pair(bench, sender_text, receivers_text)
        progress(0.2, desc="SVD of the receiver side and token readouts")
        report = hl.channels(bench.lab, sender, receivers, KINDS[kind_label])
        return (report.summary(), report.spectrum_figure(), report.share_figure(), report.to_frame().head(DIRECTION_ROWS),
                report.tokens_frame(), result_json(report, "channel-report"))

    tab.fill_button.click(fill_pair, outputs=[tab.sender, tab.receivers], api_name="channel_fill", **lab_job)
    pair_event = dict(fn=analyse_pair, inputs=[tab.kind, tab.sender, tab.receivers],
                      outputs=[tab.pair_summary, tab.spectrum, tab.shares, tab.directions, tab.tokens, tab.pair_json], **lab_job)
    tab.pair_button.click(api_name="channels", **pair_event)
    return pair_event


def wire_pair_picks(tab: ChannelsTab, bench: Workbench, analyse: dict) -> None:
    """A click on a map cell fills the pair form (the pair's earlier results turn stale) and a row of the strongest
    pairs fills it and runs `analyse`; both outline the pair on the map and show its composition beside it."""
    shown = dict(fn=reads_store(lambda plot, cmap, sender, receiver: focus_pair(bench, plot, cmap, sender, receiver)),
                 inputs=[tab.heatmap, tab.shown_map, tab.sender, tab.receivers], outputs=[tab.heatmap, tab.map_details],
                 api_visibility="private", **READ_EVENT)
    tab.clicked.change(pair_of_click, inputs=[tab.clicked], outputs=[tab.sender, tab.receivers], js=edited_js(
        tab.sender.elem_id, tab.receivers.elem_id), api_visibility="private", **READ_EVENT).success(**shown)
    tab.pairs.select(pick_pair, inputs=[tab.pairs], outputs=[tab.sender, tab.receivers], api_visibility="private",
                     **READ_EVENT).success(**shown).success(api_visibility="private", **analyse)


def wire_experiment(tab: ChannelsTab, bench: Workbench, lab_job: dict) -> None:
    """Remove the channel vs random subspaces, on the pair in the form."""

    @shows_errors
    def run_experiment(kind_label: str, sender_text: str, receivers_text: str, task_name: str, n: float, n_random: float,
                       ranks_text: str, progress=gr.Progress()) -> tuple:
        sender, receivers = parse_pair(bench, sender_text, receivers_text)
        report = hl.channels(bench.lab, sender, receivers, KINDS[kind_label], token_directions=0)
        exp = hl.channel_experiment(bench.lab, report, task_name, ranks=parse_ranks(ranks_text), n=check_count(n, "task samples (n)", 1, 1024),
                                    n_random=check_count(n_random, "random subspaces per rank", 1, MAX_N_RANDOM), progress=progress_to(progress))
        return exp.summary(), exp.figure(), exp.to_frame(), result_json(exp, "channel-experiment")

    tab.experiment_button.click(run_experiment, inputs=[tab.kind, tab.sender, tab.receivers, tab.task, tab.task_n, tab.n_random, tab.ranks],
                                outputs=tab.experiment_outputs, api_name="channel_experiment", **lab_job)


def wire(tab: ChannelsTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: each parses the form and shows what `headlab.circuits` returns."""
    lab_job = {"concurrency_id": concurrency_id}
    wire_map(tab, bench, lab_job)
    wire_pair_picks(tab, bench, wire_pair(tab, bench, lab_job))
    wire_experiment(tab, bench, lab_job)
    tab.first_view = lambda: first_view(bench)


def build_channels_tab(bench: Workbench, concurrency_id: str) -> ChannelsTab:
    tab = layout(bench)
    wire(tab, bench, concurrency_id)
    return tab
