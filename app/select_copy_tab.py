"""The Select & copy tab (Tulchinskii et al. 2024, "Listening to the Wise Few"): heads whose query at the
end of a multiple-choice prompt points at the right option's label, against the model's own answer.

1. Score: every head's accuracy at picking the answer by its score on the option labels (heatmap
   of the chosen variant on the test split), the top heads with validation / test accuracy, and the
   model's own letter-logit accuracy on the same splits.
2. One test question: the best-on-validation head's QK-score per option, next to the answer and
   the model's letter logits.
3. The ablation check: mean/zero-ablate the top-k heads (by accuracy over all scored questions)
   vs random k-head sets on the `mcqa` task (fresh questions), the model's letter accuracy.

A view only: scores, tables, figures and summaries come from `headlab.scorers.select_copy`. Your own
questions come as an uploaded JSONL/CSV file or a path inside the app's files folder (`Workbench.files`);
errors about them name the line and the problem, never the file's text.
"""
from dataclasses import dataclass

import gradio as gr

import headlab as hl
import headlab.scorers.select_copy as sc
import headlab.tasks.mcqa  # noqa: F401  registers the "mcqa" task
from app.feedback import progress_to, shows_errors
from app.forms import CheckForm, check_form
from app.inputs import check_count, hiding_file_text
from app.workbench import Workbench
from app.views import heatmap_with_top, link_heads, result_json
from headlab.heads import format_heads
from headlab.scorers import scorer_fields

MAX_N, MAX_N_RANDOM = 1024, 20
TOP_K = 12
VARIANT_CHOICES = {sc.VARIANT_TEXT[v]: v for v in sc.VARIANTS}
SYNTHETIC = ("", "synthetic")  # the dataset field's built-in values
INTRO = (
    "A **select-and-copy head** (Tulchinskii et al. 2024) looks, from the last prompt token, at the label of the right "
    "option (\"B\" of \"B. banana\"): its pre-softmax **QK-score** on the labels picks the answer, sometimes better than "
    "the model's own output. Heads are chosen on a validation split and judged on the test split."
)


@dataclass
class SelectCopyTab:
    n: gr.Number
    seed: gr.Number
    chat: gr.Checkbox
    dataset: gr.Textbox
    dataset_file: gr.File
    variant: gr.Radio
    example: gr.Number
    score_button: gr.Button
    status: gr.Markdown
    heatmap: gr.Plot
    clicked: gr.Textbox  # hidden: the heatmap cell clicked (`app.page`)
    head: gr.Textbox
    details: gr.Markdown
    top: gr.Dataframe
    download: gr.DownloadButton
    example_text: gr.Markdown
    example_plot: gr.Plot
    check: CheckForm


def select_copy_scores(bench: Workbench, n: int, seed: int, chat: bool = True, dataset: str = "",
                       dataset_file: str | None = None) -> hl.HeadScores:
    """The select_copy run of this form, stored or computed: synthetic questions unless `dataset_file` (an
    upload) or `dataset` (a path in the app's files folder) names a JSONL/CSV file."""
    source = bench.files.user_file(dataset, dataset_file, SYNTHETIC, "dataset")
    with hiding_file_text(source if source not in SYNTHETIC else None):
        return hl.score(bench.lab, "select_copy", n=n, seed=seed, chat=bool(chat), dataset=source or None)


def layout() -> SelectCopyTab:
    """The tab's components, defaults read from the `SelectCopy` scorer and the ablation check's config."""
    fields, check = scorer_fields("select_copy"), sc.CHECK
    gr.Markdown(INTRO)
    with gr.Row():
        n = gr.Number(fields["n"], precision=0, label="questions (n)", elem_id="select-copy-n")
        seed = gr.Number(fields["seed"], precision=0, label="seed", elem_id="select-copy-seed")
        chat = gr.Checkbox(fields["chat"], label="chat template", elem_id="select-copy-chat")
        dataset = gr.Textbox(fields["dataset"] or "", label="your questions (a JSONL/CSV path in the app's files folder; empty = synthetic)",
                             elem_id="select-copy-dataset")
        dataset_file = gr.File(label="or upload your questions (JSONL/CSV)", type="filepath", file_count="single",
                               file_types=[".jsonl", ".ndjson", ".json", ".csv", ".tsv"], elem_id="select-copy-dataset-file")
    with gr.Row():
        variant = gr.Radio(list(VARIANT_CHOICES), value=list(VARIANT_CHOICES)[0], label="heatmap shows", elem_id="select-copy-variant", scale=3)
        example = gr.Number(0, precision=0, label="example test question #", elem_id="select-copy-example", scale=1)
        score_button = gr.Button("Find select-and-copy heads", variant="primary", elem_id="select-copy-score", scale=1)
    status = gr.Markdown("Press **Find select-and-copy heads** (a stored run is read, not recomputed).", elem_id="select-copy-status")
    linked = heatmap_with_top("select-copy", "head accuracy (test split)", "top heads by validation accuracy")
    with gr.Row():
        example_text = gr.Markdown(elem_id="select-copy-example-text")
        example_plot = gr.Plot(label="best head's QK-scores per option", elem_id="select-copy-example-plot")
    gr.Markdown("### Ablation check: top-k select-and-copy heads vs random heads, on fresh questions")
    form = check_form(check, "select-copy", "task questions", "Ablate top-k vs random-k", "mcqa accuracy")
    return SelectCopyTab(n, seed, chat, dataset, dataset_file, variant, example, score_button, status, **linked,
                         example_text=example_text, example_plot=example_plot, check=form)


