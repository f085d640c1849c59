"""The Channels tab (Talking Heads): which earlier heads write what later heads read, and through how few directions.

1. The composition heatmap of every (earlier sender, later receiver) pair for Q, K or V, filtered
   to a layer range, with the random-matrix baseline and the strongest pairs.
2. One pair (or a sender and a group of receivers): the receiver's singular spectrum, the sender's
   composition into each direction, the channel's size (directions for 50% / 90%), the tokens at
   both ends of the top directions.
3. The causal test: remove the channel from the sender's output and compare with random subspaces
   of the same rank on a task.
"""
from dataclasses import dataclass

import gradio as gr
import pandas as pd

import headlab as hl
from app.feedback import progress_to, shows_errors
from app.inputs import check_count
from app.workbench import Workbench
from headlab import store
from headlab.circuits import CompositionMap, composition_map
from headlab.circuits.composition import composition_params
from headlab.heads import format_heads, parse_heads

KINDS = {"K-composition (sender → receiver's keys)": "k", "Q-composition (→ queries)": "q", "V-composition (→ values)": "v"}
DEFAULT_TASK, DEFAULT_TASK_N, DEFAULT_N_RANDOM, MAX_N_RANDOM = "repeated_tokens", 8, 5, 20
TOP_PAIRS = 20
DIRECTION_ROWS = 24
PAIR_COLUMNS = ["sender", "receiver", "score", "z_vs_random"]


@dataclass
class ChannelsTab:
    kind: gr.Radio
    layer_low: gr.Number
    layer_high: gr.Number
    map_button: gr.Button
    map_status: gr.Markdown
    heatmap: gr.Plot
    pairs: gr.Dataframe
    sender: gr.Textbox
    receivers: gr.Textbox
    fill_button: gr.Button
    pair_button: gr.Button
    pair_summary: gr.Markdown
    spectrum: gr.Plot
    shares: gr.Plot
    directions: gr.Dataframe
    tokens: gr.Dataframe
    task: gr.Dropdown
    task_n: gr.Number
    n_random: gr.Number
    ranks: gr.Textbox
    experiment_button: gr.Button
    experiment_summary: gr.Markdown
    experiment_plot: gr.Plot
    experiment_table: gr.Dataframe


def stored_map(bench: Workbench, kind: str) -> CompositionMap | None:
    """The stored composition map of `kind` for the current model (default parameters), or None."""
    path = store.run_path(bench.info.slug, "composition", composition_params(kind, True, 256, 0))
    return CompositionMap.load(path) if path.exists() else None


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
        f"**L{sender[0]}H{sender[1]} → L{receiver[0]}H{receiver[1]}** ({best:.3f}, {cmap.z_score(best):.0f} sd above random)."
    )


def receivers_text(bench: Workbench, n_receivers: int = 5, progress=None) -> tuple[str, str]:
    """Sender = the top previous-token head, receivers = the top induction heads in later layers."""
    prev = bench.top_heads("previous_token", 1, 16, 0, progress=progress)[0]
    induction = [h for h in bench.top_heads("induction", 3 * n_receivers, 16, 0, progress=progress) if h[0] > prev[0]]
    if not induction:
        raise ValueError(f"No induction head of {bench.info.name} sits after its previous-token head L{prev[0]}H{prev[1]}.")
    return format_heads([prev]), format_heads(induction[:n_receivers])


def stored_default_pair(bench: Workbench, n_receivers: int = 5) -> tuple[str, str]:
    """The previous-token -> induction pair from stored score runs (nothing computed); empty when none are stored."""
    prev, induction = bench.stored_scores("previous_token", 16, 0), bench.stored_scores("induction", 16, 0)
    if prev is None or induction is None:
        return "", ""
    sender = prev.scores.top_heads(1)[0]
    later = [h for h in induction.scores.top_heads(3 * n_receivers) if h[0] > sender[0]][:n_receivers]
    return (format_heads([sender]), format_heads(later)) if later else ("", "")


def parse_pair(bench: Workbench, sender_text: str, receivers_text_: str) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    senders = parse_heads(sender_text, bench.info)
    if len(senders) != 1:
        raise ValueError(f"Give exactly one sender head (e.g. '16.0'); got {len(senders)}.")
    return senders[0], parse_heads(receivers_text_, bench.info)


