"""Select-and-copy heads (Tulchinskii et al. 2024, "Listening to the Wise Few"): heads whose query at
the end of a multiple-choice prompt points at the right option's label.

For every head and prompt, at the final prompt token:
- the QK-score of an option = the head's pre-softmax score between that query and the key at the
  option's label letter ("A" of "A. banana") — `hook_attn_scores` `[batch, head, q, k]`, per query
  head, grouped-query attention expanded by the model, rotary applied, scaled by 1/sqrt(d_head) (a
  constant per head, so it changes no ranking);
- the attention score = the attention weight (`hook_pattern`) on that key.
Both are also read at each option's last token (the paper studies that position too). The head
predicts the option with the highest score (ties go to the first option).

Within one head and one query the attention weight is a softmax of the QK-scores over the same
row, a monotone map, so the QK-score and the attention score always pick the same option: their
accuracies are equal (up to float ties), which the tests check on hand-built scores. A third
reading that does differ is `qk_norope_label`: the dot product of the query and key *before*
rotary (`hook_q`, `hook_k`, KV heads repeated to their query heads, / sqrt(d_head)), i.e. content
match without the relative-position term.

The prompts are split (seeded) into a validation and a test split. `values` = each head's test
accuracy with the QK-score at the label token. As in the paper, heads are *chosen* on validation:
`meta["best"]` names the best head on validation for each variant with its validation and test
accuracy, so the test number is an honest estimate. The model's own answer (its next-token logits
restricted to the option letters, 'A' or ' A' whichever is larger) is measured on the same splits
(`meta["logits_accuracy"]`). `raw` holds every variant's per-head accuracy on both splits and the
per-prompt option scores.

Default prompts: synthetic category questions (`headlab.datasets.mcqa`) in the chat template; `dataset=`
a JSONL/CSV path scores a user's questions instead.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from headlab.ablation.curve import AblationCurve, CurveConfig, ablation_curve
from headlab.activations import act_name, capturing, layer_names
from headlab.datasets import mcqa
from headlab.heads import Head, head_label
from headlab.lab import Lab
from headlab.longpass import eager_pass_bytes
from headlab.scorers import Scorer
from headlab.scores import HeadScores

VARIANTS = ("qk_label", "attn_label", "qk_last", "attn_last", "qk_norope_label")
VARIANT_TEXT = {
    "qk_label": "QK-score at the option's label letter",
    "attn_label": "attention weight at the option's label letter",
    "qk_last": "QK-score at the option's last token",
    "attn_last": "attention weight at the option's last token",
    "qk_norope_label": "QK-score at the option's label letter without rotary (hook_q . hook_k)",
}


def option_scores(scores: torch.Tensor, positions: torch.Tensor, query: torch.Tensor | int = -1) -> torch.Tensor:
    """Each head's score of each option: the row of `query` at the option positions.

    Args:
        scores: `[batch, head, q, k]` attention scores or weights.
        positions: `[batch, n_options]` key positions of the options (−1 marks a missing option).
        query: the query position (one int, or `[batch]`).
    Returns:
        `[batch, head, n_options]`, -inf where an option is missing.
    """
    batch, heads = scores.shape[:2]
    query = torch.as_tensor(query).expand(batch) if torch.as_tensor(query).ndim == 0 else torch.as_tensor(query)
    rows = scores[torch.arange(batch), :, query]  # [batch, head, k]
    index = positions.clamp(min=0)[:, None, :].expand(batch, heads, positions.shape[1])
    picked = rows.gather(-1, index.to(rows.device)).float()
    return picked.masked_fill((positions < 0)[:, None, :].to(picked.device), float("-inf"))


def unrotated_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The final query's pre-rotary scores against every key: `[batch, head, 1, k]`.

    Args:
        q: `[batch, pos, head, d_head]` (`hook_q`); k: `[batch, pos, kv_head, d_head]` (`hook_k`),
        each KV head shared by `head / kv_head` consecutive query heads.
    """
    k = k.float().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return torch.einsum("bhd,bphd->bhp", q[:, -1].float(), k)[:, :, None] / q.shape[-1] ** 0.5


def predictions(option_score: torch.Tensor) -> torch.Tensor:
    """The predicted option (argmax over the last axis; the first on ties)."""
    return option_score.argmax(-1)


