"""The Safety tab (Zhou et al. 2024, Ships): which heads keep a model refusing harmful requests.

1. Ships heatmap and top heads: KL between the intact next-token distribution at the start of the
   assistant's turn and the one with a head ablated, averaged over harmful requests.
2. The check: refusal rate on held-out harmful requests intact, with the top-1 and top-k Ships
   heads ablated, and with random k-head sets ablated; example answers side by side.
3. Refused, complied or degenerate: the stored outcome study (`headlab.outcomes.outcome_study`, written by
   `analyses/safety_heads.py`) per ablation method and head set, read, never computed, here.

Works on whatever model the workbench holds. The embedded model does not refuse, so its Ships
scores say little: load `embedded-refusal` (the refusal-tuned adapter merged in) in the Model tab.
A view only: scores, the check and its tables come from `headlab.scorers.safety`.
"""
from dataclasses import dataclass

import gradio as gr

import headlab as hl
import headlab.scorers.safety as safety
import headlab.tasks.refusal  # noqa: F401  (registers the "refusal" task)
from headlab.outcomes import stored_outcome_study
from app.feedback import progress_to, shows_errors
from app.inputs import check_count
from app.workbench import Workbench
from app.views import heatmap_with_top, json_button, link_heads, result_json, table
from headlab.heads import head_label
from headlab.scorers import scorer_fields

METHODS = {safety.method_label(name): name for name in safety.SHIPS_METHODS}
MAX_N, MAX_N_RANDOM = 40, 10
TOP_ROWS = 10
NOTE = (
    "The embedded SmolLM2 model itself **does not refuse** harmful requests, so there is no safety behaviour "
    "to find in it: load **`embedded-refusal`** in the Model tab (the embedded model with the refusal LoRA "
    "adapter of `analyses/refusal_tuning.py` merged in)."
)


@dataclass
class SafetyTab:
    note: gr.Markdown
    n: gr.Number
    method: gr.Radio
    k: gr.Number
    n_random: gr.Number
    score_button: gr.Button
    check_button: gr.Button
    status: gr.Markdown
    heatmap: gr.Plot
    clicked: gr.Textbox  # hidden: the heatmap cell clicked (`app.page`)
    head: gr.Textbox
    details: gr.Markdown
    top: gr.Dataframe
    download: gr.DownloadButton
    check_summary: gr.Markdown
    check_plot: gr.Plot
    check_table: gr.Dataframe
    check_download: gr.DownloadButton
    examples: gr.Dataframe
    outcome_summary: gr.Markdown
    outcome_table: gr.Dataframe
    outcome_download: gr.DownloadButton


def model_note(bench: Workbench) -> str:
    name = bench.info.name
    if name.endswith("-refusal"):
        return f"Current model: **{name}** (refusal-tuned)."
    return f"Current model: **{name}**. " + NOTE


def safety_scores(bench: Workbench, n: int, method: str, seed: int = 0) -> hl.HeadScores:
    """Ships scores of the current model with one of `SHIPS_METHODS` (from the store, or computed)."""
    if method not in safety.SHIPS_METHODS:
        raise ValueError(f"Ablation must be one of {', '.join(safety.SHIPS_METHODS)}; got {method!r}.")
    return hl.score(bench.lab, "safety", n=n, seed=seed, method=method)


def scores_summary(scores: hl.HeadScores) -> str:
    layer, head, value = scores.top(1)[0]
    firsts = scores.meta.get("intact_first_tokens", [])
    first = f" Intact first answer tokens: {', '.join(repr(t) for t in firsts[:8])}." if firsts else ""
    return (
        f"**Ships** of {scores.model} on {scores.meta.get('n_requests', '?')} harmful requests "
        f"({safety.method_label(scores.params['method'])}): best head **{head_label(layer, head)}** (KL {value:.3f}); median "
        f"head {float(scores.values.median()):.4f}, mean {float(scores.values.mean()):.4f}.{first}"
    )


def outcome_view(bench: Workbench) -> tuple:
    """The stored outcome study of the current model (summary, counts table, JSON), or a note saying how to make one."""
    study = stored_outcome_study(bench.lab)
    if study is None:
        return (f"No stored outcome study for {bench.info.name}: `analyses/safety_heads.py` writes one "
                "(the shipped run is for `embedded-refusal`)."), None, None
    p = study.params
    return (f"Greedy answers ({p['max_new_tokens']} tokens) to {p['n']} {p['split']} harmful requests with the heads "
            f"{p['heads']} (and random pairs) ablated, each labelled by `headlab.outcomes`: degenerate when the intact model "
            f"finds it implausible (loss > {study.calibration['loss_threshold']:.2f} nats/token) or repetitive, else "
            "refused or complied. \"Not refused\" is not \"complied\" (stored run)."), study.to_frame(), result_json(study, "outcome-study")


