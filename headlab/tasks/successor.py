"""Successor continuation: the behaviour successor heads serve (Gould et al. 2023).

    <BOS>List: Monday, Tuesday, Wednesday,  ->  Thursday

Prompts are `context` consecutive items of an ordinal list (`headlab.datasets.ordinals`, single-token
items only), each followed by a comma, after a fixed "List:" prefix so that every item carries
its leading space. The metric is accuracy **among the list's own items**: a hit when the true
next item has the highest logit of all the list's items (chance `1 / items`, ~0.08 averaged over
the lists). `details()` also gives plain greedy accuracy over the whole vocabulary.
"""
from __future__ import annotations

import random

import torch

from headlab.datasets import ordinals
from headlab.tasks import Hook, NextTokenTask, register

PREFIX = "List:"


def successor_prompt(items: list[str]) -> str:
    """'List: Monday, Tuesday, Wednesday,' for items ['Monday', 'Tuesday', 'Wednesday']."""
    return PREFIX + "".join(f" {item}," for item in items)


@register
class SuccessorTask(NextTokenTask):
    """Accuracy at continuing an ordinal list with its next item, among the list's items.

    Params:
        context: items shown before the one to predict (1 or more).
        tasks: ordinal sequences to draw from (None = every one the tokenizer keeps).
        batch_size: prompts per forward pass.
    """

    name = "successor"
    reference_offset = 50_000
    metric = "accuracy (the next item ranks first among the list's items)"
    higher_is_better = True
    default_n = 64

    def __init__(self, lab, n=None, seed=0, context: int = 3, tasks: list[str] | None = None, batch_size: int = 32):
        if context < 1:
            raise ValueError(f"A successor prompt needs at least one item before the answer; got context={context}.")
        super().__init__(lab, n=n, seed=seed, context=context, tasks=tasks, batch_size=batch_size)
        self.context, self.batch_size = context, batch_size
        all_tasks, self.dropped = ordinals.ordinal_tasks(lab.tokenizer, tasks)
        # A list is usable when it has a chain of context + 1 consecutive items.
        self.ordinal_tasks = [t for t in all_tasks if t.runs(context + 1)]
        if not self.ordinal_tasks:
            raise ValueError(f"No ordinal list of {lab.info.name} has {context + 1} consecutive single-token items.")
        self.prompts, self.tokens, self.candidates, self.targets, self.task_index = self._build(40_000 + seed)

    def _build(self, seed: int):
        """`n` prompts: texts, tokens `[n, pos]`, the list's item ids per prompt, target index, list index."""
        rng = random.Random(seed)
        prompts, rows, candidates, targets, task_index = [], [], [], [], []
        for i in range(self.n):
            t = i % len(self.ordinal_tasks)  # lists in turn, so each is measured
            task = self.ordinal_tasks[t]
            chain = rng.choice(task.runs(self.context + 1))
            text = successor_prompt([task.items[j] for j in chain[:-1]])
            prompts.append(text)
            rows.append(self.lab.to_tokens(text)[0].cpu())
            candidates.append(task.token_ids)
            targets.append(chain[-1])
            task_index.append(t)
        lengths = {len(row) for row in rows}
        if len(lengths) != 1:  # every item is one token and so is ", ": a tokenizer surprise
            raise ValueError(f"Successor prompts tokenized to different lengths {sorted(lengths)}.")
        return prompts, torch.stack(rows), candidates, torch.tensor(targets), torch.tensor(task_index)



    def details(self, hooks: list[Hook] | None = None) -> dict:
        """`value` = accuracy among the list's items; also per list, greedy top-1 accuracy, chance."""
        logits = self.final_logits(hooks)
        hits, top1 = [], []
        for row, (ids, target) in enumerate(zip(self.candidates, self.targets.tolist())):
            hits.append(float(int(logits[row, ids].argmax()) == target))
            top1.append(float(int(logits[row].argmax()) == ids[target]))
        hits_t, top1_t = torch.tensor(hits), torch.tensor(top1)
        per_task = {task.name: float(hits_t[self.task_index == t].mean()) for t, task in enumerate(self.ordinal_tasks)
                    if (self.task_index == t).any()}
        chance = float(torch.tensor([1.0 / len(self.candidates[i]) for i in range(len(hits))]).mean())
        accuracy = float(hits_t.mean())
        return {"value": accuracy, "accuracy": accuracy, "top1_accuracy": float(top1_t.mean()), "per_task": per_task,
                "chance": chance, "n": len(hits)}

    def evaluate(self, hooks: list[Hook] | None = None) -> float:
        return self.details(hooks)["value"]
