"""A RULER-style long-context suite built offline: needles (single, multi-key, multi-value), variable
tracking and common-words extraction, at any length up to the model's context, seeded, scored as RULER scores.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?",
github.com/NVIDIA/RULER) tests what a model can retrieve and aggregate from a long context with synthetic
tasks whose answers are known exactly. This module rebuilds five of them the way RULER's own generators do
(`scripts/data/synthetic/niah.py`, `variable_tracking.py`, `common_words_extraction.py`; templates and answer
prefixes of `scripts/data/synthetic/constants.py`; task settings of `scripts/synthetic.yaml`):

- `niah_single` (RULER `niah_single_2`): one needle "One of the special magic numbers for {key} is: {value}."
  (key: two words, value: a 7-digit number) in a prose haystack; the question names the key.
- `niah_multikey` (`niah_multikey_1`): four needles with different keys, one is asked for.
- `niah_multivalue` (`niah_multivalue`): four needles with the same key; all four values are asked for.
- `variable_tracking` (`vt`): one chain of 4 hops, "VAR ABCDE = 48213", "VAR FGHIJ = VAR ABCDE", ...,
  scattered through the haystack, after one short worked example; every variable holding the value is asked for.
- `common_words` (`cwe`): a numbered list of words, 10 of them repeated far more often (6 vs 1 below 4096
  tokens, 30 vs 3 from 4096 on, as RULER), after one worked example; the 10 most common are asked for.

Differences from RULER, all because the suite must build offline and land exactly inside a context length:
the haystack is English prose from the Python standard library's documentation (`headlab.datasets.domains`)
or any `needles.haystack_text` haystack instead of Paul Graham's essays; keys and words come from that
prose's own vocabulary instead of the `wonderwords` lists; the haystack size is found by RULER's binary search
on token counts, per sample, so that prompt + `max_new_tokens` <= the length asked for.

Scoring is RULER's: the prediction is stripped of control characters (`postprocess_pred`), then
`string_match_all` (`scripts/eval/synthetic/constants.py`) gives each sample the fraction of its reference
answers found in the prediction, case-insensitively; a sample's score is in [0, 1] and a task's accuracy is
the mean. Sample `i` of `(task, length, seed)` is drawn from its own generator, so it is the same whatever
`n` is asked for.
"""
from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import dataclass
from typing import Callable

import torch

from headlab.datasets import needles
from headlab.lab import Lab

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER: np.linspace(0, 100, 40), rounded
ANSWER_SLACK = 4  # new tokens beyond the ideal answer's length: room for a space, a comma, a full stop
FEW_SHOT_FILLER = 8  # haystack sentences in variable tracking's worked example (RULER's is ~500 tokens)

NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


class RulerError(ValueError):
    """A suite sample cannot be built (unknown task, a length too short for the task's question)."""


@dataclass(frozen=True)
class RulerSample:
    """One prompt and its reference answers.

    `tokens` `[1, pos]` (BOS first when the model has one) end with RULER's answer prefix, so greedy decoding
    continues with the answer; `pos + max_new_tokens <= context_len`.
    """

    task: str
    tokens: torch.Tensor
    answers: tuple[str, ...]
    context_len: int
    max_new_tokens: int
    index: int
    seed: int

    def score(self, prediction: str) -> float:
        """RULER's `string_match_all` of `prediction` against this sample's answers, in [0, 1]."""
        return string_match_all(prediction, self.answers)


# --- RULER's scoring ------------------------------------------------------------------------------------

def postprocess(prediction: str) -> str:
    """RULER's `postprocess_pred`: strip, and turn control characters into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers) -> float:
    """The share of `answers` found (case-insensitive substring) in the post-processed `prediction`."""
    if not answers:
        raise RulerError("A RULER sample needs at least one reference answer.")
    pred = postprocess(prediction).lower()
    return sum(answer.lower() in pred for answer in answers) / len(answers)


def string_match_part(prediction: str, answers) -> float:
    """RULER's QA metric: 1.0 when any of `answers` is found in the post-processed `prediction`."""
    pred = postprocess(prediction).lower()
    return float(any(answer.lower() in pred for answer in answers))


