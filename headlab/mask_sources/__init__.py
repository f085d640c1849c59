"""The mask-source registry: every published way of choosing which KV heads keep their full cache.

`headlab.masks.make_mask(lab, name, full_fraction=..., sink=..., recent=..., **params)` finds the source
registered under `name` and asks it for a `HeadMask` with exactly `round(full_fraction * n_layers *
n_kv_heads)` full KV heads. A source is one frozen dataclass, as a scorer is (`headlab.scorers`): its
fields are its parameters, with their defaults written once, there; `__post_init__` checks them;
`check(lab, config)` refuses up front a request that cannot fit (context, memory); `make(lab, config)`
builds the mask (`build` does both). Subclassing `MaskSource` with a `name` registers it; every module of this package is
imported on first use, so adding a source is adding one file here.

Sources that rank heads by a value (a score, a trained gate) reduce query-head values to KV heads as
the masks always do (`headlab.masks.group_scores`, the group's max by default) and keep the top k
(`headlab.masks.top_k_full`), so every source spends exactly the same budget. Every mask records its
source in `mask.source`: `source` (the registry name), `params`, `budget`, and `seconds`, the time the
scoring or training took when it was computed (also when it was read back from the store).
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from headlab.lab import Lab
from headlab.masks import HeadMask, MaskConfig, choose_full
from headlab.registry import Registry, jsonable

_SOURCES = Registry(__name__, __path__, "mask source", "sources")


@dataclass(frozen=True)
class MaskSource(ABC):
    """Base of every mask source. Subclasses set `name`, declare their parameters as fields and implement `make`.

    Each source's docstring states its cost (time and memory against context length and model size).
    """

    name: ClassVar[str] = ""
    ranks_by_value: ClassVar[bool] = True  # one value per KV head, so a threshold can cut it
    own_cut: ClassVar[bool] = False  # a cut of its own when no full_fraction is given (DuoAttention's gate >= 0.5)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            _SOURCES.register(cls.name, cls)

    def params(self) -> dict:
        """Every parameter, JSON-able: what the mask's `source["params"]` records."""
        return jsonable(dataclasses.asdict(self))

    def check(self, lab: Lab, config: MaskConfig) -> None:
        """Raise `ValueError` before any work when the request cannot be served (here: the budget it cannot cut)."""
        if config.threshold is not None and not self.ranks_by_value:
            raise ValueError(f"Mask source '{self.name}' has no single value per KV head to cut at a threshold: give full_fraction.")
        budget_of(config, self.name, self.own_cut)

    @abstractmethod
    def make(self, lab: Lab, config: MaskConfig) -> HeadMask:
        """The mask for `lab` at `config`'s budget and window (`build` checks the request first)."""

    def build(self, lab: Lab, config: MaskConfig) -> HeadMask:
        """`check` the request, then `make` the mask."""
        self.check(lab, config)
        return self.make(lab, config)

    def record(self, **extra) -> dict:
        """The `source` record of a mask this source makes: its name, parameters and `extra` (budget, seconds...)."""
        return {"kind": self.name, "source": self.name, "params": self.params(), **extra}

    def from_values(self, lab: Lab, values: torch.Tensor, config: MaskConfig, **extra) -> HeadMask:
        """The mask keeping the KV heads of highest `values` `[n_layers, n_kv_heads]` at `config`'s budget (or above its threshold)."""
        full, budget = choose_full(values, *budget_of(config, self.name, self.own_cut))
        return HeadMask.for_model(lab.info, full, config.sink, config.recent,
                                  self.record(budget=budget, values=values.float().tolist(), **extra))


def budget_of(config: MaskConfig, source: str, own_cut: bool = False) -> tuple[float | None, float | None]:
    """`(full_fraction, threshold)` of `config`: a threshold, when given, decides instead of the fraction.
    Neither (`full_fraction=None`) is an error unless the source has a cut of its own (`own_cut`)."""
    if config.threshold is not None:
        return None, config.threshold
    if config.full_fraction is None and not own_cut:
        raise ValueError(f"Mask source '{source}' has no cut of its own: give full_fraction (or threshold).")
    return config.full_fraction, None


def source_names() -> list[str]:
    """Every registered mask source's name."""
    return _SOURCES.names()


def source_class(name: str) -> type[MaskSource]:
    """The source registered under `name`."""
    return _SOURCES.get(name)


def source_fields(name: str) -> dict[str, object]:
    """`{parameter: default}` of the source `name`, in declaration order."""
    return _SOURCES.fields(name)


def make_source(name: str, **params) -> MaskSource:
    """The source `name` with `params` over its defaults, their types checked against the fields' annotations."""
    return _SOURCES.make(name, **params)
