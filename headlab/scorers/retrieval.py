"""Retrieval heads (Wu et al. 2024): heads that copy the needle token by token while the model answers.

During greedy decoding, at every generated token `w`, for every head take the argmax key of the
newest query's attention; if that key lies inside the needle span and the prompt token there is
`w`, the head gets `1 / needle_length` for this sample. A head's score is the mean over samples
(lengths x depths x needles). The default needle is the multi-token fact: the embedded 135M
model retrieves it 94-100% of the time at 256-512 tokens, the pass key 67%. Heads above 0.1 are
retrieval heads. The model's own exact-match
accuracy is reported beside the scores (`meta["accuracy"]`): only copying steps can count, so a
model that answers wrong scores little.

Generation runs through `headlab.longpass.generate`: the prompt is prefilled in chunks through SDPA with
the KV cache (no attention pattern at all), then each query that produces a token runs as one cached step
whose attention row `[head, k]` is recomputed and reduced at once to its argmax per head; memory grows
linearly with the context (the KV cache), not with its square.

Views of a retrieval run: `retrieval_summary(scores)`, `needle_accuracy(lab, scores, k)` (the needle
task's accuracy per length x depth cell, intact vs the top-k heads ablated, as a `NeedleAccuracy` with
`figure()` and `to_frame()`) and `retrieval_curve(lab, scores, ks)` (top-k vs random-k on the needle
task, with the defaults `RETRIEVAL_CURVE` written once here).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from headlab.ablation.curve import DEFAULTS, AblationCurve, Progress, ablation_curve
from headlab.ablation.engine import ablation_hooks
from headlab.datasets import needles
from headlab.activations import layer_names
from headlab.generation import answer_budget, answer_is_correct
from headlab.heads import Head, format_heads
from headlab.lab import Lab
from headlab.longpass import generate, pass_bytes
from headlab.scorers import Scorer
from headlab.scores import HeadScores

RETRIEVAL_THRESHOLD = 0.1
TASK_OF_NEEDLE = {"fact": "needle", "passkey": "passkey"}  # the task that asks for each needle shape
ABLATE_K = 10  # heads ablated by default: about the number scoring above the threshold on the embedded model


def curve_ks(k: int) -> list[int]:
    """The ks of a retrieval curve up to `k`: a quarter, half and all of it (10 -> [2, 5, 10])."""
    return sorted({max(1, k // 4), max(1, k // 2), k})


# The needle task's top-k vs random-k curve: 2 needles per depth at the run's shortest length (6 prompts
# of 256 tokens at the defaults); random sets and method as every curve.
RETRIEVAL_CURVE = replace(DEFAULTS, task=TASK_OF_NEEDLE["fact"], ks=tuple(curve_ks(ABLATE_K)), n=2)


def copy_hits(attention: torch.Tensor, prompt_ids: torch.Tensor, generated_id: int, needle_start: int, needle_end: int) -> torch.Tensor:
    """Which heads copy `generated_id` from the needle at this step.

    Args:
        attention: `[layer, head, k]` the newest query's attention (k may exceed the prompt).
        prompt_ids: `[pos]` the prompt's token ids.
    Returns:
        `[layer, head]` bool: the argmax key is in `[needle_start, needle_end)` and holds `generated_id`.
    """
    return needle_copies(attention.argmax(-1), prompt_ids, generated_id, needle_start, needle_end)


def needle_copies(top: torch.Tensor, prompt_ids: torch.Tensor, generated_id: int, needle_start: int, needle_end: int) -> torch.Tensor:
    """`copy_hits` from the argmax keys `top` `[layer, head]`: in `[needle_start, needle_end)` and holding `generated_id`."""
    top = top.to(prompt_ids.device)  # rows read on the GPU, prompt ids on the CPU
    in_needle = (top >= needle_start) & (top < needle_end)
    token_there = prompt_ids[top.clamp(max=len(prompt_ids) - 1)]
    return in_needle & (token_there == generated_id)


def sample_retrieval_score(attention: list[torch.Tensor], prompt_ids: torch.Tensor, generated: list[int], needle_start: int, needle_end: int) -> torch.Tensor:
    """`[layer, head]`: the sum over generated tokens of `copy_hits / needle_length` for one sample.

    `attention`: per generated token, `[layer, head, k]` rows or already their argmax keys `[layer, head]`."""
    total = torch.zeros(attention[0].shape[:2])
    for step_attention, token in zip(attention, generated):
        top = step_attention.argmax(-1) if step_attention.ndim == 3 else step_attention
        total += needle_copies(top, prompt_ids, token, needle_start, needle_end).float()
    return total / (needle_end - needle_start)


def _newest_argmax(pattern: torch.Tensor) -> torch.Tensor:
    """`[1, head, 1, k]` the newest query's row -> `[head]` its argmax key, on the CPU."""
    return pattern[0, :, -1].argmax(-1).cpu()