def parse_ranks(text: str) -> list[int] | None:
    items = [item for item in (text or "").replace(",", " ").split() if item]
    if not items:
        return None
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise ValueError(f"Write channel ranks as whole numbers like '8, 16' (or leave empty for 50%/90%); got {text!r}.")
    return [int(item) for item in items]


def build_channels_tab(bench: Workbench, concurrency_id: str) -> ChannelsTab:
    last = bench.info.n_layers - 1
    initial = stored_map(bench, "k")
    gr.Markdown(
        "**Composition** (Elhage et al.): how much of what an earlier head writes lands where a later head reads, "
        "`‖W_OV(sender) · W_side(receiver)‖ / (‖·‖‖·‖)`, ln1 weights folded in, un-rotated W_Q/W_K. **Channels** "
        "(Merullo et al., *Talking Heads*): decompose the receiver's input side by SVD and see which few directions "
        "carry the sender's composition; then remove them from the sender's output and measure."
    )
    with gr.Row():
        kind = gr.Radio(list(KINDS), value=list(KINDS)[0], label="composition kind", elem_id="channels-kind", scale=3)
        layer_low = gr.Number(0, precision=0, label="from layer", elem_id="channels-layer-low", scale=1)
        layer_high = gr.Number(last, precision=0, label="to layer", elem_id="channels-layer-high", scale=1)
        map_button = gr.Button("Show composition map", variant="primary", elem_id="channels-map", scale=1)
    map_status = gr.Markdown(
        map_summary(initial, (0, last), "stored run") if initial else "Press **Show composition map** (stored runs are read; computing takes ~30 s).",
        elem_id="channels-map-status",
    )
    with gr.Row():
        with gr.Column(scale=3):
            heatmap = gr.Plot(initial.heatmap() if initial else None, label="sender × receiver composition", elem_id="channels-heatmap")
        with gr.Column(scale=2):
            pairs = gr.Dataframe(
                initial.to_frame(TOP_PAIRS) if initial else pd.DataFrame(columns=PAIR_COLUMNS),
                label=f"Top {TOP_PAIRS} pairs — click a row to analyse it", interactive=False, elem_id="channels-pairs",
            )
    gr.Markdown("### One pair: the receiver's directions and the sender's composition into each")
    default_sender, default_receivers = stored_default_pair(bench)
    with gr.Row():
        sender = gr.Textbox(default_sender, label="sender head (LAYER.HEAD)", placeholder="16.0", elem_id="channels-sender", scale=1)
        receivers = gr.Textbox(default_receivers, label="receiver head(s) — several are read as one group",
                               placeholder="18.6, 17.3", elem_id="channels-receivers", scale=3)
        fill_button = gr.Button("Fill: previous-token → induction heads", elem_id="channels-fill", scale=1)
        pair_button = gr.Button("Analyse pair", variant="primary", elem_id="channels-pair", scale=1)
    pair_summary = gr.Markdown(elem_id="channels-pair-summary")
    with gr.Row():
        spectrum = gr.Plot(label="spectrum and composition per direction", elem_id="channels-spectrum")
        shares = gr.Plot(label="cumulative share of the composition", elem_id="channels-shares")
    with gr.Row():
        directions = gr.Dataframe(label="directions by share of the composition", interactive=False, elem_id="channels-directions")
        tokens = gr.Dataframe(label="tokens at both ends of the top directions", interactive=False, elem_id="channels-tokens")
    gr.Markdown(
        "### Remove the channel\nThe sender's output inside the channel (its top-r directions) is replaced by its mean "
        "(a hook on `hook_attn_out`); controls: random r-dim subspaces of the sender's own output space, and its r "
        "highest-variance output directions. Ranks default to the channels holding 50% and 90% of the composition."
    )
    with gr.Row():
        tasks = hl.task_names()
        task = gr.Dropdown(tasks, value=DEFAULT_TASK if DEFAULT_TASK in tasks else tasks[0], label="task", elem_id="channels-task")
        task_n = gr.Number(DEFAULT_TASK_N, precision=0, label="task samples (n)", elem_id="channels-task-n")
        n_random = gr.Number(DEFAULT_N_RANDOM, precision=0, label="random subspaces per rank", elem_id="channels-n-random")
        ranks = gr.Textbox("", label="ranks (empty: 50% / 90%)", elem_id="channels-ranks")
        experiment_button = gr.Button("Remove channel vs random subspaces", variant="primary", elem_id="channels-experiment")
    experiment_summary = gr.Markdown(elem_id="channels-experiment-summary")
    with gr.Row():
        with gr.Column(scale=3):
            experiment_plot = gr.Plot(label="channel removal vs controls", elem_id="channels-experiment-plot")
        with gr.Column(scale=2):
            experiment_table = gr.Dataframe(label="per rank", interactive=False, elem_id="channels-experiment-table")

    @shows_errors
    def show_map(kind_label: str, low: float, high: float, progress=gr.Progress()) -> tuple:
        layers = layer_range(bench, low, high)
        kind_code = KINDS[kind_label]
        stored = stored_map(bench, kind_code)
        cmap = stored or composition_map(bench.lab, kind_code, progress=progress_to(progress))
        return cmap.heatmap(layers), cmap.to_frame(TOP_PAIRS, layers), map_summary(cmap, layers, "stored run" if stored else "computed")

    @shows_errors
    def fill_pair(progress=gr.Progress()) -> tuple[str, str]:
        return receivers_text(bench, progress=progress_to(progress))

    @shows_errors
    def analyse_pair(kind_label: str, sender_text: str, receivers_text_: str, progress=gr.Progress()) -> tuple:
        sender_head, receiver_heads = parse_pair(bench, sender_text, receivers_text_)
        progress(0.2, desc="SVD of the receiver side and token readouts")
        report = hl.channels(bench.lab, sender_head, receiver_heads, KINDS[kind_label])
        frame = report.to_frame().head(DIRECTION_ROWS)
        return report.summary(), report.spectrum_figure(), report.share_figure(), frame, report.tokens_frame()

    @shows_errors
    def run_experiment(kind_label: str, sender_text: str, receivers_text_: str, task_name: str, n: float, n_rand: float,
                       ranks_text: str, progress=gr.Progress()) -> tuple:
        sender_head, receiver_heads = parse_pair(bench, sender_text, receivers_text_)
        n = check_count(n, "task samples (n)", 1, 1024)
        n_rand = check_count(n_rand, "random subspaces per rank", 1, MAX_N_RANDOM)
        report = hl.channels(bench.lab, sender_head, receiver_heads, KINDS[kind_label], token_directions=0)
        exp = hl.channel_experiment(bench.lab, report, task_name, ranks=parse_ranks(ranks_text), n_random=n_rand, n=n,
                                    progress=progress_to(progress))
        return exp.summary(), exp.figure(), exp.to_frame()

    def pick_pair(table: pd.DataFrame, evt: gr.SelectData) -> tuple:
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(row, int) or not 0 <= row < len(table):
            return gr.skip(), gr.skip()
        to_head = lambda label: label.replace("L", "").replace("H", ".")  # noqa: E731  'L16H0' -> '16.0'
        return to_head(str(table.iloc[row]["sender"])), to_head(str(table.iloc[row]["receiver"]))

    lab_job = {"concurrency_id": concurrency_id}
    map_button.click(show_map, inputs=[kind, layer_low, layer_high], outputs=[heatmap, pairs, map_status],
                     api_name="composition_map", **lab_job)
    fill_button.click(fill_pair, outputs=[sender, receivers], api_name="channel_fill", **lab_job)
    pair_event = dict(fn=analyse_pair, inputs=[kind, sender, receivers], outputs=[pair_summary, spectrum, shares, directions, tokens], **lab_job)
    pair_button.click(api_name="channels", **pair_event)
    pairs.select(pick_pair, inputs=[pairs], outputs=[sender, receivers], api_visibility="private").success(
        api_visibility="private", **pair_event
    )
    experiment_button.click(
        run_experiment, inputs=[kind, sender, receivers, task, task_n, n_random, ranks],
        outputs=[experiment_summary, experiment_plot, experiment_table], api_name="channel_experiment", **lab_job,
    )
    return ChannelsTab(
        kind=kind, layer_low=layer_low, layer_high=layer_high, map_button=map_button, map_status=map_status, heatmap=heatmap,
        pairs=pairs, sender=sender, receivers=receivers, fill_button=fill_button, pair_button=pair_button,
        pair_summary=pair_summary, spectrum=spectrum, shares=shares, directions=directions, tokens=tokens, task=task,
        task_n=task_n, n_random=n_random, ranks=ranks, experiment_button=experiment_button,
        experiment_summary=experiment_summary, experiment_plot=experiment_plot, experiment_table=experiment_table,
    )
