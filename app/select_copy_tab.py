"""The Select & copy tab (Tulchinskii et al. 2024, "Listening to the Wise Few"): heads whose query at the
end of a multiple-choice prompt points at the right option's label, against the model's own answer.

1. Score: every head's accuracy at picking the answer by its score on the option labels (heatmap
   of the chosen variant on the test split), the top heads with validation / test accuracy, and the
   model's own letter-logit accuracy on the same splits.
2. One test question: the best-on-validation head's QK-score per option, next to the answer and
   the model's letter logits.
3. The ablation check: mean/zero-ablate the top-k heads (by accuracy over all scored questions)
   vs random k-head sets on the `mcqa` task (fresh questions), the model's letter accuracy.
"""
from dataclasses import dataclass

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

import headlab as hl
import headlab.scorers.select_copy  # noqa: F401  registers the "select_copy" kind
import headlab.tasks.mcqa  # noqa: F401  registers the "mcqa" task
from app.feedback import progress_to, shows_errors
from app.inputs import check_count
from app.workbench import Workbench
from headlab.datasets import mcqa
from headlab.scorers.select_copy import VARIANT_TEXT, VARIANTS

DEFAULT_N, MAX_N = 48, 1024  # the scorer's default n
DEFAULT_K, DEFAULT_N_RANDOM, DEFAULT_TASK_N = 3, 3, 16
TOP_K = 12
TOP_COLUMNS = ["rank", "layer", "head", "val acc (QK)", "test acc (QK)", "test acc (attention)", "test acc (QK, no rotary)"]
VARIANT_CHOICES = {VARIANT_TEXT[v]: v for v in VARIANTS}


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
    check_table: gr.Dataframe


def select_copy_scores(bench: Workbench, n: int, seed: int, chat: bool = True, dataset: str = "") -> hl.HeadScores:
    """The select_copy run of this form (synthetic questions unless `dataset` names a JSONL/CSV file), stored or computed."""
    return hl.score(bench.lab, "select_copy", n=n, seed=seed, chat=bool(chat), dataset=(dataset or "").strip() or None)


