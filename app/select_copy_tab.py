"""The Select & copy tab (Tulchinskii et al. 2024, "Listening to the Wise Few"): heads whose query at the
end of a multiple-choice prompt points at the right option's label, against the model's own answer.

1. Score: every head's accuracy at picking the answer by its score on the option labels (heatmap
   of the chosen variant on the test split), the top heads with validation / test accuracy, and the
   model's own letter-logit accuracy on the same splits.
2. One test question: the best-on-validation head's QK-score per option, next to the answer and
   the model's letter logits.
3. The ablation check: mean/zero-ablate the top-k heads (by accuracy over all scored questions)
   vs random k-head sets on the `mcqa` task (fresh questions), the model's letter accuracy.

A view only: scores, tables, figures and summaries come from `headlab.scorers.select_copy`.
"""
from dataclasses import dataclass

import gradio as gr

import headlab as hl
import headlab.scorers.select_copy as sc
import headlab.tasks.mcqa  # noqa: F401  registers the "mcqa" task
from app.feedback import progress_to, shows_errors
from app.inputs import check_count
from app.workbench import Workbench
from headlab.ablation.methods import parameterless_methods
from headlab.heads import format_heads
from headlab.scorers import scorer_fields

MAX_N, MAX_N_RANDOM = 1024, 20
TOP_K = 12
VARIANT_CHOICES = {sc.VARIANT_TEXT[v]: v for v in sc.VARIANTS}
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
    variant: gr.Radio
    example: gr.Number
    score_button: gr.Button
    status: gr.Markdown
    heatmap: gr.Plot
    top: gr.Dataframe
    example_text: gr.Markdown
    example_plot: gr.Plot
    k: gr.Number
    n_random: gr.Number
    task_n: gr.Number
    method: gr.Radio
    check_button: gr.Button
    check_summary: gr.Markdown
    check_plot: gr.Plot
    check_table: gr.Dataframe


def select_copy_scores(bench: Workbench, n: int, seed: int, chat: bool = True, dataset: str = "") -> hl.HeadScores:
    """The select_copy run of this form (synthetic questions unless `dataset` names a JSONL/CSV file), stored or computed."""
    return hl.score(bench.lab, "select_copy", n=n, seed=seed, chat=bool(chat), dataset=(dataset or "").strip() or None)


def layout() -> SelectCopyTab:
    """The tab's components, defaults read from the `SelectCopy` scorer and the ablation check's config."""
    fields, check = scorer_fields("select_copy"), sc.CHECK
    gr.Markdown(INTRO)
    with gr.Row():
        n = gr.Number(fields["n"], precision=0, label="questions (n)", elem_id="select-copy-n")
        seed = gr.Number(fields["seed"], precision=0, label="seed", elem_id="select-copy-seed")
        chat = gr.Checkbox(fields["chat"], label="chat template", elem_id="select-copy-chat")
        dataset = gr.Textbox(fields["dataset"] or "", label="your questions (JSONL/CSV path; empty = synthetic)", elem_id="select-copy-dataset")
    with gr.Row():
        variant = gr.Radio(list(VARIANT_CHOICES), value=list(VARIANT_CHOICES)[0], label="heatmap shows", elem_id="select-copy-variant", scale=3)
        example = gr.Number(0, precision=0, label="example test question #", elem_id="select-copy-example", scale=1)
        score_button = gr.Button("Find select-and-copy heads", variant="primary", elem_id="select-copy-score", scale=1)
    status = gr.Markdown("Press **Find select-and-copy heads** (a stored run is read, not recomputed).", elem_id="select-copy-status")
    with gr.Row():
        heatmap = gr.Plot(label="head accuracy (test split)", elem_id="select-copy-heatmap", scale=3)
        top = gr.Dataframe(label="top heads by validation accuracy", interactive=False, elem_id="select-copy-top", scale=2)
    with gr.Row():
        example_text = gr.Markdown(elem_id="select-copy-example-text")
        example_plot = gr.Plot(label="best head's QK-scores per option", elem_id="select-copy-example-plot")
    gr.Markdown("### Ablation check: top-k select-and-copy heads vs random heads, on fresh questions")
    with gr.Row():
        k = gr.Number(check.ks[0], precision=0, label="k (heads)", elem_id="select-copy-k")
        n_random = gr.Number(check.n_random, precision=0, label="random sets", elem_id="select-copy-n-random")
        task_n = gr.Number(check.n, precision=0, label="task questions", elem_id="select-copy-task-n")
        method = gr.Radio(parameterless_methods(), value=check.method, label="ablation", elem_id="select-copy-method")
        check_button = gr.Button("Ablate top-k vs random-k", elem_id="select-copy-check")
    check_summary = gr.Markdown(elem_id="select-copy-check-summary")
    with gr.Row():
        check_plot = gr.Plot(label="top-k vs random-k", elem_id="select-copy-check-plot")
        check_table = gr.Dataframe(label="mcqa accuracy", interactive=False, elem_id="select-copy-check-table")
    return SelectCopyTab(n, seed, chat, dataset, variant, example, score_button, status, heatmap, top, example_text,
                         example_plot, k, n_random, task_n, method, check_button, check_summary, check_plot, check_table)


def wire(tab: SelectCopyTab, bench: Workbench, concurrency_id: str) -> None:
    """The tab's events: each reads the run from the form and shows what the library returns."""

    def read_form(n_value, seed_value, chat_value, dataset_value) -> hl.HeadScores:
        return select_copy_scores(bench, check_count(n_value, "questions (n)", 2, MAX_N), check_count(seed_value, "seed", 0, 2**31 - 1),
                                  chat_value, dataset_value)

    @shows_errors
    def score(*form, progress=gr.Progress()) -> tuple:
        *run, variant_label, example_value = form
        progress(0.0, desc="scoring select-and-copy heads (a stored run is read)")
        scores = read_form(*run)
        example = sc.example_question(scores, check_count(example_value, "example question", 0, MAX_N))
        return (sc.accuracy_heatmap(scores, VARIANT_CHOICES[variant_label]), sc.validation_frame(scores, TOP_K),
                sc.summary(scores), example.summary(), example.figure())

    @shows_errors
    def check(*form, progress=gr.Progress()) -> tuple:
        *run, k_value, n_random_value, task_n_value, method_value = form
        k_heads = check_count(k_value, "k", 1, bench.info.n_layers * bench.info.n_heads // 2)
        curve = sc.ablation_check(bench.lab, read_form(*run), k_heads, check_count(n_random_value, "random sets", 1, MAX_N_RANDOM),
                                  check_count(task_n_value, "task questions", 1, MAX_N), method_value, progress=progress_to(progress))
        return f"{curve.summary()} Top-{k_heads}: {format_heads(curve.top_heads[0])}.", curve.figure(), curve.to_frame()

    form = [tab.n, tab.seed, tab.chat, tab.dataset]
    lab_job = {"concurrency_id": concurrency_id}
    tab.score_button.click(score, inputs=[*form, tab.variant, tab.example],
                           outputs=[tab.heatmap, tab.top, tab.status, tab.example_text, tab.example_plot],
                           api_name="select_copy", **lab_job)
    tab.check_button.click(check, inputs=[*form, tab.k, tab.n_random, tab.task_n, tab.method],
                           outputs=[tab.check_summary, tab.check_plot, tab.check_table], api_name="select_copy_check", **lab_job)


def build_select_copy_tab(bench: Workbench, concurrency_id: str) -> SelectCopyTab:
    tab = layout()
    wire(tab, bench, concurrency_id)
    return tab
