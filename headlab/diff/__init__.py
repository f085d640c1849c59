"""`hl.diff(lab_a, lab_b)`: which heads did fine-tuning change, do their scores move, and do the changed heads matter?

    d = hl.diff(hl.load("embedded"), hl.load("embedded-refusal"), kinds=["safety"])
    d.figure(); d.to_frame(); d.moved("safety"); d.behaviour_frame(); d.summary()

Three parts, for any two models of the same shape (`weights.check_same_shape` refuses others):

- **weights** (`headlab.diff.weights`): per head the relative change of its QK and OV circuits
  (`FactoredMatrix` norms of B - A over A's), per layer the MLP's, per parameter where it sits;
- **scores**: every kind in `kinds` scored on both models (`hl.score`: stored runs are read, the default
  parameters of each kind), their difference per head and the heads whose rank moved most;
- **behaviour**: the `k` most changed heads (`ModelDiff.changed_heads`) ablated in each model on `task`,
  against `n_random` random k-head sets (`hl.ablation_curve` with the weight change as the score).

The run is stored like every other (`store.cached_run`) under model A's folder, keyed by both models'
names and fingerprints and the `DiffConfig`. Cost: the weights part is seconds (one rank-2 d_head
SVD per head and circuit); each score kind costs what `hl.score` costs on two models unless stored;
the behaviour part is 2 x (1 + 1 + n_random) task evaluations.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple


from headlab import store
from headlab.ablation.curve import ablation_curve
from headlab.ablation.methods import DEFAULT_METHOD, METHODS
from headlab.diff.result import ModelDiff
from headlab.diff.weights import ShapeMismatch, check_same_shape, circuit_change, mlp_change, parameter_change
from headlab.lab import Lab, ModelInfo
from headlab.scores import HeadScores

__all__ = ["DiffConfig", "ModelDiff", "ModelId", "ShapeMismatch", "diff", "stored_diff"]
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class DiffConfig:
    """What a diff runs; the defaults every view (library, CLI, app, analysis) starts from.

    kinds: score kinds compared (each at its default parameters). top: heads listed as most changed / most
    moved. task, k, n_random, n, method, seed: the behaviour check (the `k` most changed heads vs `n_random`
    random k-head sets, `method`-ablated on `n` samples of `task`); `behaviour=False` skips it.
    """

    kinds: tuple[str, ...] = ("safety",)
    top: int = 10
    behaviour: bool = True
    task: str = "refusal"
    k: int = 2
    n_random: int = 3
    n: int | None = None
    method: str = DEFAULT_METHOD
    seed: int = 0

    def __post_init__(self):
        from headlab import validate
        from headlab.scorers import kinds as score_kinds
        from headlab.tasks import task_names

        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = [kind for kind in self.kinds if kind not in score_kinds()]
        if unknown:
            raise ValueError(f"Unknown score kind(s) {unknown}: choose from {', '.join(score_kinds())}.")
        if self.task not in task_names():
            raise ValueError(f"Unknown task '{self.task}': choose from {', '.join(task_names())}.")
        if self.method not in METHODS:
            raise ValueError(f"Unknown ablation method '{self.method}': choose from {', '.join(sorted(METHODS))}.")
        for name in ("top", "k", "n_random") + (("n",) if self.n is not None else ()):
            validate.count(getattr(self, name), name)

    def params(self) -> dict:
        return {**dataclasses.asdict(self), "kinds": list(self.kinds)}


class ModelId(NamedTuple):
    """A model as the store knows it: its name and fingerprint (`ModelInfo`'s), and so its results folder."""

    name: str
    fingerprint: str | None = None

    slug = property(ModelInfo.slug.fget)  # the one definition of a model's folder name

    @classmethod
    def of(cls, model: Lab | ModelInfo | str) -> "ModelId":
        """A Lab, its ModelInfo, or a built-in name ("embedded", "embedded-refusal") without loading it."""
        from headlab import loading

        if isinstance(model, Lab):
            model = model.info
        if isinstance(model, ModelInfo):
            return cls(model.name, model.fingerprint)
        builtin = {loading.EMBEDDED: loading.EMBEDDED_NAME, loading.EMBEDDED_REFUSAL: loading.EMBEDDED_REFUSAL_NAME}
        if model in builtin:
            return cls(builtin[model])
        raise ValueError(f"A stored diff is looked up by a loaded model or a built-in name ({', '.join(builtin)}); got {model!r}.")


def run_path(a: ModelId, b: ModelId, config: DiffConfig):
    """Where the diff of `b` against `a` with `config` lives: model A's folder, keyed by both models and the config."""
    key = {"a": a._asdict(), "b": b._asdict(), "config": config.params()}
    return store.run_path(a.slug, "diff", key), key


def stored_diff(model_a: Lab | ModelInfo | str, model_b: Lab | ModelInfo | str, **params) -> ModelDiff | None:
    """The stored diff of these two models with `params` (`DiffConfig` fields), or None; never loads or computes."""
    path, _ = run_path(ModelId.of(model_a), ModelId.of(model_b), DiffConfig(**params))
    return store.stored_run(path, ModelDiff.load)


def diff(lab_a: Lab, lab_b: Lab, *, recompute: bool = False, save: bool = True, progress: Progress | None = None,
         **params) -> ModelDiff:
    """Model `lab_b` against `lab_a` (same shape), head by head: weights, scores of `kinds`, behaviour (see module doc).

    `params`: the `DiffConfig` fields (kinds, top, behaviour, task, k, n_random, n, method, seed). Read from the
    store when this diff was run before, unless `recompute`.
    """
    config = DiffConfig(**params)
    check_same_shape(lab_a, lab_b)
    path, key = run_path(ModelId.of(lab_a), ModelId.of(lab_b), config)
    return store.cached_run(path, ModelDiff.load, lambda: _compute(lab_a, lab_b, config, key, progress or _quiet),
                            recompute=recompute, save=save)


def _quiet(fraction: float, message: str) -> None:
    """The default progress callback: report nothing."""


def _compute(lab_a: Lab, lab_b: Lab, config: DiffConfig, key: dict, progress: Progress) -> ModelDiff:
    from headlab.scorers import score

    started = time.perf_counter()
    progress(0.0, "weights: QK and OV circuits, MLPs")
    result = ModelDiff(model_a=lab_a.info.name, model_b=lab_b.info.name, params=key,
                       qk=circuit_change(lab_a, lab_b, "qk"), ov=circuit_change(lab_a, lab_b, "ov"),
                       mlp=mlp_change(lab_a, lab_b), parameters=parameter_change(lab_a, lab_b))
    for i, kind in enumerate(config.kinds):
        progress(0.1 + 0.5 * i / max(len(config.kinds), 1), f"scores: {kind} on both models (stored runs are read)")
        result.scores[kind] = {"a": score(lab_a, kind).values, "b": score(lab_b, kind).values}
    if config.behaviour:
        progress(0.6, f"behaviour: the {config.k} most changed heads vs random heads on {config.task}")
        result.behaviour = _behaviour(lab_a, lab_b, result, config, key)
    result.seconds = round(time.perf_counter() - started, 2)
    progress(1.0, "done")
    return result


def _behaviour(lab_a: Lab, lab_b: Lab, result: ModelDiff, config: DiffConfig, key: dict) -> dict:
    """The `k` most changed heads vs random k-head sets, ablated in each model: `{"heads", "a", "b"}` (curves as dicts)."""
    change = HeadScores(kind="weight_change", model=f"{result.model_a} -> {result.model_b}",
                        params={"a": key["a"], "b": key["b"]}, values=result.change)
    curves = {side: ablation_curve(lab, change, config.task, ks=[config.k], method=config.method, n_random=config.n_random,
                                   n=config.n, seed=config.seed, save=False)
              for side, lab in (("a", lab_a), ("b", lab_b))}
    return {"heads": [list(h) for h in result.changed_heads(config.k)],
            **{side: dataclasses.asdict(curve) for side, curve in curves.items()}}