def wire(tab: SelectCopyTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: each reads the run from the form and shows what the library returns."""

    def read_form(n_value, seed_value, chat_value, dataset_value, dataset_file) -> hl.HeadScores:
        return select_copy_scores(bench, check_count(n_value, "questions (n)", 2, MAX_N), check_count(seed_value, "seed", 0, 2**31 - 1),
                                  chat_value, dataset_value, dataset_file)

    def view(scores: hl.HeadScores, variant: str, example: float) -> tuple:
        """(heatmap, top table, summary, example question and its figure, JSON) of a run."""
        with hiding_file_text(scores.params["dataset"]):  # the example re-reads the questions
            question = sc.example_question(scores, check_count(example, "example question", 0, MAX_N))
        return (sc.accuracy_heatmap(scores, VARIANT_CHOICES[variant]), sc.validation_frame(scores, TOP_K),
                sc.summary(scores), question.summary(), question.figure(), result_json(scores, "select-copy-scores"))

    @shows_errors
    def score(n, seed, chat, dataset, variant, example, dataset_file=None, progress=gr.Progress()) -> tuple:
        progress(0.0, desc="scoring select-and-copy heads (a stored run is read)")
        return view(read_form(n, seed, chat, dataset, dataset_file), variant, example)

    @shows_errors
    def check(n, seed, chat, dataset, k, n_random, task_n, method, dataset_file=None, progress=gr.Progress()) -> tuple:
        k_heads = check_count(k, "k", 1, bench.info.n_layers * bench.info.n_heads // 2)
        curve = sc.ablation_check(bench.lab, read_form(n, seed, chat, dataset, dataset_file), k_heads,
                                  check_count(n_random, "random sets", 1, MAX_N_RANDOM), check_count(task_n, "task questions", 1, MAX_N),
                                  method, progress=progress_to(progress))
        return (f"{curve.summary()} Top-{k_heads}: {format_heads(curve.top_heads[0])}.", curve.figure(), curve.to_frame(),
                result_json(curve, "select-copy-check"))

    def first_view(n, seed, chat, dataset, variant, example) -> tuple:
        """The stored run of the form on synthetic questions (nothing computed)."""
        scores = None if dataset else hl.stored(bench.lab, "select_copy", n=check_count(n, "questions (n)", 2, MAX_N),
                                                seed=check_count(seed, "seed", 0, 2**31 - 1), chat=bool(chat))
        if scores is None:
            return None, gr.skip(), f"No stored run for {bench.info.name} with this form: press **Find select-and-copy heads**.", "", None, None
        return view(scores, variant, example)

    form = [tab.n, tab.seed, tab.chat, tab.dataset]
    tab.first_view, tab.first_inputs = first_view, [*form, tab.variant, tab.example]
    tab.first_outputs = [tab.heatmap, tab.top, tab.status, tab.example_text, tab.example_plot, tab.download]
    lab_job = {"concurrency_id": concurrency_id}
    tab.score_button.click(score, inputs=[*form, tab.variant, tab.example, tab.dataset_file], outputs=tab.first_outputs,
                           api_name="select_copy", **lab_job)
    link_heads(tab.heatmap, tab.clicked, tab.head, tab.details, tables=[tab.top])
    tab.check.button.click(check, inputs=[*form, *tab.check.inputs, tab.dataset_file],
                           outputs=tab.check.outputs, api_name="select_copy_check", **lab_job)


def build_select_copy_tab(bench: Workbench, concurrency_id: str) -> SelectCopyTab:
    tab = layout()
    wire(tab, bench, concurrency_id)
    return tab
