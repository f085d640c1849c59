"""MCQA: the model's own answer to synthetic A/B/C/D category questions, for the ablation engine.

    Which of these is a fruit?  A. hammer  B. banana  C. France  D. red   ->  B

The metric is accuracy of the next-token logits restricted to the option letters (the larger of
'A' and ' A'). Questions come from `headlab.datasets.mcqa.synthetic_questions` with a seed offset, so they
are not the questions a `select_copy` run with the same seed chose its heads on. `details()` adds
the mean probability of the right letter among the letters, which moves even when the argmax does
not (useful on a small model that answers near chance).
"""
from __future__ import annotations

from functools import cached_property

import torch

from headlab.datasets import mcqa
from headlab.tasks import Hook, Task, register

QUESTION_SEED_OFFSET = 50_000
REFERENCE_SEED_OFFSET = 60_000


@register
class MCQA(Task):
    """Accuracy of the model's letter logits on synthetic multiple-choice questions.

    Params:
        chat: render with the chat template (else plain text ending with 'Answer:').
        categories: question categories (default: all of `headlab.datasets.mcqa.CATEGORIES`).
        batch_size: prompts per forward pass (prompts of one token length share a batch).
    """

    name = "mcqa"
    metric = "accuracy (the right option's letter has the highest logit among the letters)"
    higher_is_better = True
    default_n = 32

    def __init__(self, lab, n=None, seed=0, chat: bool = True, categories: list[str] | None = None, batch_size: int = 8):
        super().__init__(lab, n=n, seed=seed, chat=chat, categories=categories, batch_size=batch_size)
        self.chat, self.categories, self.batch_size = chat, categories, batch_size
        questions = mcqa.synthetic_questions(self.n, QUESTION_SEED_OFFSET + seed, categories)
        self.prompts = mcqa.build_prompts(lab, questions, chat=chat)
        self.answers = mcqa.answers_of(self.prompts)

    @cached_property
    def _reference(self) -> torch.Tensor:
        """Other questions of the same kind, cut to their shortest length so they stack `[n, pos]`."""
        questions = mcqa.synthetic_questions(self.n, REFERENCE_SEED_OFFSET + self.seed, self.categories)
        rows = [p.tokens for p in mcqa.build_prompts(self.lab, questions, chat=self.chat)]
        shortest = min(len(row) for row in rows)
        return torch.stack([row[:shortest] for row in rows])

    def reference_tokens(self) -> torch.Tensor:
        return self._reference

    def letter_logits(self, hooks: list[Hook] | None = None) -> torch.Tensor:
        """`[n, n_options]` letter logits with `hooks` active."""
        return mcqa.letter_logits(self.lab, self.prompts, hooks, self.batch_size)

    def details(self, hooks: list[Hook] | None = None) -> dict:
        """`value` = accuracy; also the mean probability of the right letter among the letters, predicted-letter counts, chance."""
        letters = self.letter_logits(hooks)
        probs = letters.softmax(-1)
        rows = torch.arange(len(letters))
        accuracy = float((letters.argmax(-1) == self.answers).float().mean())
        return {
            "value": accuracy,
            "accuracy": accuracy,
            "p_correct": float(probs[rows, self.answers].mean()),
            "predicted": torch.bincount(letters.argmax(-1), minlength=letters.shape[1]).tolist(),
            "chance": 1.0 / letters.shape[1],
            "n": len(letters),
        }

    def evaluate(self, hooks: list[Hook] | None = None) -> float:
        return self.details(hooks)["value"]
