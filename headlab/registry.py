"""A registry of configuration dataclasses found by name: the one mechanism behind the scorers
(`headlab.scorers`, by score kind) and the mask sources (`headlab.mask_sources`, by source name).

A package keeps one `Registry`; its base class registers each subclass that sets a name (in
`__init_subclass__`), and every module of the package is imported on first use, so adding an entry is
adding one file. `make(name, **params)` builds the dataclass with `params` over its defaults: an unknown
parameter, or a value its field's annotation does not allow, is an error naming it.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil


def jsonable(value):
    """Tuples become lists (JSON has no tuples), recursively, so params round-trip through a stored file."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


class Registry:
    """Dataclasses by name, for the package `package` (its `__name__`) at `path` (its `__path__`).

    `what` names one entry in messages ("score kind"), `plural` the known ones ("kinds").
    """

    def __init__(self, package: str, path, what: str, plural: str) -> None:
        self.package, self.path, self.what, self.plural = package, path, what, plural
        self.classes: dict[str, type] = {}

    def register(self, name: str, cls: type) -> None:
        self.classes[name] = cls

    def _load_modules(self) -> None:
        """Import every module of the package once, so each registers its entries."""
        for module in pkgutil.iter_modules(self.path):
            importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        """Every registered name."""
        self._load_modules()
        return sorted(self.classes)

    def get(self, name: str) -> type:
        """The class registered under `name`."""
        self._load_modules()
        if name not in self.classes:
            raise KeyError(f"Unknown {self.what} '{name}'. Known {self.plural}: {', '.join(self.names())}.")
        return self.classes[name]

    def fields(self, name: str) -> dict[str, object]:
        """`{parameter: default}` of the class `name`, in declaration order."""
        return {f.name: f.default for f in dataclasses.fields(self.get(name))}

    def make(self, name: str, **params):
        """The class `name` built with `params` over its defaults, their types checked against the fields' annotations."""
        from headlab import validate

        cls, label = self.get(name), f"{self.what[0].upper()}{self.what[1:]} '{name}'"
        unknown = set(params) - set(self.fields(name))
        if unknown:
            raise TypeError(f"{label} takes no parameter {sorted(unknown)}; it takes {sorted(self.fields(name))}.")
        return cls(**validate.dataclass_params(cls, params, label))
