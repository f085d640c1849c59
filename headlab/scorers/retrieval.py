"""Retrieval heads (Wu et al. 2024): heads that copy the needle token by token while the model answers.

During greedy decoding, at every generated token `w`, for every head take the argmax key of the
newest query's attention; if that key lies inside the needle span and the prompt token there is
`w`, the head gets `1 / needle_length` for this sample. A head's score is the mean over samples
(lengths x depths x needles). The default needle is the multi-token fact: the embedded 135M
model retrieves it 94-100% of the time at 256-512 tokens, the pass key 67%. Heads above 0.1 are
retrieval heads. The model's own exact-match
accuracy is reported beside the scores (`meta["accuracy"]`): only copying steps can count, so a
model that answers wrong scores little.

Generation (`headlab.generation.greedy_generate`) runs under the bridge's hooks with the KV cache,
keeping only the newest query's attention row at each step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from headlab.datasets import needles
from headlab.generation import answer_budget, answer_is_correct, greedy_generate
from headlab.heads import Head
from headlab.lab import Lab
from headlab.scorers import Scorer
from headlab.scores import HeadScores

RETRIEVAL_THRESHOLD = 0.1


def copy_hits(attention: torch.Tensor, prompt_ids: torch.Tensor, generated_id: int, needle_start: int, needle_end: int) -> torch.Tensor:
    """Which heads copy `generated_id` from the needle at this step.

    Args:
        attention: `[layer, head, k]` the newest query's attention (k may exceed the prompt).
        prompt_ids: `[pos]` the prompt's token ids.
    Returns:
        `[layer, head]` bool: the argmax key is in `[needle_start, needle_end)` and holds `generated_id`.
    """
    top = attention.argmax(-1)  # [layer, head]
    in_needle = (top >= needle_start) & (top < needle_end)
    token_there = prompt_ids[top.clamp(max=len(prompt_ids) - 1)]
    return in_needle & (token_there == generated_id)


def sample_retrieval_score(attention: list[torch.Tensor], prompt_ids: torch.Tensor, generated: list[int], needle_start: int, needle_end: int) -> torch.Tensor:
    """`[layer, head]`: the sum over generated tokens of `copy_hits / needle_length` for one sample."""
    total = torch.zeros(attention[0].shape[:2])
    for step_attention, token in zip(attention, generated):
        total += copy_hits(step_attention, prompt_ids, token, needle_start, needle_end).float()
    return total / (needle_end - needle_start)


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

    Cost: one greedy generation per needle (a prefill of `length` tokens plus a few cached steps), keeping
    the newest query's attention row: time grows with n x cells x model size x length, memory with one
    eager prefill's `[head, length, length]` pattern per layer (quadratic in length).
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
        samples = needles.needle_grid(lab, shape=self.needle, haystack=self.haystack, lengths=self.lengths,
                                      depths=self.depths, n=self.n, seed=self.seed)
        per_sample, correct, answers = [], [], []
        for sample in samples:
            generated, attention = greedy_generate(lab, sample.tokens, answer_budget(lab, sample.needle.answer), keep_attention=True)
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