def accuracy(option_score: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Accuracy over the prompt axis. `option_score` `[n, ..., n_options]`, `answers` `[n]` -> `[...]`."""
    if option_score.shape[0] == 0:
        return torch.full(option_score.shape[1:-1], float("nan"))
    hits = predictions(option_score) == answers.view(-1, *([1] * (option_score.ndim - 2)))
    return hits.float().mean(0)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded validation / test split of `range(n)`; both non-empty when n >= 2."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}.")
    order = list(range(n))
    random.Random(f"select_copy/{seed}").shuffle(order)
    n_val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else n
    return sorted(order[:n_val]), sorted(order[n_val:])


def best_head(acc: torch.Tensor) -> Head:
    """`(layer, head)` of the highest entry of `[layers, heads]` (the first, layer-major, on ties)."""
    flat = int(torch.argmax(acc.flatten()))
    return flat // acc.shape[1], flat % acc.shape[1]


def _final_query(act: torch.Tensor) -> torch.Tensor:
    """`[batch, head, q, k]` -> `[batch, head, 1, k]`: the final query's row."""
    return act[:, :, -1:]


@torch.no_grad()
def prompt_scores(lab: Lab, prompts: list[mcqa.Prompt], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """One forward pass per batch: every head's option scores (all `VARIANTS`) and the letter logits.

    Returns `{variant: [n, layers, heads, max_options]}` plus `letter_logits` `[n, max_options]`.
    """
    info = lab.info
    most = max(p.n_options for p in prompts)
    letter_ids = mcqa.letter_token_ids(lab, most)
    out = {v: torch.full((len(prompts), info.n_layers, info.n_heads, most), float("-inf")) for v in VARIANTS}
    out["letter_logits"] = torch.full((len(prompts), most), float("-inf"))
    for batch in mcqa.length_groups(prompts, batch_size):
        group = [prompts[i] for i in batch]
        tokens = torch.stack([p.tokens for p in group]).to(lab.device)
        labels = torch.full((len(group), most), -1)
        lasts = torch.full((len(group), most), -1)
        for row, prompt in enumerate(group):
            labels[row, : prompt.n_options] = torch.tensor(prompt.label_positions)
            lasts[row, : prompt.n_options] = torch.tensor(prompt.last_positions)
        # The HF model the bridge wraps, with only the final position's logits; the bridge's hooks fire on it.
        # Scores and patterns keep only the final query's row `[batch, head, 1, k]`; q and k are kept whole.
        with capturing(lab, layer_names(lab, "attn_scores", "pattern"), _final_query) as stash, \
                capturing(lab, layer_names(lab, "q", "k")) as qk:
            logits = lab.hf_model(tokens, logits_to_keep=1).logits[:, -1].float().cpu()
        out["letter_logits"][batch] = mcqa.answer_letter_scores(logits, letter_ids, [p.n_options for p in group])
        for layer in range(info.n_layers):
            scores = stash[act_name("attn_scores", layer)].float().cpu()
            pattern = stash[act_name("pattern", layer)].float().cpu()
            out["qk_label"][batch, layer] = option_scores(scores, labels)
            out["attn_label"][batch, layer] = option_scores(pattern, labels)
            out["qk_last"][batch, layer] = option_scores(scores, lasts)
            out["attn_last"][batch, layer] = option_scores(pattern, lasts)
            plain = unrotated_scores(qk[act_name("q", layer)], qk[act_name("k", layer)]).cpu()
            out["qk_norope_label"][batch, layer] = option_scores(plain, labels)
    return out


@dataclass(frozen=True)
class SelectCopy(Scorer):
    """Each head's test accuracy at picking the right option by its QK-score on the option labels.

    Cost: one eager forward pass per batch of `n` prompts (about 100 tokens each), keeping the final query's
    score row and every layer's q and k: time grows with n x (weights x pos + layers x heads x d_head x pos^2),
    memory with batch x (layers x pos x d_model + heads x pos^2) (`longpass.eager_pass_bytes`). Refused up front
    when the largest batch would not fit in free memory.
    """

    kind = "select_copy"
    dataset: str | None = None
    n: int = 48
    seed: int = 0
    categories: list[str] | None = None
    chat: bool = True
    val_fraction: float = 0.5
    batch_size: int = 8

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if int(self.n) < 2 or int(self.batch_size) < 1:
            raise ValueError(f"select_copy needs n >= 2 questions and batch_size >= 1; got n={self.n}, batch_size={self.batch_size}.")

    def compute(self, lab: Lab) -> HeadScores:
        dataset, n, seed, categories, chat = self.dataset, self.n, self.seed, self.categories, self.chat
        val_fraction, batch_size = self.val_fraction, self.batch_size
        questions = mcqa.questions_for(dataset, n, seed, categories)
        if len(questions) < 2:
            raise ValueError(f"Select-and-copy scoring needs at least 2 questions (a validation and a test one); got {len(questions)}.")
        prompts = mcqa.build_prompts(lab, questions, chat=chat)
        longest = max(len(p.tokens) for p in prompts)
        lab.require_memory(eager_pass_bytes(lab, longest, min(batch_size, len(prompts)), 2), "select_copy",
                           "lower batch_size")
        per_prompt = prompt_scores(lab, prompts, batch_size)
        answers = mcqa.answers_of(prompts)
        val, test = split_indices(len(prompts), val_fraction, seed)
        splits = {"val": torch.tensor(val), "test": torch.tensor(test)}
        raw: dict[str, torch.Tensor] = {}
        for variant in VARIANTS:
            for split, idx in splits.items():
                raw[f"{split}_{variant}"] = accuracy(per_prompt[variant][idx], answers[idx])
            raw[f"all_{variant}"] = accuracy(per_prompt[variant], answers)
            raw[f"scores_{variant}"] = per_prompt[variant]
        letter = per_prompt["letter_logits"]
        raw["letter_logits"] = letter
        raw["answers"] = answers.float()
        raw["is_test"] = torch.zeros(len(prompts)).index_fill_(0, splits["test"], 1.0)
        logits_acc = {split: float(accuracy(letter[idx], answers[idx])) for split, idx in splits.items()}
        logits_acc["all"] = float(accuracy(letter, answers))
        best = {}
        for variant in VARIANTS:
            layer, head = best_head(raw[f"val_{variant}"])
            best[variant] = {
                "layer": layer, "head": head,
                "val": float(raw[f"val_{variant}"][layer, head]), "test": float(raw[f"test_{variant}"][layer, head]),
                "best_test_any_head": float(raw[f"test_{variant}"].max()),
            }
        n_options = sorted({p.n_options for p in prompts})
        return self.result(lab, raw["test_qk_label"].clone(), raw, meta={
                "metric": "test-split accuracy of the head's QK-score (final query vs option label key) at picking the answer",
                "variants": {v: VARIANT_TEXT[v] for v in VARIANTS},
                "n_samples": len(prompts), "n_val": len(val), "n_test": len(test), "n_options": n_options,
                "chance": sum(1 / k for k in (p.n_options for p in prompts)) / len(prompts),
                "format": "chat template" if prompts[0].chat else "plain text ending 'Answer:'",
                "logits_accuracy": logits_acc,
                "logits_prediction_counts": torch.bincount(letter.argmax(-1), minlength=max(n_options)).tolist(),
                "best": best,
                "example": prompts[test[0] if test else 0].text,
        })


# --- what a view shows -----------------------------------------------------------------------

# The ablation check: the mcqa task (fresh questions) with the top-k heads vs random k-head sets ablated.
CHECK = CurveConfig(task="mcqa", ks=(3,), n_random=3, n=16)
TOP_COLUMNS = {"val_qk_label": "val acc (QK)", "test_qk_label": "test acc (QK)", "test_attn_label": "test acc (attention)",
               "test_qk_norope_label": "test acc (QK, no rotary)"}


def validation_frame(scores: HeadScores, k: int = 12):
    """The `k` best heads by validation QK accuracy (ties: layer-major order, test-blind), with their test accuracies."""
    import pandas as pd

    ranked = HeadScores(kind=scores.kind, model=scores.model, params=scores.params, values=scores.raw["val_qk_label"])
    rows = [{"rank": rank, "head": head_label(layer, head),
             **{column: round(float(scores.raw[key][layer, head]), 3) for key, column in TOP_COLUMNS.items()}}
            for rank, (layer, head, _) in enumerate(ranked.top(k), 1)]
    return pd.DataFrame(rows, columns=["rank", "head", *TOP_COLUMNS.values()])


def accuracy_heatmap(scores: HeadScores, variant: str = "qk_label", split: str = "test"):
    """Heads' accuracy (`variant`, `split`) as a layer x head heatmap, with chance and the model's own accuracy in the title."""
    from headlab.viz import head_heatmap

    meta = scores.meta
    return head_heatmap(scores.raw[f"{split}_{variant}"], f"{VARIANT_TEXT[variant]}, {split} accuracy — chance "
                        f"{meta['chance']:.2f}, model's letter logits {meta['logits_accuracy'][split]:.2f}", "accuracy",
                        zmin=0, zmax=1, hovertemplate="L%{y}H%{x}<br>accuracy %{z:.3f}<extra></extra>")


def summary(scores: HeadScores) -> str:
    """Markdown: the questions, the model's own accuracy, and per reading the best head on validation with its test accuracy."""
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
        lines.append(f"| {VARIANT_TEXT[variant]} | {head_label(b['layer'], b['head'])} | {b['val']:.2f} | {b['test']:.2f} | "
                     f"{b['best_test_any_head']:.2f} |")
    lines.append("\nQK-score and attention weight rank the options of one head identically (softmax is monotone), so their rows agree.")
    return "\n".join(lines)


@dataclass
class ExampleQuestion:
    """One test question and the best-on-validation head's QK-score `[n_options]` per option, vs the model's letter logits."""

    index: int
    question: mcqa.Question
    head: Head
    qk: list[float]
    letter_logits: list[float]

    @property
    def letters(self) -> list[str]:
        return list(mcqa.LETTERS[: len(self.question.options)])

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"option": self.letters, "text": self.question.options, "QK-score": self.qk,
                             "letter logit": self.letter_logits,
                             "answer": [i == self.question.answer for i in range(len(self.letters))]})

    def summary(self) -> str:
        letters, label = self.letters, head_label(*self.head)
        head_pick = letters[max(range(len(self.qk)), key=self.qk.__getitem__)]
        model_pick = letters[max(range(len(self.letter_logits)), key=self.letter_logits.__getitem__)]
        options = "\n".join(f"- **{l}.** {o}{'  ✓' if i == self.question.answer else ''}"
                            for i, (l, o) in enumerate(zip(letters, self.question.options)))
        return (f"**Test question {self.index}** — {self.question.question}\n\n{options}\n\nAnswer "
                f"**{self.question.answer_letter}**; head {label} picks **{head_pick}**, the model's letter logits pick **{model_pick}**.")

    def figure(self):
        import plotly.graph_objects as go

        label = head_label(*self.head)
        colours = ["crimson" if i == self.question.answer else "steelblue" for i in range(len(self.letters))]
        fig = go.Figure(go.Bar(x=[f"{l}. {o}" for l, o in zip(self.letters, self.question.options)], y=self.qk,
                               marker_color=colours, name=f"{label} QK-score"))
        fig.update_layout(title=f"{label}: QK-score of the final query on each option's label (red = answer)",
                          yaxis_title="pre-softmax score", height=340, margin={"l": 60, "r": 20, "t": 50, "b": 50})
        return fig


