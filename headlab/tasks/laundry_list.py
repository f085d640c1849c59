"""Laundry List (Merullo et al. 2024, "Talking Heads"): recall the one list item not dealt with yet.

    Anna had a shopping list: eggs, rice and tea. At the store Anna bought the tea and the eggs.
    Anna forgot to buy the  ->  rice

The task generalises indirect-object identification from two names to `n_items` list items: the
model must copy an item from the list while inhibiting the ones already repeated. Accuracy falls
as the list grows (the paper's finding, and the embedded model's: see analyses/README.md).
Prompts are generated offline from the word lists below; every item and name is one token, so all
prompts of one `n_items` have the same length and run as one batch.
"""
from __future__ import annotations

import random

import torch

from headlab.tasks import Hook, NextTokenTask, register

ITEMS = (
    "apples bananas bread butter cheese eggs flour honey jam lemons milk onions pasta rice salt sugar tea coffee "
    "carrots potatoes tomatoes beans oranges grapes yogurt cereal lettuce garlic peppers chicken fish cookies juice "
    "soup nuts oil vinegar soap candles batteries towels sponges shampoo toothpaste pens pencils envelopes stamps "
    "glue tape paper folders"
).split()
NAMES = "Anna Tom Maria James David John Mary Peter Paul Mark Jane Alex Sam Ben Chris Jack Lily Max Rose Dan".split()


def _join(words: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def laundry_prompt(name: str, items: list[str], done: list[str]) -> str:
    """The prompt: the full list, the items already bought (`done`), then the cue for the missing one."""
    bought = _join([f"the {item}" for item in done])
    return f"{name} had a shopping list: {_join(items)}. At the store {name} bought {bought}. {name} forgot to buy the"


@register
class LaundryList(NextTokenTask):
    """Accuracy at naming the list item that was not bought, among the list's own items.

    Params:
        n_items: list length (2 or more); chance accuracy is `1 / n_items`.
        batch_size: prompts per forward pass.
    """

    name = "laundry_list"
    reference_offset = 30_000
    metric = "accuracy (the missing item ranks first among the list's items)"
    higher_is_better = True
    default_n = 32

    def __init__(self, lab, n=None, seed=0, n_items: int = 3, batch_size: int = 16):
        if n_items < 2:
            raise ValueError(f"A laundry list needs at least 2 items (one bought, one missing); got n_items={n_items}.")
        super().__init__(lab, n=n, seed=seed, n_items=n_items, batch_size=batch_size)
        self.n_items, self.batch_size = n_items, batch_size
        items, names = self._single_token(ITEMS, leading_space=True), self._single_token(NAMES, leading_space=False)
        if len(items) < n_items:
            raise ValueError(f"Only {len(items)} list items are single tokens for {lab.info.name}; n_items={n_items} is too many.")
        self.items, self.names = items, names
        self.prompts, self.tokens, self.candidates, self.targets = self._build(20_000 + seed)

    # --- inputs ----------------------------------------------------------------------------------

    def _token_id(self, text: str) -> list[int]:
        return self.lab.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _single_token(self, words: list[str], leading_space: bool) -> list[str]:
        """Words that are one token as a list item (' eggs') and, for names, also at the start ('Anna')."""
        keep = []
        for word in words:
            forms = [" " + word] + ([] if leading_space else [word])
            if all(len(self._token_id(form)) == 1 for form in forms):
                keep.append(word)
        return keep

    def _build(self, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """`n` prompts: texts, tokens `[n, pos]`, candidate ids `[n, n_items]`, target index `[n]`."""
        rng = random.Random(seed)
        prompts, rows, candidates, targets = [], [], [], []
        for _ in range(self.n):
            items = rng.sample(self.items, self.n_items)
            name, target = rng.choice(self.names), rng.randrange(self.n_items)
            done = [item for i, item in enumerate(items) if i != target]
            rng.shuffle(done)
            text = laundry_prompt(name, items, done)
            prompts.append(text)
            rows.append(self.lab.to_tokens(text)[0].cpu())
            candidates.append([self._token_id(" " + item)[0] for item in items])
            targets.append(target)
        lengths = {len(row) for row in rows}
        if len(lengths) != 1:  # every word is one token, so this would be a tokenizer surprise
            raise ValueError(f"Laundry-list prompts tokenized to different lengths {sorted(lengths)}.")
        return prompts, torch.stack(rows), torch.tensor(candidates), torch.tensor(targets)


    # --- measuring -------------------------------------------------------------------------------


    def details(self, hooks: list[Hook] | None = None) -> dict:
        """`value` = accuracy among the list's items; also full-vocabulary top-1 accuracy, mean logit margin, chance."""
        logits = self.final_logits(hooks)
        rows = torch.arange(len(logits))
        item_logits = logits.gather(1, self.candidates)  # [n, n_items]
        target_logit = item_logits[rows, self.targets]
        others = item_logits.clone()
        others[rows, self.targets] = float("-inf")
        accuracy = float((item_logits.argmax(1) == self.targets).float().mean())
        return {
            "value": accuracy,
            "accuracy": accuracy,
            "top1_accuracy": float((logits.argmax(1) == self.candidates[rows, self.targets]).float().mean()),
            "logit_margin": float((target_logit - others.max(1).values).mean()),
            "chance": 1.0 / self.n_items,
            "n": len(logits),
        }

    def evaluate(self, hooks: list[Hook] | None = None) -> float:
        return self.details(hooks)["value"]
