"""Ordinal sequences for successor heads (Gould et al. 2023), generated offline.

Each list is in order, so an item's successor is the next item (days and months wrap around:
Sunday -> Monday, December -> January). Items are used as they appear mid-text, with a leading
space (" Monday"); per model only the items the tokenizer keeps as one token are kept, and
`OrdinalSet.dropped` says which were not (SmolLM2's tokenizer splits every digit, so " 1" is two
tokens and the whole digit list is dropped for the embedded model; GPT-2 keeps " 1" ... " 100").

After filtering, an item whose successor was dropped loses its successor: a list keeps only the
longest runs of consecutive single-token items, so "successor" always means the next item of the
original sequence, never a later one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

_UNITS = "one two three four five six seven eight nine".split()
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL_UNITS = "first second third fourth fifth sixth seventh eighth ninth".split()
_ORDINAL_TEENS = (
    "tenth eleventh twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth".split()
)


def _roman(number: int) -> str:
    out = []
    for value, symbol in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
                          (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while number >= value:
            out.append(symbol)
            number -= value
    return "".join(out)


# name -> (items in order, cyclic). Number words stop at twenty: "twenty-one" is never one token.
SEQUENCES: dict[str, tuple[tuple[str, ...], bool]] = {
    "numbers": (tuple(str(i) for i in range(1, 101)), False),
    "number_words": (tuple(_UNITS + _TEENS + ["twenty"]), False),
    "tens": (tuple(["ten"] + _TENS + ["hundred"]), False),
    "ordinals": (tuple(_ORDINAL_UNITS + _ORDINAL_TEENS + ["twentieth"]), False),
    "days": (("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"), True),
    "months": (("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                "November", "December"), True),
    "letters": (tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), False),
    "roman": (tuple(_roman(i) for i in range(1, 21)), False),
}
DEFAULT_TASKS = tuple(SEQUENCES)


@dataclass
class OrdinalTask:
    """One ordinal list as one model tokenizes it.

    Attributes:
        name: the sequence's name ("days", ...).
        items: the kept items, in order (without the leading space).
        token_ids: one id per kept item (the token of " " + item).
        successor: for each kept item the index (into `items`) of its successor, or -1 when it has
            none among the kept items (the last item of a non-cyclic list, or a dropped neighbour).
        dropped: items of the full sequence that are not one token.
        cyclic: whether the original sequence wraps around.
    """

    name: str
    items: list[str]
    token_ids: list[int]
    successor: list[int]
    dropped: list[str] = field(default_factory=list)
    cyclic: bool = False

    @property
    def n_scored(self) -> int:
        """Items that have a successor (those the succession score counts)."""
        return sum(s >= 0 for s in self.successor)

    def pairs(self) -> list[tuple[int, int]]:
        """`(item index, successor index)` for every item that has one."""
        return [(i, s) for i, s in enumerate(self.successor) if s >= 0]

    def runs(self, length: int) -> list[list[int]]:
        """Every chain of `length` kept items, each the successor of the one before (indices into `items`)."""
        chains = []
        for start in range(len(self.items)):
            chain = [start]
            while len(chain) < length and self.successor[chain[-1]] >= 0:
                chain.append(self.successor[chain[-1]])
            if len(chain) == length and len(set(chain)) == length:
                chains.append(chain)
        return chains


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when the tokenizer keeps it as one token (no special tokens), else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def build_task(tokenizer, name: str, max_items: int | None = None) -> OrdinalTask:
    """The sequence `name` filtered to single-token items (" " + item); `max_items` cuts the full list first."""
    if name not in SEQUENCES:
        raise KeyError(f"Unknown ordinal sequence '{name}'. Known: {', '.join(SEQUENCES)}.")
    full, cyclic = SEQUENCES[name]
    full = list(full[:max_items] if max_items else full)
    cyclic = cyclic and len(full) == len(SEQUENCES[name][0])  # a cut list no longer wraps
    ids = [single_token_id(tokenizer, " " + item) for item in full]
    kept = [i for i, tid in enumerate(ids) if tid is not None]
    position = {orig: new for new, orig in enumerate(kept)}
    successor = []
    for orig in kept:
        nxt = orig + 1
        if nxt == len(full) and cyclic:
            nxt = 0
        successor.append(position.get(nxt, -1) if nxt < len(full) else -1)
    return OrdinalTask(
        name=name,
        items=[full[i] for i in kept],
        token_ids=[ids[i] for i in kept],
        successor=successor,
        dropped=[full[i] for i, tid in enumerate(ids) if tid is None],
        cyclic=cyclic,
    )


def ordinal_tasks(tokenizer, names: list[str] | tuple[str, ...] | None = None, max_items: int | None = None,
                  min_scored: int = 2) -> tuple[list[OrdinalTask], dict[str, list[str]]]:
    """The ordinal tasks a model can use, and what was dropped.

    Returns `(tasks, dropped)`: `tasks` holds the sequences with at least `min_scored` items that
    have a single-token successor (a list with fewer is useless for argmax-among-items and is
    dropped as a whole); `dropped` maps every sequence name to its dropped items (all of them
    when the whole list was dropped).
    """
    tasks, dropped = [], {}
    for name in names or DEFAULT_TASKS:
        task = build_task(tokenizer, name, max_items)
        if task.n_scored >= min_scored:
            tasks.append(task)
            dropped[name] = task.dropped
        else:
            dropped[name] = list(SEQUENCES[name][0][:max_items] if max_items else SEQUENCES[name][0])
    if not tasks:
        raise ValueError(
            f"None of the ordinal sequences {list(names or DEFAULT_TASKS)} has {min_scored} single-token items with "
            "single-token successors for this tokenizer."
        )
    return tasks, dropped


def dropped_summary(dropped: dict[str, list[str]], tasks: list[OrdinalTask]) -> str:
    """One line per sequence: how many items were kept and which were dropped (shortened)."""
    kept = {task.name: len(task.items) for task in tasks}
    lines = []
    for name, items in dropped.items():
        if name not in kept:
            lines.append(f"{name}: dropped entirely ({len(items)} items are not single tokens with a leading space)")
        elif items:
            shown = ", ".join(items[:8]) + (", ..." if len(items) > 8 else "")
            lines.append(f"{name}: kept {kept[name]}, dropped {len(items)} ({shown})")
        else:
            lines.append(f"{name}: kept all {kept[name]}")
    return "\n".join(lines)