# --- offline vocabulary and haystack --------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct lower-case alphabetic words of 4-10 letters from the stdlib prose, sorted (keys and list words)."""
    from headlab.datasets import domains

    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", domains.stdlib_prose()))))


@functools.lru_cache(maxsize=8)
def haystack_sentences(haystack: str) -> tuple[str, ...]:
    """The haystack (`needles.haystack_text`: "prose", "filler" or a text file) as sentences, one line each."""
    text = " ".join(needles.haystack_text(haystack).split())
    sentences = tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if len(s) > 1 and ">>>" not in s)
    if not sentences:
        raise RulerError(f"The haystack {haystack!r} has no sentences to hide needles in.")
    return sentences


def _key(rng: random.Random) -> str:
    words = vocabulary()
    return f"{rng.choice(words)}-{rng.choice(words)}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))


def _insert(body: list[str], items: list[str], depths: list[int]) -> list[str]:
    """`items` inserted among the sentences `body` at `depths` percent (RULER's sentence-level insertion)."""
    at = sorted(int(len(body) * d / 100) for d in depths)
    out, last = [], 0
    for position, item in zip(at, items):
        out += body[last:position] + [item]
        last = position
    return out + body[last:]


# --- the tasks: each returns `build(size) -> prompt text`, the answers, the ideal answer text and the largest
# size it can build (None: any, the haystack cycles) ------------------------------------------------------------

Builder = Callable[[int], str]
Built = tuple[Builder, list[str], str, int | None]


def _haystack(rng: random.Random, haystack: str) -> Callable[[int], list[str]]:
    """`size -> size` consecutive haystack sentences from a random start (cycling)."""
    sentences = haystack_sentences(haystack)
    start = rng.randrange(len(sentences))
    return lambda size: [sentences[(start + i) % len(sentences)] for i in range(size)]


def _niah(rng: random.Random, haystack: str, num_k: int, num_v: int) -> Built:
    keys = [_key(rng) for _ in range(num_k)]
    values = [[_number(rng) for _ in range(num_v)] for _ in keys]
    needles_ = [NIAH_NEEDLE.format(key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles_)
    depths = rng.sample(DEPTHS, len(needles_))
    asked = rng.randrange(num_k)
    query, answers = keys[asked], values[asked]
    template, prefix, type_v = NIAH_TEMPLATE + NIAH_PREFIX, "", "numbers"
    if num_v == 1:  # RULER's singular wording for one answer
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        type_v = "number"
    sentences = _haystack(rng, haystack)

    def build(size: int) -> str:
        return template.format(type_v=type_v, query=query, context=" ".join(_insert(sentences(size), needles_, depths)))

    return build, answers, " " + ", ".join(answers) + ".", None


def _chain(rng: random.Random, hops: int, value: str) -> tuple[list[str], list[str]]:
    """One variable chain: `hops + 1` distinct 5-letter names and its statements, first `= value`."""
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, statements


def _variable_tracking(rng: random.Random, haystack: str, hops: int = 4) -> Built:
    example_names, example_chain = _chain(rng, hops, str(rng.randint(10000, 99999)))
    example_filler = _haystack(rng, haystack)(FEW_SHOT_FILLER)
    example_value = example_chain[0].split("= ")[1]
    example = (VT_TEMPLATE + VT_PREFIX).format(
        context=" ".join(_insert(example_filler, [s + "." for s in example_chain], sorted(rng.sample(DEPTHS, hops + 1)))),
        query=example_value, num_v=hops + 1) + " ".join(example_names)
    value = str(rng.randint(10000, 99999))
    names, chain = _chain(rng, hops, value)
    depths = sorted(rng.sample(DEPTHS, hops + 1))  # the chain keeps its order, as RULER's noise haystack
    sentences = _haystack(rng, haystack)

    def build(size: int) -> str:
        context = " ".join(_insert(sentences(size), [s + "." for s in chain], depths))
        return example + "\n" + (VT_TEMPLATE + VT_PREFIX).format(context=context, query=value, num_v=hops + 1)

    return build, names, " " + " ".join(names), None


def _word_list(rng: random.Random, words: list[str], common_repeats: int, uncommon_repeats: int, n_common: int = 10) -> str:
    """RULER's `get_example`: `words[:n_common]` repeated `common_repeats` times, the rest `uncommon_repeats` times,
    shuffled and numbered "1. w 2. w ..."."""
    listed = words[:n_common] * common_repeats + words[n_common:] * uncommon_repeats
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed))


