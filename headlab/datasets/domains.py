"""Input domains that need no network: English prose, Python source, random and repeated tokens, chat.

Prose is the Python standard library's own documentation (module and function docstrings via
`inspect.getdoc`); code is the standard library's own source (`inspect.getsource`). Both come
from the running interpreter, so they are there offline and identical on every machine with the
same Python. Users add their own domains as `{name: text}`.

`domain_tokens(lab, domain, n, seq_len, seed)` gives `[n, seq_len]` token ids, the first one the
model's BOS (or the chat template's opening token), reproducible from `seed`.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import random

import torch

from headlab.datasets import data
from headlab.lab import Lab

BUILTIN_DOMAINS = ("prose", "code", "random", "repeated", "chat")
# Standard-library modules whose docstrings are long English prose and whose source is plain Python.
STDLIB_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "fractions", "functools", "heapq", "http.client", "inspect", "json", "logging",
    "pathlib", "pickle", "random", "shutil", "statistics", "string", "subprocess", "tempfile",
    "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)
CHAT_QUESTIONS = (
    "Can you explain what this part of the documentation means?",
    "What does that do in practice?",
    "Could you summarise the next part for me?",
    "Is there anything I should be careful about?",
    "And what comes after that?",
)


class EmptyTextError(ValueError):
    """A text or domain holds no usable tokens."""


def _public_members(module) -> list:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    return [getattr(module, n, None) for n in sorted(names)]


@functools.lru_cache(maxsize=1)
def stdlib_prose() -> str:
    """English prose: the docstrings of `STDLIB_MODULES` and their public members, in a fixed order."""
    parts = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *_public_members(module)]:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and len(doc) > 200 and doc not in parts:  # skip one-liners and inherited repeats
                parts.append(doc)
    return "\n\n".join(parts)


@functools.lru_cache(maxsize=1)
def long_prose() -> str:
    """`stdlib_prose` followed by the Python language reference's topics (`pydoc_data.topics`, about 110k more
    tokens), for prose samples longer than `stdlib_prose` holds (about 45k tokens): sink and streaming scores at
    128k-token contexts. Samples that fit `stdlib_prose` keep reading it alone, so their results do not change.
    `stdlib_prose` alone where a Python build lacks `pydoc_data`."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return stdlib_prose()
    return "\n\n".join([stdlib_prose(), *(topics[name] for name in sorted(topics))])


@functools.lru_cache(maxsize=1)
def stdlib_source() -> str:
    """Python source code: the standard-library files of `STDLIB_MODULES`."""
    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in STDLIB_MODULES)


def prose_sentences(min_chars: int = 40) -> list[str]:
    """The prose split into sentence-like pieces (one line each), for haystacks and dialogue."""
    text = " ".join(stdlib_prose().split())
    pieces = [p.strip() + "." for p in text.split(". ")]
    return [p for p in pieces if len(p) >= min_chars and ">>>" not in p]


def _tokenize(lab: Lab, text: str) -> list[int]:
    ids = lab.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise EmptyTextError("The text is empty: a domain needs some text to take samples from.")
    return ids


def windows_of_text(lab: Lab, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`[n, seq_len]`: BOS + `seq_len - 1` consecutive tokens of `text` from random offsets."""
    ids = _tokenize(lab, text)
    body = seq_len - (lab.bos_token_id is not None)
    if len(ids) < body:
        raise EmptyTextError(f"The text has {len(ids)} tokens; samples of {seq_len} tokens need at least {body}.")
    rng = random.Random(seed)
    rows = [ids[start : start + body] for start in (rng.randrange(len(ids) - body + 1) for _ in range(n))]
    return data.with_bos(lab, torch.tensor(rows))


def chat_tokens(lab: Lab, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`[n, seq_len]` chat-formatted dialogues (the model's template) of questions and prose answers."""
    sentences = prose_sentences()
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages, ids = [], []
        while len(ids) < seq_len:
            start = rng.randrange(len(sentences) - 3)
            messages += [
                {"role": "user", "content": rng.choice(CHAT_QUESTIONS)},
                {"role": "assistant", "content": " ".join(sentences[start : start + 3])},
            ]
            ids = lab.tokenizer(lab.chat(messages, add_generation_prompt=False), add_special_tokens=False)["input_ids"]
        if lab.bos_token_id is not None and ids[0] != lab.bos_token_id:
            ids = [lab.bos_token_id] + ids
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def domain_tokens(lab: Lab, domain: str, n: int, seq_len: int, seed: int, texts: dict[str, str] | None = None) -> torch.Tensor:
    """`[n, seq_len]` token ids of `domain` (a built-in name or a key of `texts`), BOS first.

    Raises `KeyError` for an unknown domain, `EmptyTextError` for a text too short for `seq_len`.
    """
    lab.check_length(seq_len, f"{domain} sample")
    if seq_len < 4:
        raise ValueError(f"seq_len must be at least 4 tokens; got {seq_len}.")
    texts = texts or {}
    if domain in texts:
        return windows_of_text(lab, texts[domain], n, seq_len, seed)
    if domain == "prose":
        try:
            return windows_of_text(lab, stdlib_prose(), n, seq_len, seed)
        except EmptyTextError:  # longer than the docstrings: the language reference continues them
            return windows_of_text(lab, long_prose(), n, seq_len, seed)
    if domain == "code":
        return windows_of_text(lab, stdlib_source(), n, seq_len, seed)
    if domain == "random":
        return data.with_bos(lab, data.random_tokens(lab, n, seq_len - 1, seed))
    if domain == "repeated":
        half = (seq_len - 1) // 2
        tokens = data.repeated_random_tokens(lab, n, half, seed)
        pad = data.random_tokens(lab, n, seq_len - tokens.shape[1], seed + 1)
        return torch.cat([tokens, pad], dim=1)
    if domain == "chat":
        return chat_tokens(lab, n, seq_len, seed)
    known = ", ".join([*BUILTIN_DOMAINS, *texts])
    raise KeyError(f"Unknown input domain '{domain}'. Known domains: {known}.")
