"""Tasks the ablation engine measures. Each task is one module with one `Task` subclass.

A task builds its inputs once from `(lab, n, seed, **params)` and then evaluates the model under
any list of TransformerLens forward hooks, returning one number. Generation tasks (passkey, needle,
refusal) run `lab.model.generate` inside `lab.model.hooks(...)`; loss tasks run a forward pass.
"""
from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from functools import cached_property

import torch

from headlab.activations import Hook
from headlab.lab import Lab

_TASKS: dict[str, type["Task"]] = {}


class Task(ABC):
    """One measurable behaviour.

    Subclasses set `name`, `metric` (what the number means), `higher_is_better`, and implement
    `evaluate(hooks)`. `reference_tokens()` is the batch mean ablation averages over; `details(hooks)`
    is what the app and the analyses show (the metric as `"value"` plus the task's own breakdown).
    """

    name: str = ""
    metric: str = ""
    higher_is_better: bool = True
    default_n: int = 16

    def __init__(self, lab: Lab, n: int | None = None, seed: int = 0, **params):
        self.lab = lab
        self.n = n or self.default_n
        self.seed = seed
        self.params = params
        self.memo: dict = {}  # values derived from this task's inputs, e.g. mean activations

    def describe(self) -> dict:
        """Everything needed to rebuild this task's inputs."""
        return {"task": self.name, "n": self.n, "seed": self.seed, **self.params}

    @abstractmethod
    def evaluate(self, hooks: list[Hook] | None = None) -> float:
        """The task's metric with `hooks` active."""

    def details(self, hooks: list[Hook] | None = None) -> dict:
        """The metric with `hooks` active and what a view shows beside it (per-item answers, per-cell accuracy, ...).

        Always holds `"value"`, equal to `evaluate(hooks)`; tasks add their own keys.
        """
        return {"value": self.evaluate(hooks)}

    @abstractmethod
    def reference_tokens(self) -> torch.Tensor:
        """`[batch, pos]` tokens whose activations define 'mean' for mean ablation."""


class NextTokenTask(Task):
    """A task read from the next-token logits after same-length prompts.

    Subclasses set `self.tokens` `[n, pos]` and `self.batch_size`, implement `_build(seed)` (its second
    element: the tokens of `n` prompts drawn with `seed`) and set `reference_offset`, so the mean-ablation
    reference batch is other prompts of the same kind (seed `reference_offset + seed`).
    """

    reference_offset: int = 0

    @abstractmethod
    def _build(self, seed: int) -> tuple:
        """The task's inputs drawn with `seed`: `(prompts, tokens [n, pos], ...)`."""

    @cached_property
    def _reference(self) -> torch.Tensor:
        return self._build(self.reference_offset + self.seed)[1]

    def reference_tokens(self) -> torch.Tensor:
        return self._reference

    def final_logits(self, hooks: list[Hook] | None = None) -> torch.Tensor:
        """Next-token logits after each prompt, `[n, d_vocab]`, with `hooks` active."""
        return last_logits(self.lab, self.tokens, self.batch_size, hooks)


@torch.no_grad()
def last_logits(lab: Lab, tokens: torch.Tensor, batch_size: int, hooks: list[Hook] | None = None) -> torch.Tensor:
    """Next-token logits at the last position of `tokens` `[n, pos]` (same-length prompts), `[n, d_vocab]`, with `hooks` active."""
    out = []
    with lab.model.hooks(fwd_hooks=hooks or []):
        for batch in tokens.split(batch_size):
            out.append(lab.model(batch.to(lab.device), return_type="logits")[:, -1].float().cpu())
    return torch.cat(out)


def register(cls: type[Task]) -> type[Task]:
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Every registered task (each module of this package registers its own on import)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return sorted(_TASKS)


def make_task(name: str, lab: Lab, n: int | None = None, seed: int = 0, **params) -> Task:
    """Build the task registered as `name` for `lab`."""
    if name not in task_names():
        raise KeyError(f"Unknown task '{name}'. Known tasks: {', '.join(task_names())}.")
    return _TASKS[name](lab, n=n, seed=seed, **params)
