"""The scorer registry: `hl.score(lab, kind, **params)` finds the scorer registered under `kind`.

A scorer is one frozen dataclass, as kvpress keeps a press's settings: its fields are its parameters
(with their defaults, written once, there), `__post_init__` checks them, and `compute(lab)` scores
every head. Subclassing `Scorer` with a `kind` registers it; every module of this package is
imported on first use, so adding a scorer is adding one file here.

The config is also the run's identity: `params()` is what `HeadScores.params` records and what the
stored-run key is hashed from (`run_path`), so there is one place that decides where a run lives.
`hl.score` reads the store first and computes only what is missing; `hl.stored` only looks.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from headlab import store
from headlab.lab import Lab
from headlab.registry import Registry, jsonable
from headlab.scores import HeadScores

_SCORERS = Registry(__name__, __path__, "score kind", "kinds")


@dataclass(frozen=True)
class Scorer(ABC):
    """Base of every scorer. Subclasses set `kind`, declare their parameters as fields and implement `compute`."""

    kind: ClassVar[str] = ""
    # How the score's cost grows; every scorer states it in its docstring.

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _SCORERS.register(cls.kind, cls)

    def params(self) -> dict:
        """Every parameter, JSON-able: what a stored run records and is keyed by.

        A parameter naming a user file (haystack, dataset, prompts) keys the run by the file's content too:
        `files: {parameter: sha256}` is added (absent when no parameter names a file), so two versions of
        one file never share a stored result.
        """
        params = jsonable(dataclasses.asdict(self))
        files = store.file_hashes(params)
        return {**params, "files": files} if files else params

    def run_path(self, lab: Lab, root: Path | None = None) -> Path:
        """Where this run of `lab` lives in the store."""
        return store.run_path(lab.info.slug, self.kind, self.params(), root)

    @abstractmethod
    def compute(self, lab: Lab) -> HeadScores:
        """Score every head of `lab`: `HeadScores` with `values` `[n_layers, n_heads]` (build it with `self.result`)."""

    def result(self, lab: Lab, values: torch.Tensor, raw: dict | None = None, meta: dict | None = None) -> HeadScores:
        """`HeadScores` of this run: `values` `[n_layers, n_heads]`, with kind, model and params filled in."""
        return HeadScores(kind=self.kind, model=lab.info.name, params=self.params(), values=values,
                          raw=raw or {}, meta={**(meta or {}), "slug": lab.info.slug})


def kinds() -> list[str]:
    """Every registered score kind."""
    return _SCORERS.names()


def scorer_class(kind: str) -> type[Scorer]:
    """The scorer registered under `kind`."""
    return _SCORERS.get(kind)


def scorer_fields(kind: str) -> dict[str, object]:
    """`{parameter: default}` of the scorer of `kind`, in declaration order."""
    return _SCORERS.fields(kind)


def make_scorer(kind: str, **params) -> Scorer:
    """The scorer of `kind` with `params` over its defaults; an unknown parameter, or a value its field's type
    annotation does not allow (`prompts="abc"` for `list[str] | None`), is an error naming the parameter."""
    params.pop("files", None)  # the content hashes a stored run's params carry: recomputed from the files themselves
    return _SCORERS.make(kind, **params)


def resolve_params(kind: str, **params) -> dict:
    """The full parameters of a run of `kind`: its defaults overridden by `params`."""
    return make_scorer(kind, **params).params()


def _compute(config: Scorer, lab: Lab) -> HeadScores:
    started = time.perf_counter()
    result = config.compute(lab)
    result.meta.setdefault("seconds", round(time.perf_counter() - started, 2))
    return result


def score(lab: Lab, kind: str, *, recompute: bool = False, save: bool = True, **params) -> HeadScores:
    """Score every head of `lab` for `kind`, reading the store first unless `recompute`.

    Returns `HeadScores` with `values` `[n_layers, n_heads]`.
    """
    config = make_scorer(kind, **params)
    return store.cached_run(config.run_path(lab), HeadScores.load, lambda: _compute(config, lab),
                            recompute=recompute, save=save)


def stored(lab: Lab, kind: str, **params) -> HeadScores | None:
    """The stored run of `kind` with `params` for `lab`, or None; never computes."""
    return store.stored_run(make_scorer(kind, **params).run_path(lab), HeadScores.load)
