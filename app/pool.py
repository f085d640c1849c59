"""`ModelPool`: the loaded models the app's visitors share, one copy per model name, under a memory budget.

Each visitor picks a model (a session's choice, `app.session`); the pool holds at most one `Lab` per name and
evicts the least recently used ones when the weights it holds exceed `budget_bytes` (the launch model is pinned
and never evicted). Weights are read-only for every job; what a job adds to a model (TransformerLens hooks,
a cancel check) lives only while that job holds the model's `lock`, so two jobs never run on one model at once
while jobs on different models may. A name loads once even when two visitors ask for it together.

Plain Python (no gradio). `files` (an `app.inputs.FileAccess`) decides which typed names and folders may load.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import headlab as hl
from app.inputs import BUILTIN_MODELS, FileAccess

GIB = 1 << 30
DEFAULT_BUDGET = 8 * GIB  # weights held by the pool; a model bigger than the budget still loads, alone


def model_bytes(lab: hl.Lab) -> int:
    """Bytes of the distinct tensors (parameters and buffers) behind `lab`'s model; tied weights count once."""
    seen, total = set(), 0
    for tensor in [*lab.model.parameters(), *lab.model.buffers()]:
        key = (tensor.data_ptr(), tensor.device)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class Entry:
    """One loaded model: its `Lab`, its size, and the lock a job holds while it runs on it."""

    lab: hl.Lab
    nbytes: int
    pinned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelPool:
    """Loaded models by the name a visitor typed ('embedded', 'gpt2', a folder), least recently used first."""

    def __init__(self, files: FileAccess | None = None, budget_bytes: int = DEFAULT_BUDGET,
                 loader: Callable[[str], hl.Lab] = hl.load):
        self.files = files if files is not None else FileAccess()
        self.budget_bytes = budget_bytes
        self._load = loader
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()  # guards `_entries`
        self._loading: dict[str, threading.Lock] = {}  # one per name being loaded: a name loads once

    def add(self, key: str, lab: hl.Lab, pinned: bool = False) -> Entry:
        """Hold `lab` under `key` (a model already in memory, e.g. the launch model, pinned)."""
        with self._lock:
            entry = self._entries[key] = Entry(lab, model_bytes(lab), pinned)
            self._entries.move_to_end(key)
            self._evict()
        return entry

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def get(self, key: str) -> Entry:
        """The model loaded under `key`, loading it first when it is not held (`ModelLoadError` if it cannot load)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            name_lock = self._loading.setdefault(key, threading.Lock())
        with name_lock:  # a second visitor asking for the same name waits for the first load
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            lab = self._load_checked(key)
            with self._lock:
                self._loading.pop(key, None)
            return self.add(key, lab)

    def _load_checked(self, typed: str) -> hl.Lab:
        """Load what the app's `FileAccess` allows for `typed`; a refused path and a missing one get the same message."""
        source = self.files.model_source(typed)
        try:
            return self._load(source)
        except hl.ModelLoadError as err:
            # Outside the open mode, a hub name that cannot be fetched gets the refusal's words, so the
            # message cannot tell a path refused above from a name the hub does not know.
            hub_name = source == typed and source not in BUILTIN_MODELS
            if hub_name and not self.files.any_folder and isinstance(err.__cause__, OSError):
                raise self.files.model_refused(typed) from err
            raise

    def _evict(self) -> None:
        """Drop least recently used, unpinned, idle models until the held weights fit the budget (the newest stays)."""
        held = sum(entry.nbytes for entry in self._entries.values())
        for key in list(self._entries)[:-1]:
            if held <= self.budget_bytes:
                return
            entry = self._entries[key]
            if entry.pinned or not entry.lock.acquire(blocking=False):  # a job is running on it: keep it
                continue
            try:
                del self._entries[key]
                held -= entry.nbytes
            finally:
                entry.lock.release()
