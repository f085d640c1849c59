"""Reading what users type into the app: heads and head lists, number lists, k lists and counts, with
messages that say how to fix them. Heads are read as 'L18H6' or '18.6' and written back as 'L18H6'.

Everything here is plain Python (no gradio), raises `ValueError` with a user-facing message, and
knows the model's shape only through `ModelInfo`.
"""
import re
from typing import Callable

from headlab import ModelInfo
from headlab.heads import Head, check_head, format_heads, parse_heads  # noqa: F401  (the app's head inputs)

_SEPARATORS = re.compile(r"[,;\s]+")


def check_whole(value: float | None, name: str) -> int:
    """A whole-number input, or `ValueError` naming the input when it is empty or fractional."""
    if value is None or value != value:  # empty box or NaN
        raise ValueError(f"Fill in {name} (a whole number).")
    if float(value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}.")
    return int(value)


def check_count(value: float | None, name: str, low: int, high: int) -> int:
    """A whole-number input within `[low, high]`, or `ValueError` naming the input."""
    number = check_whole(value, name)
    if not low <= number <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {number}.")
    return number


def parse_numbers(text: str, name: str, cast: Callable = float) -> list:
    """'256, 512' -> [256, 512] (with `cast`), or `ValueError` naming the input."""
    try:
        values = [cast(item) for item in _SEPARATORS.split((text or "").strip()) if item]
    except ValueError:
        raise ValueError(f"{name} must be numbers separated by commas; got {text!r}.") from None
    if not values:
        raise ValueError(f"Fill in {name}.")
    return values


def parse_head(text: str, info: ModelInfo) -> Head:
    """Exactly one head ('L18H6' or '18.6'), checked against the model."""
    heads = parse_heads(text, info)
    if len(heads) != 1:
        raise ValueError(f"Give exactly one head (e.g. 'L18H6'); got {len(heads)}.")
    return heads[0]


def parse_ks(text: str, info: ModelInfo) -> list[int]:
    """Parse '1, 2, 4, 8' into sorted distinct k values a top-k vs random-k curve can use.

    A random set is drawn from the heads outside the top-k, so k can be at most half of all heads.
    """
    most = info.n_layers * info.n_heads // 2
    items = [item for item in _SEPARATORS.split((text or "").strip()) if item]
    if not items:
        raise ValueError("No k values given: write them like '1, 2, 4, 8'.")
    ks = []
    for item in items:
        if not item.isdigit():
            raise ValueError(f"Could not read '{item}' as a k: write whole numbers like '1, 2, 4, 8'.")
        k = int(item)
        if not 1 <= k <= most:
            raise ValueError(f"k = {k} is out of range: {info.name} allows k from 1 to {most} (half of its heads).")
        ks.append(k)
    return sorted(set(ks))
