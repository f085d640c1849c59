"""The Retrieval tab's accuracy grid as a stored run: `needle_accuracy` (the needle task per context length x depth,
intact and with the top-k retrieval heads ablated) read from the store when there, else computed and stored.

The library computes the grid (`headlab.scorers.retrieval.needle_accuracy`, a `NeedleAccuracy`) but keeps no record
of it; this module gives it one, `headlab.needle_accuracy/v1` JSON (a few numbers: no raw file), stored through
`headlab.store` like every run (`store.cached_run`: the user's results first, then the shipped twin in cached_runs/,
which `make cache` writes with `analyses/make_cache.py`). The key is the retrieval run (`scores.params`), k and the
method, so the shipped grid answers the tab's defaults and a button press with them computes nothing.
It lives in the library (not in app/) because `analyses/make_cache.py` writes the shipped grid with it and analyses
use headlab alone; the Retrieval tab reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from headlab import store
from headlab.lab import Lab
from headlab.scorers.retrieval import NeedleAccuracy, needle_accuracy
from headlab.scores import HeadScores

FORMAT = "headlab.needle_accuracy/v1"
RECORD = "needle_accuracy"


def grid_params(scores: HeadScores, k: int, method: str) -> dict:
    """The stored-run key of a grid: the retrieval run it ablates the top-`k` heads of, and how."""
    return {"scores": {"kind": scores.kind, "params": scores.params}, "k": int(k), "method": str(method)}


def grid_path(lab: Lab, scores: HeadScores, k: int, method: str) -> Path:
    return store.run_path(lab.info.slug, "needle-accuracy", grid_params(scores, k, method))


@dataclass
class StoredGrid:
    """A `NeedleAccuracy` with the key it is stored under (what `store.cached_run` saves and loads)."""

    grid: NeedleAccuracy
    params: dict

    def save(self, path: Path) -> Path:
        g = self.grid
        store.write_json(path, {"format": FORMAT, "record": RECORD, "kind": self.params["scores"]["kind"],
                                "model": g.model, "params": self.params, "grid": {
                                    "model": g.model, "task": g.task, "method": g.method, "heads": [list(h) for h in g.heads],
                                    "lengths": list(g.lengths), "depths": list(g.depths),
                                    "intact": g.intact.tolist(), "ablated": g.ablated.tolist()}})
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "StoredGrid":
        record = store.read_record(path, FORMAT, "needle-accuracy")
        grid = dict(record["grid"])
        grid["heads"] = [tuple(h) for h in grid["heads"]]
        grid["intact"], grid["ablated"] = torch.tensor(grid["intact"]), torch.tensor(grid["ablated"])
        return cls(NeedleAccuracy(**grid), record["params"])


def stored_grid(lab: Lab, scores: HeadScores, k: int, method: str) -> NeedleAccuracy | None:
    """The stored grid (the user's, else the shipped one), or None: computing nothing."""
    stored = store.stored_run(grid_path(lab, scores, k, method), StoredGrid.load)
    return stored.grid if stored is not None else None


def needle_grid(lab: Lab, scores: HeadScores, k: int, method: str, recompute: bool = False) -> tuple[NeedleAccuracy, bool]:
    """(the grid of `scores`' needle run with the top-`k` heads `method`-ablated, whether it was read from the store
    rather than computed now)."""
    path, computed = grid_path(lab, scores, k, method), []

    def compute() -> StoredGrid:
        computed.append(True)
        return StoredGrid(needle_accuracy(lab, scores, k, method), grid_params(scores, k, method))

    stored = store.cached_run(path, StoredGrid.load, compute, recompute=recompute)
    return stored.grid, not computed
