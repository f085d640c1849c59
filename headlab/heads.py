"""Heads: the one `Head` type, checking that `(layer, head)` exists, and the one way a head is written (`L18H6`).

Lists of heads are read in any of the spellings users type ('L18H6, L17H3', '18.6 17.3', '18:6') and
always written back as `L18H6`, in tables, summaries, inputs and plots alike.
"""
from __future__ import annotations

import re

from headlab.lab import ModelInfo

Head = tuple[int, int]

HEAD_FORMAT_HINT = "write heads as LAYER.HEAD or LlayerHhead separated by commas, e.g. 'L18H6, L17H3' or '18.6, 17.3'"
_HEAD_PATTERN = re.compile(r"^L?(\d+)\s*[.:H]\s*H?(\d+)$", re.IGNORECASE)
_SEPARATORS = re.compile(r"[,;\s]+")


class HeadGrid:
    """`n_layers` and `n_heads` of a result holding `values` `[n_layers, n_heads, ...]` (scores, composition maps)."""

    values: object

    @property
    def n_layers(self) -> int:
        return self.values.shape[0]

    @property
    def n_heads(self) -> int:
        return self.values.shape[1]


def check_head(info: ModelInfo, layer: int, head: int) -> Head:
    """Return `(layer, head)` as ints, or raise `ValueError` naming the model's real ranges."""
    layer, head = int(layer), int(head)
    if not (0 <= layer < info.n_layers and 0 <= head < info.n_heads):
        raise ValueError(
            f"Head {layer}.{head} does not exist: {info.name} has layers 0-{info.n_layers - 1} "
            f"and heads 0-{info.n_heads - 1}."
        )
    return layer, head


def check_layer(info: ModelInfo, layer: int) -> int:
    layer = int(layer)
    if not 0 <= layer < info.n_layers:
        raise ValueError(f"Layer {layer} does not exist: {info.name} has layers 0-{info.n_layers - 1}.")
    return layer


def parse_heads(text: str, info: ModelInfo | None = None) -> list[Head]:
    """'18.6, 17.3' (also 'L18H6', '18:6', spaces or semicolons) -> [(18, 6), (17, 3)], duplicates dropped.

    With `info`, every head is also checked against the model.
    """
    items = [item for item in _SEPARATORS.split((text or "").strip()) if item]
    if not items:
        raise ValueError(f"No heads given: {HEAD_FORMAT_HINT}.")
    heads: list[Head] = []
    for item in items:
        match = _HEAD_PATTERN.match(item)
        if not match:
            raise ValueError(f"Could not read '{item}' as a head: {HEAD_FORMAT_HINT}.")
        head = (int(match.group(1)), int(match.group(2)))
        if info is not None:
            check_head(info, *head)
        if head not in heads:
            heads.append(head)
    return heads


def head_label(layer: int, head: int) -> str:
    """How a head is written everywhere: `L18H6`."""
    return f"L{layer}H{head}"


def format_heads(heads) -> str:
    """The inverse of `parse_heads`: 'L18H6, L17H3'."""
    return ", ".join(head_label(layer, head) for layer, head in as_heads(heads))


def as_heads(heads) -> list[Head]:
    """Accept [(layer, head)], [(layer, head, value)] (as `HeadScores.top` returns), [[l, h]], head labels
    (["L18H6", "17.3"]) or one string of them ("L18H6, L17H3"): `[(layer, head)]`."""
    if isinstance(heads, str):
        return parse_heads(heads)
    return [parse_heads(h)[0] if isinstance(h, str) else (int(h[0]), int(h[1])) for h in heads]


def all_heads(info: ModelInfo) -> list[Head]:
    """Every head of the model, layer-major."""
    return [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
