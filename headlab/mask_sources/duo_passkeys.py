"""Synthetic multi-passkey samples in a prose haystack: the training data of DuoAttention's gates.

As DuoAttention's `MultiplePasskeyRetrievalDataset` (mit-han-lab/duo-attention, `duo_attn/data.py`):
a book-like haystack (here the standard library's English prose, `headlab.datasets.needles`' "prose"
haystack) holds `num_passkeys` needles at sorted random depths in [0.05, 0.95],

    "Remember this sequence of words, it's the {first} passkey to the vault: " + passkey

each passkey `passkey_words` words of the NATO alphabet, and after the book every passkey is asked
for and answered in order:

    BOS "This is a very long story book: <book> " haystack-with-needles " </book>.\\n\\n"
    ("Based on the content of the book, what is the {first} passkey to the vault?\\nPasskey: " passkey "\\n\\n") x n

The distillation loss reads the final hidden states at the answer part only (`labels`), where the
model must reach back into the book. Context lengths are spread evenly over [context_min, context_max]
(`INTERVALS` of them, shuffled every epoch, as the reference's 50 intervals); here a sample's length is
its total length (the reference's counts the haystack only), so it can be checked against the model.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterator

import torch

from headlab.datasets import needles
from headlab.lab import Lab

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
         "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
         "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
            "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
            "twentieth")
NEEDLE = "Remember this sequence of words, it's the {ordinal} passkey to the vault: "
QUESTION = "Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey: "
OPENING, CLOSING, SEPARATOR = "This is a very long story book: <book> ", " </book>.\n\n", "\n\n"
DEPTHS = torch.linspace(0.05, 0.95, 1000).tolist()  # the reference's needle depth grid
INTERVALS = 50  # context lengths per epoch, as the reference's context_lengths_num_intervals


@dataclass
class PasskeySample:
    """One training prompt: `tokens` `[1, length]`, `labels` `[length]` bool (the answer part)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    passkeys: list[str]


class PasskeyPrompts:
    """Builds multi-passkey samples for one model's tokenizer."""

    def __init__(self, lab: Lab, num_passkeys: int, passkey_words: int, haystack: str = "prose") -> None:
        if not 1 <= num_passkeys <= len(ORDINALS):
            raise ValueError(f"num_passkeys must be between 1 and {len(ORDINALS)}, got {num_passkeys}.")
        self.lab, self.num_passkeys, self.passkey_words = lab, num_passkeys, passkey_words
        self.encode = lambda text: lab.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.haystack = self.encode(needles.haystack_text(haystack))
        self.bos = [lab.bos_token_id] if lab.bos_token_id is not None else []
        self.opening, self.closing, self.separator = self.encode(OPENING), self.encode(CLOSING), self.encode(SEPARATOR)
        self.needles = [self.encode(NEEDLE.format(ordinal=o)) for o in ORDINALS[:num_passkeys]]
        self.questions = [self.encode(QUESTION.format(ordinal=o)) for o in ORDINALS[:num_passkeys]]

    def overhead(self, passkey_tokens: list[int]) -> int:
        """Tokens that are not haystack, for passkeys of `passkey_tokens[i]` tokens each."""
        sep = len(self.separator)
        keys = sum(len(n) + len(q) + 2 * p + 3 * sep for n, q, p in zip(self.needles, self.questions, passkey_tokens))
        return len(self.bos) + len(self.opening) + len(self.closing) + keys

    def most_overhead(self) -> int:
        """The most non-haystack tokens a sample can need (every passkey word at its longest)."""
        longest = max(len(self.encode(" " + word)) for word in WORDS)
        return self.overhead([self.passkey_words * longest + 1] * self.num_passkeys)

    def sample(self, length: int, rng: random.Random) -> PasskeySample:
        """A prompt of exactly `length` tokens; `ValueError` when the passkeys leave no room for the haystack."""
        keys = [" ".join(rng.choice(WORDS) for _ in range(self.passkey_words)) for _ in range(self.num_passkeys)]
        key_ids = [self.encode(key) for key in keys]
        room = length - self.overhead([len(k) for k in key_ids])
        if room < 0:
            raise ValueError(f"{self.num_passkeys} passkeys of {self.passkey_words} words need {length - room} tokens, "
                             f"more than the {length} of this sample: lower num_passkeys or passkey_words, or raise context_min.")
        start = rng.randrange(len(self.haystack))
        hay = list(itertools.islice(itertools.cycle(self.haystack[start:] + self.haystack[:start]), room))
        book, last = [], 0
        for depth, needle, key in zip(sorted(rng.sample(DEPTHS, self.num_passkeys)), self.needles, key_ids):
            cut = int(room * depth)
            book += hay[last:cut] + self.separator + needle + key + self.separator
            last = cut
        prompt = self.bos + self.opening + book + hay[last:] + self.closing
        answers = list(itertools.chain.from_iterable(q + k + self.separator for q, k in zip(self.questions, key_ids)))
        labels = torch.zeros(length, dtype=torch.bool)
        labels[len(prompt):] = True
        return PasskeySample(torch.tensor([prompt + answers]), labels, keys)


def lengths(context_min: int, context_max: int) -> list[int]:
    """The context lengths of one epoch: `INTERVALS` evenly spread over [context_min, context_max] (fewer when the range is short)."""
    return sorted({int(x) for x in torch.linspace(context_min, context_max, INTERVALS).round().tolist()})


def sample_stream(prompts: PasskeyPrompts, context_min: int, context_max: int, seed: int) -> Iterator[PasskeySample]:
    """Endless samples: each epoch visits every length of `lengths` once, in a shuffled order (seeded)."""
    rng = random.Random(seed)
    grid = lengths(context_min, context_max)
    while True:
        for length in rng.sample(grid, len(grid)):
            yield prompts.sample(length, rng)
