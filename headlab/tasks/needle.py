"""Needle-in-a-haystack tasks: greedy answers to passkey and fact needles, scored by exact match.

`passkey` hides "The pass key is 71432. Remember it. 71432 is the pass key." and asks for the key;
`needle` hides a multi-token fact ("The best thing to do in San Francisco is eat a sandwich in
Dolores Park on a sunny day.") and asks for it. The metric is the fraction of exact answers. The
embedded 135M model answers the fact needle 94-100% of the time at 256-512 tokens and the pass key
67% (analyses/README.md), so `needle` is the task that shows best what retrieval heads do.
"""
from __future__ import annotations

import torch

from headlab.datasets import needles
from headlab.generation import answer_budget, answer_is_correct, greedy_generate
from headlab.tasks import Hook, Task, register


class _NeedleTask(Task):
    """Exact-match accuracy over `n` needles per (length, depth) cell."""

    shape = ""
    metric = "exact-match accuracy of the greedy answer"
    higher_is_better = True
    default_n = 1

    def __init__(self, lab, n=None, seed=0, haystack: str = "filler", lengths=(256,), depths=(0.1, 0.5, 0.9)):
        super().__init__(lab, n=n, seed=seed, haystack=haystack, lengths=list(lengths), depths=list(depths))
        # The task's own seed stream is offset so its needles differ from the retrieval scorer's defaults.
        self.samples = needles.needle_grid(lab, shape=self.shape, haystack=haystack, lengths=lengths, depths=depths, n=self.n, seed=10_000 + seed)
        self.reference = needles.needle_grid(lab, shape=self.shape, haystack=haystack, lengths=[min(lengths)], depths=depths, n=self.n, seed=20_000 + seed)

    def reference_tokens(self) -> torch.Tensor:
        """`[n_reference, min(lengths)]`: prompts of the same kind (other needles) for mean ablation."""
        return torch.cat([sample.tokens for sample in self.reference])

    def answers(self, hooks: list[Hook] | None = None) -> list[tuple[str, bool]]:
        """Each sample's generated text and whether it is right, with `hooks` active."""
        out = []
        for sample in self.samples:
            generated, _ = greedy_generate(self.lab, sample.tokens, answer_budget(self.lab, sample.needle.answer), hooks=hooks)
            out.append((self.lab.tokenizer.decode(generated), answer_is_correct(self.lab, generated, sample.needle.answer)))
        return out

    def details(self, hooks: list[Hook] | None = None) -> dict:
        """`value` (accuracy), `cells` `[len(lengths), len(depths)]` accuracy per (length, depth) cell, and
        `answers`, each sample's generated text and whether it is right, all with `hooks` active."""
        lengths, depths = self.params["lengths"], self.params["depths"]
        answers = self.answers(hooks)
        cells = torch.zeros(len(lengths), len(depths))
        for sample, (_, ok) in zip(self.samples, answers):
            cells[lengths.index(sample.context_len), depths.index(sample.depth)] += ok / self.n
        return {"value": sum(ok for _, ok in answers) / len(answers), "cells": cells, "answers": answers}

    def evaluate(self, hooks: list[Hook] | None = None) -> float:
        return self.details(hooks)["value"]


@register
class Passkey(_NeedleTask):
    """Retrieve a 5-digit pass key hidden in the haystack."""

    name = "passkey"
    shape = "passkey"


@register
class NeedleFact(_NeedleTask):
    """Retrieve a multi-token fact hidden in the haystack."""

    name = "needle"
    shape = "fact"
