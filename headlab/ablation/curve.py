"""Top-k vs random-k: ablate a score's top-k heads and random k-head sets; a causal score separates them.

Random sets are drawn (seeded) from the heads outside that k's top-k, so a random set never contains
a top head. One generator per (seed, k): the k=4 sets are the same whichever other ks are asked for.
Curves are stored like scores (`store.cached_run`) under a key built from the score's kind and
parameters, the task's description, the method and its parameters, the ks and the number of sets.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from headlab import store, validate
from headlab.ablation.engine import ablation_hooks, resolve_task
from headlab.ablation.methods import DEFAULT_METHOD, make_method
from headlab.heads import Head, all_heads
from headlab.lab import Lab
from headlab.scores import HeadScores
from headlab.tasks import Task

CURVE_FORMAT = "headlab.ablation_curve/v1"
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class CurveConfig:
    """What a top-k vs random-k curve runs: the defaults every view (app, CLI, analyses) starts from."""

    task: str = "repeated_tokens"
    ks: tuple[int, ...] = (1, 2, 4, 8)
    method: str = DEFAULT_METHOD
    n_random: int = 5  # random k-head sets per k
    n: int | None = 8  # task samples (None: the task's own default); 8 keeps a 1 + 4 x 6-run curve quick

    def __post_init__(self):
        if not self.ks or any(int(k) != k or k < 1 for k in self.ks):
            raise ValueError(f"ks must be whole numbers of heads >= 1, e.g. 1,2,4,8; got {list(self.ks)}.")
        if self.n_random < 1:
            raise ValueError(f"n_random must be at least 1 random set per k; got {self.n_random}.")
        if self.n is not None and self.n < 1:
            raise ValueError(f"n must be at least 1 task sample; got {self.n}.")


DEFAULTS = CurveConfig()


@dataclass
class AblationCurve:
    """Task metric after ablating the top-k heads of a score vs `n_random` random k-head sets."""

    model: str
    scores: dict  # {"kind": ..., "params": ...} of the HeadScores the top-k came from
    task: dict  # Task.describe()
    metric: str
    method: str
    higher_is_better: bool
    baseline: float
    ks: list[int]
    top: list[float]
    top_heads: list[list[Head]]
    random: list[list[float]]  # [k index][seed]
    random_heads: list[list[list[Head]]] = field(default_factory=list)
    method_params: dict = field(default_factory=dict)

    @property
    def random_mean(self) -> list[float]:
        return [float(torch.tensor(r).mean()) for r in self.random]

    @property
    def random_std(self) -> list[float]:
        return [float(torch.tensor(r).std()) if len(r) > 1 else 0.0 for r in self.random]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({
            "k": self.ks, "top_k": self.top, "random_mean": self.random_mean, "random_std": self.random_std,
            "random_min": [min(r) for r in self.random], "random_max": [max(r) for r in self.random],
            "baseline": [self.baseline] * len(self.ks),
        })

    def sets_frame(self):
        """One row per ablated head set: `k`, `set` (top-k, random 1, ...), its `heads` (`L18H6, ...`) and its `value`."""
        import pandas as pd

        from headlab.heads import format_heads

        rows = []
        for i, k in enumerate(self.ks):
            rows.append({"k": k, "set": f"top-{k}", "heads": format_heads(self.top_heads[i]), "value": self.top[i]})
            sets = self.random_heads[i] if i < len(self.random_heads) else [[] for _ in self.random[i]]
            rows += [{"k": k, "set": f"random {j + 1}", "heads": format_heads(heads), "value": value}
                     for j, (heads, value) in enumerate(zip(sets, self.random[i]))]
        return pd.DataFrame(rows, columns=["k", "set", "heads", "value"])

    def summary(self) -> str:
        """One Markdown sentence: what was compared, on which task, and the intact value."""
        return (f"Top-k **{self.scores['kind']}** heads vs {len(self.random[0]) if self.random else 0} random sets per k "
                f"on **{self.task['task']}** ({self.metric}); intact {self.baseline:.3f}.")

    def figure(self):
        """Plotly: the metric vs k for top-k (line) and random-k (mean ± std band, each seed a dot)."""
        from headlab.viz import curve_figure

        return curve_figure(self)

    def save(self, path: Path) -> Path:
        n_random = len(self.random[0]) if self.random else 0
        params = curve_params(self.scores, self.task, self.method, self.ks, n_random, self.method_params)
        store.write_json(path, {"format": CURVE_FORMAT, "record": "ablation_curve", "kind": self.scores["kind"],
                                "params": params, "curve": asdict(self)})
        return path

    @classmethod
    def load(cls, path: Path) -> "AblationCurve":
        curve = store.read_record(path, CURVE_FORMAT, "ablation-curve")["curve"]
        curve["top_heads"] = [[tuple(h) for h in hs] for hs in curve["top_heads"]]
        curve["random_heads"] = [[[tuple(h) for h in hs] for hs in per_k] for per_k in curve["random_heads"]]
        return cls(**curve)


def curve_params(scores: dict, task: dict, method: str, ks: list[int], n_random: int, method_params: dict | None = None) -> dict:
    """The stored-run key of a curve (method parameters only when the method has any)."""
    params = {"scores": scores, "task": task, "method": method, "ks": list(ks), "n_random": n_random}
    if method_params:
        params["method_params"] = method_params
    return params


def random_sets(pool: list[Head], k: int, n_random: int, seed: int) -> list[list[Head]]:
    """`n_random` sorted k-head sets drawn from `pool` with the generator of `(seed, k)`."""
    rng = random.Random(f"{seed}/{k}")
    return [sorted(rng.sample(pool, k)) for _ in range(n_random)]


def ablation_curve(
    lab: Lab, scores: HeadScores, task: str | Task = DEFAULTS.task, ks=DEFAULTS.ks, *,
    method: str = DEFAULTS.method, n_random: int = DEFAULTS.n_random, n: int | None = DEFAULTS.n, seed: int = 0,
    task_params: dict | None = None, method_params: dict | None = None, recompute: bool = False, save: bool = True,
    progress: Progress | None = None,
) -> AblationCurve:
    """Ablate the top-k heads of `scores` and, for each k, `n_random` random k-head sets (read from the store when there)."""
    CurveConfig(task=task if isinstance(task, str) else task.name, ks=tuple(ks), method=str(method), n_random=n_random, n=n)
    task = resolve_task(lab, task, n, seed, task_params)
    method = make_method(method, **(method_params or {}))
    ks = validate.curve_ks(ks, lab.info, "ks")
    source = {"kind": scores.kind, "params": scores.params}
    path = store.run_path(lab.info.slug, "ablation-curve",
                          curve_params(source, task.describe(), method.name, ks, n_random, method.params()))
    return store.cached_run(path, AblationCurve.load, lambda: _run_curve(lab, scores, task, ks, method, n_random, seed, progress),
                            recompute=recompute, save=save)


def _run_curve(lab: Lab, scores: HeadScores, task: Task, ks: list[int], method, n_random: int, seed: int,
               progress: Progress | None) -> AblationCurve:
    steps, done = 1 + len(ks) * (1 + n_random), 0

    def run(heads: list[Head]) -> float:
        nonlocal done
        value = task.evaluate(ablation_hooks(lab, heads, method, task))
        done += 1
        if progress:
            progress(done / steps, f"ablated {len(heads)} heads ({done}/{steps})")
        return value

    baseline = run([])
    top_heads = [scores.top_heads(k) for k in ks]
    rand_heads = [random_sets([h for h in all_heads(lab.info) if h not in set(chosen)], k, n_random, seed)
                  for k, chosen in zip(ks, top_heads)]
    top, rand = [], []
    for chosen, sets in zip(top_heads, rand_heads):
        top.append(run(chosen))
        rand.append([run(s) for s in sets])
    return AblationCurve(
        model=lab.info.name, scores={"kind": scores.kind, "params": scores.params}, task=task.describe(),
        metric=task.metric, method=method.name, higher_is_better=task.higher_is_better, baseline=baseline, ks=ks,
        top=top, top_heads=top_heads, random=rand, random_heads=rand_heads, method_params=method.params(),
    )
