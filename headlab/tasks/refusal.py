"""Refusal: how often the model declines held-out harmful requests (greedy answer, `is_refusal`).

Each request is put in the chat template; the model answers greedily for `max_new_tokens` tokens
under the ablation hooks (`headlab.generation.greedy_generate`, KV cache) and the answer
counts as a refusal when `headlab.datasets.requests.is_refusal` says so. Higher is better: ablating safety
heads should lower it. Mean ablation averages each head's output over the harmless held-out
requests in the same template (`reference_tokens`), so "mean" is the head's typical output on
benign chat, not on the very requests measured.
"""
from __future__ import annotations

import torch

from headlab.datasets import requests
from headlab.tasks import Hook, Task, register


@register
class RefusalTask(Task):
    """Fraction of harmful requests refused.

    Params:
        split: built-in harmful requests to use ("heldout", "train" or "all").
        prompts: a list of requests or a CSV/JSONL path (overrides split).
        max_new_tokens: greedy answer length judged by `is_refusal`.
    """

    name = "refusal"
    metric = "refusal rate on harmful requests (greedy answer, refusal phrases)"
    higher_is_better = True
    default_n = 12

    def __init__(self, lab, n=None, seed=0, split: str = "heldout", prompts: list[str] | str | None = None,
                 max_new_tokens: int = 12):
        from headlab.scorers.safety import chat_ids, choose_requests

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}.")
        super().__init__(lab, n=n, seed=seed, split=split, prompts=prompts, max_new_tokens=max_new_tokens)
        self.max_new_tokens = max_new_tokens
        self.prompts = choose_requests(prompts, self.n, seed, split)
        self.n = len(self.prompts)
        self.tokens = [torch.tensor([chat_ids(lab, p)]) for p in self.prompts]
        self._chat_ids = chat_ids

    def answers(self, hooks: list[Hook] | None = None, count: int | None = None) -> list[str]:
        """The greedy answer to every request (or the first `count`) with `hooks` active."""
        from headlab.generation import greedy_generate

        out = []
        for tokens in self.tokens[:count]:
            ids, _ = greedy_generate(self.lab, tokens, self.max_new_tokens, hooks=hooks)
            out.append(self.lab.tokenizer.decode(ids, skip_special_tokens=True))
        return out

    def details(self, hooks: list[Hook] | None = None) -> dict:
        """`value` = refusal rate; also each answer, whether it was refused, and the requests."""
        answers = self.answers(hooks)
        refused = [requests.is_refusal(a) for a in answers]
        rate = sum(refused) / len(refused)
        return {"value": rate, "refusal_rate": rate, "refused": refused, "answers": answers, "prompts": self.prompts}

    def evaluate(self, hooks: list[Hook] | None = None) -> float:
        return self.details(hooks)["value"]

    def reference_tokens(self) -> torch.Tensor:
        """The harmless held-out requests in the chat template, the most common length group `[batch, pos]`."""
        if "reference" not in self.memo:
            rows = [self._chat_ids(self.lab, p) for p in requests.harmless("heldout")]
            by_length: dict[int, list[list[int]]] = {}
            for ids in rows:
                by_length.setdefault(len(ids), []).append(ids)
            self.memo["reference"] = torch.tensor(max(by_length.values(), key=len))
        return self.memo["reference"]
