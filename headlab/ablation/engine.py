"""From heads and a method to forward hooks, and one ablation measured on a task.

`ablation_hooks` is the one public path every caller (ablate, the curve, Sahara's group, the tabs,
the analyses) takes from `[(layer, head)]` + a method to hooks; the batched scan builds its per-block
`Targets` and calls the same `AblationMethod.hooks`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from headlab.ablation.methods import DEFAULT_METHOD, AblationMethod, LayerState, by_layer, make_method
from headlab import validate
from headlab.activations import Hook
from headlab.heads import Head, as_heads, check_head
from headlab.lab import Lab
from headlab.tasks import Task, make_task


def method_state(lab: Lab, method: AblationMethod, reference: Task | torch.Tensor | None) -> LayerState:
    """What `method.prepare` computes from `reference` (a task's reference batch, or tokens `[batch, pos]`).

    A task keeps it in its memo, so a curve of many ablations computes the means once.
    """
    if not method.needs_reference:
        return None
    if isinstance(reference, Task):
        key = ("method_state", method.name, json.dumps(method.params(), sort_keys=True))
        if key not in reference.memo:
            reference.memo[key] = method.prepare(lab, reference.reference_tokens())
        return reference.memo[key]
    return method.prepare(lab, reference)


def ablation_hooks(lab: Lab, heads, method: str | AblationMethod = DEFAULT_METHOD,
                   reference: Task | torch.Tensor | None = None, **method_params) -> list[Hook]:
    """Forward hooks that ablate `heads` `[(layer, head), ...]` with `method` in every batch row.

    `reference`: the task (or tokens) whose activations a method such as `mean` averages over.
    """
    method = make_method(method, **method_params)
    heads = [check_head(lab.info, layer, head) for layer, head in as_heads(heads)]
    if not heads:
        return []
    targets = {layer: [(slice(None), group)] for layer, group in by_layer(heads).items()}
    return method.hooks(lab, targets, method_state(lab, method, reference))


def resolve_task(lab: Lab, task: str | Task, n: int | None, seed: int, task_params: dict | None) -> Task:
    """`task` as a built `Task` (a name is built for `lab` with `n`, `seed`, `task_params`)."""
    return task if isinstance(task, Task) else make_task(task, lab, n=n, seed=seed, **(task_params or {}))


@dataclass
class AblationResult:
    """The task metric intact and with `heads` ablated."""

    task: str
    metric: str
    method: str
    heads: list[Head]
    baseline: float
    ablated: float
    higher_is_better: bool
    method_params: dict | None = None

    @property
    def damage(self) -> float:
        """How much worse the ablated model is (positive = worse), in the metric's units."""
        delta = self.ablated - self.baseline
        return -delta if self.higher_is_better else delta

    def to_frame(self):
        """One row: what was ablated and the metric intact vs ablated."""
        import pandas as pd

        from headlab.heads import format_heads

        return pd.DataFrame([{"task": self.task, "method": self.method, "heads": format_heads(self.heads),
                              "intact": round(self.baseline, 4), "ablated": round(self.ablated, 4),
                              "damage": round(self.damage, 4)}])

    def summary(self, model: str) -> str:
        """One Markdown sentence: the metric intact and ablated, and whether it got worse."""
        direction = "higher" if self.higher_is_better else "lower"
        verdict = "worse" if self.damage > 0 else "not worse"
        return (f"**{self.task}** on {model} — {self.metric} ({direction} is better): intact **{self.baseline:.3f}**, "
                f"with {len(self.heads)} heads {self.method}-ablated **{self.ablated:.3f}** ({verdict} by {abs(self.damage):.3f}).")


def ablate(lab: Lab, heads, task: str | Task = "repeated_tokens", method: str | AblationMethod = DEFAULT_METHOD, *,
           n: int | None = None, seed: int = 0, task_params: dict | None = None,
           method_params: dict | None = None) -> AblationResult:
    """Measure `task` intact and with `heads` ablated by `method` (e.g. `method_params={"sink": 4, "recent": 64}`)."""
    heads = as_heads(heads)
    if not heads:
        raise ValueError("No heads to ablate: name at least one head (e.g. L18H6), or use a score's top_heads(k).")
    if n is not None:
        validate.count(n, "n (task samples)")
    task = resolve_task(lab, task, n, seed, task_params)
    method = make_method(method, **(method_params or {}))
    hooks = ablation_hooks(lab, heads, method, task)
    return AblationResult(task=task.name, metric=task.metric, method=method.name, heads=heads,
                          baseline=task.evaluate([]), ablated=task.evaluate(hooks),
                          higher_is_better=task.higher_is_better, method_params=method.params())
