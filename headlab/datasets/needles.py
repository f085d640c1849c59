"""Needle-in-a-haystack prompts: a needle sentence at a depth in a haystack of a given token length, then a question.

Prompts are assembled from token ids (BOS, haystack[:cut], needle, haystack[cut:], question), so
every prompt of a context length has exactly that many tokens and the needle's token span is
known exactly. Haystacks: repeated filler sentences (the passkey papers' "The grass is green..."),
English prose (the standard library's documentation, `headlab.datasets.domains`), or a user's own text /
text file. Needles: a pass key ("The pass key is 71432. Remember it.") or a multi-token fact.
"""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from headlab.datasets import domains
from headlab.lab import Lab

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
HAYSTACKS = ("filler", "prose")
NEEDLE_SHAPES = ("passkey", "fact")
FACTS = (
    ("The best thing to do in San Francisco is eat a sandwich in Dolores Park on a sunny day.",
     "What is the best thing to do in San Francisco? The best thing to do in San Francisco is to",
     "eat a sandwich in Dolores Park"),
    ("The secret ingredient of the soup is smoked paprika from the old market.",
     "What is the secret ingredient of the soup? The secret ingredient of the soup is",
     "smoked paprika"),
    ("The name of the lighthouse keeper's cat is Captain Biscuit.",
     "What is the name of the lighthouse keeper's cat? The name of the lighthouse keeper's cat is",
     "Captain Biscuit"),
)


class NeedleError(ValueError):
    """A needle prompt cannot be built (needle too long for the context, empty haystack, ...)."""


@dataclass(frozen=True)
class Needle:
    """What to hide and how to ask for it: `answer` is what an exact-match check looks for."""

    text: str
    question: str
    answer: str


@dataclass
class NeedleSample:
    """One prompt. `tokens` `[1, context_len]`; the needle is `tokens[0, needle_start:needle_end]`."""

    tokens: torch.Tensor
    needle_start: int
    needle_end: int
    needle: Needle
    context_len: int
    depth: float

    @property
    def needle_length(self) -> int:
        return self.needle_end - self.needle_start


def passkey_needle(rng: random.Random) -> Needle:
    key = str(rng.randrange(10_000, 100_000))
    return Needle(f"The pass key is {key}. Remember it. {key} is the pass key.",
                  "What is the pass key? The pass key is", key)


def make_needle(shape: str, rng: random.Random) -> Needle:
    """A needle of `shape` ("passkey" or "fact"), drawn with `rng`."""
    if shape == "passkey":
        return passkey_needle(rng)
    if shape == "fact":
        return Needle(*rng.choice(FACTS))
    raise KeyError(f"Unknown needle shape '{shape}'. Known shapes: {', '.join(NEEDLE_SHAPES)}.")


def haystack_text(haystack: str) -> str:
    """The text of a named haystack ("filler", "prose"), or of a file at path `haystack`."""
    if haystack == "filler":
        return FILLER * 20
    if haystack == "prose":
        return domains.stdlib_prose()
    path = Path(haystack).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise NeedleError(f"Unknown haystack '{haystack}': use {', '.join(HAYSTACKS)} or the path of a text file.")


@functools.lru_cache(maxsize=16)
def _cached_ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _ids(lab: Lab, text: str) -> list[int]:
    return list(_cached_ids(lab.tokenizer, text))


def build_sample(lab: Lab, needle: Needle, haystack: str, context_len: int, depth: float, offset: int = 0) -> NeedleSample:
    """The prompt of exactly `context_len` tokens with `needle` at `depth` (0 = start, 1 = end of the haystack).

    `haystack` is the text itself (repeated as needed); `offset` picks where in it to start.
    Raises `NeedleError` for an empty haystack, a depth outside [0, 1], or a needle + question
    that leave no room in `context_len`; `PromptTooLongError` beyond the model's context.
    """
    if not 0.0 <= depth <= 1.0:
        raise NeedleError(f"depth must be between 0 and 1; got {depth}.")
    lab.check_length(context_len, "needle prompt")
    hay = _ids(lab, haystack)
    if not hay or not haystack.strip():
        raise NeedleError("The haystack is empty: give it some text to hide the needle in.")
    needle_ids = _ids(lab, " " + needle.text.strip() + " ")
    question_ids = _ids(lab, "\n\n" + needle.question)
    bos = [lab.bos_token_id] if lab.bos_token_id is not None else []
    room = context_len - len(bos) - len(needle_ids) - len(question_ids)
    if room < 0:
        raise NeedleError(
            f"The needle and question take {len(needle_ids) + len(question_ids)} tokens, more than the context of "
            f"{context_len} tokens: use a longer context or a shorter needle."
        )
    start = offset % len(hay)
    body = list(itertools.islice(itertools.cycle(hay[start:] + hay[:start]), room))
    cut = round(depth * room)
    ids = bos + body[:cut] + needle_ids + body[cut:] + question_ids
    needle_start = len(bos) + cut
    return NeedleSample(torch.tensor([ids]), needle_start, needle_start + len(needle_ids), needle, context_len, depth)


def needle_grid(
    lab: Lab, *, shape: str = "passkey", haystack: str = "filler", lengths=(256, 512), depths=(0.1, 0.5, 0.9),
    n: int = 1, seed: int = 0,
) -> list[NeedleSample]:
    """`n` samples per (length, depth) cell, needles and haystack offsets drawn from `seed`."""
    if n < 1 or not lengths or not depths:
        raise NeedleError("A needle grid needs n >= 1 and at least one length and one depth.")
    rng = random.Random(seed)
    text = haystack_text(haystack)
    n_tokens = max(1, len(_ids(lab, text)))
    samples = []
    for length, depth in itertools.product(lengths, depths):
        for _ in range(n):
            needle = make_needle(shape, rng)
            samples.append(build_sample(lab, needle, text, int(length), float(depth), offset=rng.randrange(n_tokens)))
    return samples