def copying_generation(lab: Lab, tokens: torch.Tensor, max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy answer to `tokens` `[1, pos]` and, per generated token, every head's argmax key `[layer, head]`."""
    names = layer_names(lab, "pattern")
    generated, kept = generate(lab, tokens, max_new_tokens, read=(names, _newest_argmax))
    return generated, [torch.stack([step[name] for name in names]) for step in kept]


def topk_jaccard(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Jaccard overlap of the top-`k` heads of two `[layer, head]` score tensors."""
    top_a = set(torch.argsort(a.flatten(), descending=True, stable=True)[:k].tolist())
    top_b = set(torch.argsort(b.flatten(), descending=True, stable=True)[:k].tolist())
    return len(top_a & top_b) / len(top_a | top_b)


def _stability(per_sample: torch.Tensor, group: list, k: int) -> dict[str, float]:
    """Top-`k` Jaccard between the mean scores of every pair of groups (e.g. context lengths)."""
    means = {g: per_sample[[i for i, x in enumerate(group) if x == g]].mean(0) for g in dict.fromkeys(group)}
    return {f"{a} vs {b}": round(topk_jaccard(means[a], means[b], k), 3) for a, b in itertools.combinations(means, 2)}


@dataclass(frozen=True)
class Retrieval(Scorer):
    """Retrieval score of every head over `n` needles per (length, depth) cell.

    Cost: one greedy generation per needle, n x len(lengths) x len(depths) of them: a chunked SDPA prefill of
    `length` tokens plus a few cached steps whose attention rows are recomputed. Time grows with
    weights x length (the matmuls) + layers x heads x d_head x length^2 (attention); memory, linearly: the KV cache
    of the longest length (2 x layers x kv_heads x d_head x length elements) plus one chunk's activations
    (`longpass.pass_bytes`), independent of the number of samples. Refused up front when that exceeds free memory.
    """

    kind = "retrieval"
    n: int = 3
    seed: int = 0
    needle: str = "fact"
    haystack: str = "filler"
    lengths: tuple[int, ...] = (256, 512)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    stability_k: int = 10

    def __post_init__(self):
        if int(self.n) < 1 or not self.lengths or not self.depths:
            raise ValueError(f"retrieval needs n >= 1 and at least one length and depth; got n={self.n}, "
                             f"lengths={list(self.lengths)}, depths={list(self.depths)}.")

    def compute(self, lab: Lab) -> HeadScores:
        longest = max(int(length) for length in self.lengths)
        lab.check_length(longest, "longest retrieval prompt")
        lab.require_memory(pass_bytes(lab, longest, reads_pattern=True), f"retrieval at {longest} tokens",
                           "use shorter lengths")
        samples = needles.needle_grid(lab, shape=self.needle, haystack=self.haystack, lengths=self.lengths,
                                      depths=self.depths, n=self.n, seed=self.seed)
        per_sample, correct, answers = [], [], []
        for sample in samples:
            generated, attention = copying_generation(lab, sample.tokens, answer_budget(lab, sample.needle.answer))
            per_sample.append(sample_retrieval_score(attention, sample.tokens[0].cpu(), generated, sample.needle_start, sample.needle_end))
            correct.append(answer_is_correct(lab, generated, sample.needle.answer))
            answers.append(lab.tokenizer.decode(generated))
        per_sample = torch.stack(per_sample)
        values = per_sample.mean(0)
        raw = {"per_sample": per_sample, "correct": torch.tensor(correct, dtype=torch.float32),
               "lengths": torch.tensor([s.context_len for s in samples]), "depths": torch.tensor([s.depth for s in samples])}
        return self.result(lab, values, raw, meta={
            "metric": "copy-paste rate from the needle during greedy decoding (Wu et al. 2024)",
            "accuracy": sum(correct) / len(correct),
            "n_samples": len(samples),
            "fraction_above_threshold": float((values > RETRIEVAL_THRESHOLD).float().mean()),
            "threshold": RETRIEVAL_THRESHOLD,
            "stability_across_lengths": _stability(per_sample, [s.context_len for s in samples], self.stability_k),
            "answers": answers,
        })


def retrieval_heads(scores: HeadScores, threshold: float = RETRIEVAL_THRESHOLD) -> list[Head]:
    """The heads scoring above `threshold`, best first."""
    return [(layer, head) for layer, head, value in scores.top(scores.values.numel()) if value > threshold]


def retrieval_summary(scores: HeadScores) -> str:
    """One Markdown sentence: the run's needle and haystack, the model's accuracy, how many heads retrieve, stability."""
    meta = scores.meta
    stability = ", ".join(f"{pair}: {value}" for pair, value in meta["stability_across_lengths"].items()) or "one length"
    return (
        f"**{scores.params['needle']}** needles in **{scores.params['haystack']}**, {meta['n_samples']} prompts: "
        f"model accuracy **{meta['accuracy']:.0%}**; {meta['fraction_above_threshold']:.1%} of heads score above "
        f"{meta['threshold']}; top-{scores.params['stability_k']} Jaccard across lengths — {stability}."
    )


def needle_task_params(scores: HeadScores, shortest: bool = False) -> dict:
    """The needle task's `haystack`, `lengths`, `depths` of a retrieval run (`shortest`: its shortest length only)."""
    lengths = list(scores.params["lengths"])
    return {"haystack": scores.params["haystack"], "lengths": [min(lengths)] if shortest else lengths,
            "depths": list(scores.params["depths"])}


@dataclass
class NeedleAccuracy:
    """Needle-task accuracy per (length, depth) cell, intact and with the top-k retrieval heads ablated.

    `intact`, `ablated`: `[len(lengths), len(depths)]` fractions of exact answers.
    """

    model: str
    task: str
    method: str
    heads: list[Head]
    lengths: list[int]
    depths: list[float]
    intact: torch.Tensor
    ablated: torch.Tensor

    def to_frame(self):
        """One row per (length, depth) cell: accuracy intact and ablated."""
        import pandas as pd

        rows = [{"length": length, "depth": depth, "intact": round(float(self.intact[i, j]), 4),
                 "ablated": round(float(self.ablated[i, j]), 4)}
                for i, length in enumerate(self.lengths) for j, depth in enumerate(self.depths)]
        return pd.DataFrame(rows, columns=["length", "depth", "intact", "ablated"])

    def summary(self) -> str:
        return (f"**{self.task}** accuracy on {self.model}: intact **{float(self.intact.mean()):.0%}**, with "
                f"{len(self.heads)} retrieval heads {self.method}-ablated **{float(self.ablated.mean()):.0%}** "
                f"({format_heads(self.heads)}).")

    def figure(self):
        """Plotly: two length x depth heatmaps side by side, intact and ablated."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=["intact", f"top-{len(self.heads)} retrieval heads ablated"])
        for col, grid in enumerate((self.intact, self.ablated), 1):
            fig.add_trace(go.Heatmap(
                z=grid.numpy(), x=[str(d) for d in self.depths], y=[str(n) for n in self.lengths], zmin=0, zmax=1,
                colorscale="RdYlGn", showscale=col == 2,
                hovertemplate="length %{y}, depth %{x}<br>accuracy %{z:.2f}<extra></extra>",
            ), row=1, col=col)
            fig.update_xaxes(title_text="needle depth", type="category", row=1, col=col)
            fig.update_yaxes(title_text="context length", type="category", row=1, col=col)
        fig.update_layout(height=360, margin={"l": 60, "r": 20, "t": 50, "b": 50})
        return fig


def needle_accuracy(lab: Lab, scores: HeadScores, k: int = ABLATE_K, method: str = DEFAULTS.method) -> NeedleAccuracy:
    """The needle task of `scores`' needle, haystack, lengths and depths (one new needle per cell), intact and
    with the top-`k` heads of `scores` ablated by `method`."""
    from headlab.tasks import make_task

    task = make_task(TASK_OF_NEEDLE[scores.params["needle"]], lab, n=1, **needle_task_params(scores))
    heads = scores.top_heads(k)
    intact, ablated = task.details()["cells"], task.details(ablation_hooks(lab, heads, method, task))["cells"]
    params = needle_task_params(scores)
    return NeedleAccuracy(model=lab.info.name, task=task.name, method=str(method), heads=heads, lengths=params["lengths"],
                          depths=params["depths"], intact=intact, ablated=ablated)


def retrieval_curve(
    lab: Lab, scores: HeadScores, ks=RETRIEVAL_CURVE.ks, *, method: str = RETRIEVAL_CURVE.method,
    n_random: int = RETRIEVAL_CURVE.n_random, n: int = RETRIEVAL_CURVE.n, recompute: bool = False,
    progress: Progress | None = None,
) -> AblationCurve:
    """Top-k retrieval heads vs random k-head sets on the task of `scores`' needle, at its shortest length
    (read from the store when there)."""
    return ablation_curve(lab, scores, TASK_OF_NEEDLE[scores.params["needle"]], ks, method=method, n_random=n_random,
                          n=n, task_params=needle_task_params(scores, shortest=True), recompute=recompute,
                          progress=progress)