def _numbered(words: list[str]) -> str:
    return " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _common_words(rng: random.Random, haystack: str, length: int) -> Built:
    """Below 4096 tokens RULER repeats the common words 6 times (1 for the others), else 30 (3); the worked
    example has 20 words (3 vs 1), else 40 (10 vs 3)."""
    short = length < 4096
    shot = rng.sample(vocabulary(), 20 if short else 40)
    shot_text = _word_list(rng, shot, 3 if short else 10, 1 if short else 3)
    example = (CWE_TEMPLATE + CWE_PREFIX).format(context=shot_text) + _numbered(shot[:10])
    words = list(vocabulary())
    rng.shuffle(words)  # the list of any size is a prefix of this order: the 10 common words never change
    repeats = (6, 1) if short else (30, 3)
    order_seed = rng.random()

    def build(size: int) -> str:
        text = _word_list(random.Random(order_seed), words[:10 + size], *repeats)
        return example + "\n" + (CWE_TEMPLATE + CWE_PREFIX).format(context=text)

    return build, words[:10], _numbered(words[:10]), len(words) - 10


def _task(task: str, rng: random.Random, haystack: str, length: int) -> Built:
    if task == "niah_single":
        return _niah(rng, haystack, 1, 1)
    if task == "niah_multikey":
        return _niah(rng, haystack, 4, 1)
    if task == "niah_multivalue":
        return _niah(rng, haystack, 1, 4)
    if task == "variable_tracking":
        return _variable_tracking(rng, haystack)
    if task == "common_words":
        return _common_words(rng, haystack, length)
    raise RulerError(f"Unknown RULER task {task!r}. Known tasks: {', '.join(TASKS)}.")


# --- fitting a prompt into a length ---------------------------------------------------------------------

def _largest_fit(count: Callable[[int], int], budget: int, cap: int | None) -> int:
    """The largest size in [0, cap] whose token `count` is <= `budget` (count grows with size): RULER's search,
    doubling from 16 then bisecting; -1 when even size 0 does not fit."""
    if count(0) > budget:
        return -1
    low, high = 0, 16
    while count(high) <= budget:
        if cap is not None and high >= cap:
            return cap
        low, high = high, high * 2 if cap is None else min(high * 2, cap)
    while low < high - 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) <= budget else (low, mid)
    return low


def make_sample(lab: Lab, task: str, length: int, index: int, seed: int = 0, haystack: str = "prose") -> RulerSample:
    """Sample `index` of `task` at `length` tokens (prompt + `max_new_tokens`), drawn from `(task, length, seed, index)`."""
    lab.check_length(length, f"{task} sample")
    rng = random.Random(f"ruler/{task}/{length}/{seed}/{index}")
    build, answers, ideal, cap = _task(task, rng, haystack, length)
    bos = [lab.bos_token_id] if lab.bos_token_id is not None else []

    def ids(size: int) -> list[int]:
        return bos + lab.tokenizer(build(size), add_special_tokens=False)["input_ids"]

    new_tokens = len(lab.tokenizer(ideal, add_special_tokens=False)["input_ids"]) + ANSWER_SLACK
    budget = length - new_tokens
    size = _largest_fit(lambda s: len(ids(s)), budget, cap)
    if size < 0:
        raise RulerError(f"{task} needs more than {length} tokens for its question and answer: use a longer length.")
    return RulerSample(task, torch.tensor([ids(size)]), tuple(answers), int(length), new_tokens, int(index), int(seed))


def make_samples(lab: Lab, task: str, length: int, n: int, seed: int = 0, haystack: str = "prose") -> list[RulerSample]:
    """`n` samples of `task` at `length` tokens (sample i the same for any n)."""
    if n < 1:
        raise RulerError(f"n must be at least 1 sample; got {n}.")
    return [make_sample(lab, task, length, i, seed, haystack) for i in range(n)]