def layout(bench: Workbench) -> SafetyTab:
    """The tab's components, defaults read from the `Safety` scorer and the refusal check's config."""
    fields, check = scorer_fields("safety"), safety.CHECK
    gr.Markdown(
        "**Safety heads** (Zhou et al. 2024, *Ships*): a head's Ships score is the KL divergence between the model's "
        "next-token distribution at the start of its answer to a harmful request, intact and with that head ablated "
        f"(by default {safety.method_label(fields['method'])}: its query scaled so its attention becomes uniform). The check "
        "ablates the top heads and counts refusals on held-out harmful requests, against random heads."
    )
    note = gr.Markdown(model_note(bench), elem_id="safety-model-note")
    with gr.Row():
        n = gr.Number(fields["n"], precision=0, label="harmful requests scored (n)", elem_id="safety-n")
        method = gr.Radio(list(METHODS), value=safety.method_label(fields["method"]), label="ablation", elem_id="safety-method")
        score_button = gr.Button("Score safety heads", variant="primary", elem_id="safety-score")
    status = gr.Markdown("Press **Score safety heads** (a stored run is read; computing scans every head, ~1–5 min on CPU).",
                         elem_id="safety-status")
    linked = heatmap_with_top("safety", "Ships per head", "top heads")
    gr.Markdown("### Do the top heads keep the model refusing?")
    with gr.Row():
        k = gr.Number(check.ks[0], precision=0, label="k (top heads ablated)", elem_id="safety-k")
        n_random = gr.Number(check.n_random, precision=0, label="random k-head sets", elem_id="safety-n-random")
        check_button = gr.Button("Check refusal: top-k vs random-k", variant="primary", elem_id="safety-check")
    check_summary = gr.Markdown(elem_id="safety-check-summary")
    with gr.Row():
        check_plot = gr.Plot(label="refusal rate: top-k vs random-k", elem_id="safety-check-plot")
        with gr.Column():
            check_table = table(label="refusal rate per k", interactive=False, elem_id="safety-check-table")
            check_download = json_button("safety-check-json", "⬇ JSON of this check")
    examples = table(label="answers side by side (held-out harmful requests)", interactive=False, wrap=True,
                            elem_id="safety-examples")
    gr.Markdown("### Refused, complied or degenerate?")
    outcome_summary = gr.Markdown(elem_id="safety-outcome-summary")
    outcome_table = table(label="answers per method and head set", interactive=False, elem_id="safety-outcomes")
    outcome_download = json_button("safety-outcomes-json", "⬇ JSON of the outcome study")
    return SafetyTab(note, n, method, k, n_random, score_button, check_button, status, **linked, check_summary=check_summary, check_plot=check_plot, check_table=check_table,
                     check_download=check_download, examples=examples, outcome_summary=outcome_summary,
                     outcome_table=outcome_table, outcome_download=outcome_download)


def wire(tab: SafetyTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: each reads the Ships run from the form and shows what the library returns."""

    def read_scores(n_value, method_label) -> hl.HeadScores:
        if method_label not in METHODS:
            raise ValueError(f"Pick an ablation: {', '.join(METHODS)}.")
        return safety_scores(bench, check_count(n_value, "n", 1, MAX_N), METHODS[method_label])

    def view(scores: hl.HeadScores) -> tuple:
        """(heatmap, top table, summary, JSON, the model's note) of a Ships run."""
        return (scores.heatmap(f"Ships — {scores.model}"), scores.top_frame(TOP_ROWS, "ships"), scores_summary(scores),
                result_json(scores, "safety-scores"), model_note(bench))

    @shows_errors
    def score(n_value: float, method_label: str, progress=gr.Progress()) -> tuple:
        progress(0.0, desc="Ships scan (reads the store first)")
        return view(read_scores(n_value, method_label))

    @shows_errors
    def run_check(n_value: float, method_label: str, k_value: float, n_random_value: float, progress=gr.Progress()) -> tuple:
        scores = read_scores(n_value, method_label)
        k_heads = check_count(k_value, "k", 1, bench.info.n_layers * bench.info.n_heads // 2)
        result = safety.refusal_check(bench.lab, scores, k_heads, check_count(n_random_value, "random k-head sets", 1, MAX_N_RANDOM),
                                      progress=progress_to(progress))
        few = result.rates()["intact"] < safety.FEW_REFUSALS
        return (result.summary() + (" " + NOTE if few else ""), result.figure(), result.to_frame(),
                result_json(result.curve, "refusal-check"), result.examples, model_note(bench))

    def first_view(n_value: float, method_label: str) -> tuple:
        """The stored Ships run of the form for the visitor's model, its stored refusal check and outcome study
        (nothing computed)."""
        scores = hl.stored(bench.lab, "safety", n=check_count(n_value, "n", 1, MAX_N), method=METHODS.get(method_label, method_label))
        if scores is None:
            return (None, gr.skip(), f"No stored Ships run for {bench.info.name}: press **Score safety heads**.", None,
                    model_note(bench), "", None, gr.skip(), None, *outcome_view(bench))
        curve = bench.stored_curve(scores)
        check = (f"{curve.summary()} (stored run)", curve.figure(), curve.to_frame(), result_json(curve, "refusal-check")) if curve else (
            "", None, gr.skip(), None)
        return (*view(scores), *check, *outcome_view(bench))

    tab.first_view, tab.first_inputs = first_view, [tab.n, tab.method]
    score_outputs = [tab.heatmap, tab.top, tab.status, tab.download, tab.note]
    check_outputs = [tab.check_summary, tab.check_plot, tab.check_table, tab.check_download]
    tab.first_outputs = [*score_outputs, *check_outputs, tab.outcome_summary, tab.outcome_table, tab.outcome_download]
    lab_job = {"concurrency_id": concurrency_id}
    tab.score_button.click(score, inputs=[tab.n, tab.method], outputs=score_outputs, api_name="safety", **lab_job)
    tab.check_button.click(run_check, inputs=[tab.n, tab.method, tab.k, tab.n_random],
                           outputs=[*check_outputs, tab.examples, tab.note], api_name="safety_check", **lab_job)
    link_heads(tab.heatmap, tab.clicked, tab.head, tab.details, tables=[tab.top])


def build_safety_tab(bench: Workbench, concurrency_id: str) -> SafetyTab:
    tab = layout(bench)
    wire(tab, bench, concurrency_id)
    return tab