def example_question(scores: HeadScores, index: int) -> ExampleQuestion:
    """Test question number `index` of a select_copy run, read by its best head on validation (QK at the labels)."""
    test = [i for i, flag in enumerate(scores.raw["is_test"].tolist()) if flag]
    if not 0 <= index < len(test):
        raise ValueError(f"example question must be between 0 and {len(test) - 1} (the test split); got {index}.")
    row, params = test[index], scores.params
    question = mcqa.questions_for(params["dataset"], params["n"], params["seed"], params["categories"])[row]
    best = scores.meta["best"]["qk_label"]
    n_options = len(question.options)
    return ExampleQuestion(index=index, question=question, head=(best["layer"], best["head"]),
                           qk=scores.raw["scores_qk_label"][row, best["layer"], best["head"], :n_options].tolist(),
                           letter_logits=scores.raw["letter_logits"][row, :n_options].tolist())


def selection_scores(scores: HeadScores) -> HeadScores:
    """The heads to ablate: accuracy over all scored questions (the check runs on other, fresh questions)."""
    return HeadScores(kind=scores.kind, model=scores.model, params={**scores.params, "rank_by": "all_qk_label"},
                      values=scores.raw["all_qk_label"].clone(), meta={"metric": "accuracy over all scored questions"})


def ablation_check(lab: Lab, scores: HeadScores, k: int = CHECK.ks[0], n_random: int = CHECK.n_random,
                   n: int | None = CHECK.n, method: str = CHECK.method, progress=None) -> AblationCurve:
    """The mcqa task (in the run's format) intact, with the top-k heads of `selection_scores` and `n_random` random
    k-head sets ablated: a stored curve whose `to_frame()`, `figure()` and `summary()` a view shows."""
    return ablation_curve(lab, selection_scores(scores), CHECK.task, ks=[k], method=method, n_random=n_random, n=n,
                          task_params={"chat": bool(scores.params["chat"])}, progress=progress)