def accuracy_heatmap(scores: hl.HeadScores, variant: str = "qk_label", split: str = "test") -> go.Figure:
    """Heads' accuracy (`variant`, `split`) as a layer x head heatmap, with chance and the model's own accuracy in the title."""
    values = scores.raw[f"{split}_{variant}"]
    meta = scores.meta
    fig = go.Figure(go.Heatmap(
        z=values.numpy(), x=list(range(scores.n_heads)), y=list(range(scores.n_layers)), zmin=0, zmax=1,
        colorscale="Viridis", colorbar={"title": "accuracy"},
        hovertemplate="layer %{y}, head %{x}<br>accuracy %{z:.3f}<extra></extra>",
    ))
    fig.update_layout(
        title=(f"{VARIANT_TEXT[variant]}, {split} accuracy — chance {meta['chance']:.2f}, "
               f"model's letter logits {meta['logits_accuracy'][split]:.2f}"),
        xaxis_title="head", yaxis_title="layer", height=max(360, 18 * scores.n_layers + 120),
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def top_table(scores: hl.HeadScores, k: int = TOP_K) -> pd.DataFrame:
    """The `k` best heads by validation QK accuracy (ties: test-blind layer-major order), with their test accuracies."""
    val = scores.raw["val_qk_label"].flatten()
    order = sorted(range(len(val)), key=lambda i: -float(val[i]))[:k]
    rows = []
    for rank, flat in enumerate(order, 1):
        layer, head = divmod(flat, scores.n_heads)
        rows.append((rank, layer, head, round(float(val[flat]), 3), round(float(scores.raw["test_qk_label"][layer, head]), 3),
                     round(float(scores.raw["test_attn_label"][layer, head]), 3),
                     round(float(scores.raw["test_qk_norope_label"][layer, head]), 3)))
    return pd.DataFrame(rows, columns=TOP_COLUMNS)


def summary(scores: hl.HeadScores) -> str:
    meta, best = scores.meta, scores.meta["best"]
    logits = meta["logits_accuracy"]
    lines = [
        f"**{meta['n_samples']} questions** ({meta['format']}; {meta['n_val']} validation / {meta['n_test']} test), "
        f"chance {meta['chance']:.2f}. The model's own answer (letter logits): validation **{logits['val']:.2f}**, "
        f"test **{logits['test']:.2f}** (letters it picked: {meta['logits_prediction_counts']}).",
        "",
        "| reading | best head on validation | validation | test | best test of any head (optimistic) |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        b = best[variant]
        lines.append(f"| {VARIANT_TEXT[variant]} | L{b['layer']}H{b['head']} | {b['val']:.2f} | {b['test']:.2f} | {b['best_test_any_head']:.2f} |")
    lines.append("\nQK-score and attention weight rank the options of one head identically (softmax is monotone), so their rows agree.")
    return "\n".join(lines)


def example(bench: Workbench, scores: hl.HeadScores, index: int) -> tuple[str, go.Figure]:
    """Test question number `index`: its text, and the best-on-validation head's QK-score per option vs the model's letter logits."""
    test = [i for i, flag in enumerate(scores.raw["is_test"].tolist()) if flag]
    index = check_count(index, "example question", 0, len(test) - 1)
    row = test[index]
    params = scores.params
    question = mcqa.questions_for(params["dataset"], params["n"], params["seed"], params["categories"])[row]
    best = scores.meta["best"]["qk_label"]
    layer, head = best["layer"], best["head"]
    qk = scores.raw["scores_qk_label"][row, layer, head, : len(question.options)]
    logits = scores.raw["letter_logits"][row, : len(question.options)]
    letters = list(mcqa.LETTERS[: len(question.options)])
    head_pick, model_pick = letters[int(qk.argmax())], letters[int(logits.argmax())]
    options = "\n".join(f"- **{l}.** {o}{'  ✓' if i == question.answer else ''}" for i, (l, o) in enumerate(zip(letters, question.options)))
    text = (f"**Test question {index}** — {question.question}\n\n{options}\n\nAnswer **{question.answer_letter}**; "
            f"head L{layer}H{head} picks **{head_pick}**, the model's letter logits pick **{model_pick}**.")
    fig = go.Figure()
    colours = ["crimson" if i == question.answer else "steelblue" for i in range(len(letters))]
    fig.add_trace(go.Bar(x=[f"{l}. {o}" for l, o in zip(letters, question.options)], y=qk.tolist(), marker_color=colours,
                         name=f"L{layer}H{head} QK-score"))
    fig.update_layout(title=f"L{layer}H{head}: QK-score of the final query on each option's label (red = answer)",
                      yaxis_title="pre-softmax score", height=340, margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return text, fig


def selection_scores(scores: hl.HeadScores) -> hl.HeadScores:
    """The heads to ablate: accuracy over all scored questions (the check runs on other, fresh questions)."""
    return hl.HeadScores(kind="select_copy", model=scores.model, params={**scores.params, "rank_by": "all_qk_label"},
                         values=scores.raw["all_qk_label"].clone(), meta={"metric": "accuracy over all scored questions"})


def ablation_check(bench: Workbench, scores: hl.HeadScores, k: int, n_random: int, task_n: int, method: str = "mean",
                   progress=None) -> hl.AblationCurve:
    """The mcqa task intact, with the top-k heads ablated, and with `n_random` random k-head sets ablated."""
    return hl.ablation_curve(bench.lab, selection_scores(scores), "mcqa", ks=[k], method=method, n_random=n_random, n=task_n,
                             task_params={"chat": bool(scores.params["chat"])}, progress=progress)


def check_summary(curve: hl.AblationCurve) -> tuple[str, pd.DataFrame]:
    k, top, rand = curve.ks[0], curve.top[0], curve.random[0]
    heads = ", ".join(f"L{l}H{h}" for l, h in curve.top_heads[0])
    mean = sum(rand) / len(rand)
    text = (f"**mcqa** ({curve.task['n']} fresh questions, letter-logit accuracy), {curve.method} ablation: intact "
            f"**{curve.baseline:.3f}**; top-{k} select-and-copy heads ({heads}) ablated **{top:.3f}**; {len(rand)} random "
            f"{k}-head sets **{mean:.3f}** on average (min {min(rand):.3f}, max {max(rand):.3f}).")
    rows = [{"ablated": "nothing", "heads": "", "accuracy": round(curve.baseline, 4)},
            {"ablated": f"top-{k}", "heads": heads, "accuracy": round(top, 4)}]
    rows += [{"ablated": f"random set {i + 1}", "heads": ", ".join(f"L{l}H{h}" for l, h in hs), "accuracy": round(v, 4)}
             for i, (hs, v) in enumerate(zip(curve.random_heads[0], rand))]
    return text, pd.DataFrame(rows)


def build_select_copy_tab(bench: Workbench, concurrency_id: str) -> SelectCopyTab:
    gr.Markdown(
        "A **select-and-copy head** (Tulchinskii et al. 2024) looks, from the last prompt token, at the label of the right "
        "option (\"B\" of \"B. banana\"): its pre-softmax **QK-score** on the labels picks the answer, sometimes better than "
        "the model's own output. Heads are chosen on a validation split and judged on the test split."
    )
    with gr.Row():
        n = gr.Number(DEFAULT_N, precision=0, label="questions (n)", elem_id="select-copy-n")
        seed = gr.Number(0, precision=0, label="seed", elem_id="select-copy-seed")
        chat = gr.Checkbox(True, label="chat template", elem_id="select-copy-chat")
        dataset = gr.Textbox("", label="your questions (JSONL/CSV path; empty = synthetic)", elem_id="select-copy-dataset")
    with gr.Row():
        variant = gr.Radio(list(VARIANT_CHOICES), value=list(VARIANT_CHOICES)[0], label="heatmap shows", elem_id="select-copy-variant", scale=3)
        example_index = gr.Number(0, precision=0, label="example test question #", elem_id="select-copy-example", scale=1)
        score_button = gr.Button("Find select-and-copy heads", variant="primary", elem_id="select-copy-score", scale=1)
    status = gr.Markdown("Press **Find select-and-copy heads** (a stored run is read, not recomputed).", elem_id="select-copy-status")
    with gr.Row():
        with gr.Column(scale=3):
            heatmap = gr.Plot(label="head accuracy (test split)", elem_id="select-copy-heatmap")
        with gr.Column(scale=2):
            top = gr.Dataframe(pd.DataFrame(columns=TOP_COLUMNS), label="top heads by validation accuracy", interactive=False,
                               elem_id="select-copy-top")
    with gr.Row():
        example_text = gr.Markdown(elem_id="select-copy-example-text")
        example_plot = gr.Plot(label="best head's QK-scores per option", elem_id="select-copy-example-plot")
    gr.Markdown("### Ablation check: top-k select-and-copy heads vs random heads, on fresh questions")
    with gr.Row():
        k = gr.Number(DEFAULT_K, precision=0, label="k (heads)", elem_id="select-copy-k")
        n_random = gr.Number(DEFAULT_N_RANDOM, precision=0, label="random sets", elem_id="select-copy-n-random")
        task_n = gr.Number(DEFAULT_TASK_N, precision=0, label="task questions", elem_id="select-copy-task-n")
        method = gr.Radio(["mean", "zero"], value="mean", label="ablation", elem_id="select-copy-method")
        check_button = gr.Button("Ablate top-k vs random-k", elem_id="select-copy-check")
    check_text = gr.Markdown(elem_id="select-copy-check-summary")
    check_table = gr.Dataframe(label="mcqa accuracy", interactive=False, elem_id="select-copy-check-table")

    def read_form(n_value, seed_value, chat_value, dataset_value) -> hl.HeadScores:
        return select_copy_scores(bench, check_count(n_value, "questions (n)", 2, MAX_N), check_count(seed_value, "seed", 0, 2**31 - 1),
                                  chat_value, dataset_value)

    @shows_errors
    def score(n_value, seed_value, chat_value, dataset_value, variant_label, example_value, progress=gr.Progress()):
        progress(0.0, desc="scoring select-and-copy heads (a stored run is read)")
        scores = read_form(n_value, seed_value, chat_value, dataset_value)
        text, fig = example(bench, scores, example_value)
        return accuracy_heatmap(scores, VARIANT_CHOICES[variant_label]), top_table(scores), summary(scores), text, fig

    @shows_errors
    def check(n_value, seed_value, chat_value, dataset_value, k_value, n_random_value, task_n_value, method_value, progress=gr.Progress()):
        scores = read_form(n_value, seed_value, chat_value, dataset_value)
        k_heads = check_count(k_value, "k", 1, bench.info.n_layers * bench.info.n_heads // 2)
        curve = ablation_check(bench, scores, k_heads, check_count(n_random_value, "random sets", 1, 20),
                               check_count(task_n_value, "task questions", 1, MAX_N), method_value, progress=progress_to(progress))
        return check_summary(curve)

    form = [n, seed, chat, dataset]
    lab_job = {"concurrency_id": concurrency_id}
    score_button.click(score, inputs=[*form, variant, example_index], outputs=[heatmap, top, status, example_text, example_plot],
                       api_name="select_copy", **lab_job)
    check_button.click(check, inputs=[*form, k, n_random, task_n, method], outputs=[check_text, check_table],
                       api_name="select_copy_check", **lab_job)
    return SelectCopyTab(
        n=n, seed=seed, chat=chat, dataset=dataset, variant=variant, example=example_index, score_button=score_button,
        status=status, heatmap=heatmap, top=top, example_text=example_text, example_plot=example_plot, k=k, n_random=n_random,
        task_n=task_n, method=method, check_button=check_button, check_summary=check_text, check_table=check_table,
    )
