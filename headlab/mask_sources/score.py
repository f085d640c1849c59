"""`score`: the top KV heads of any registered head score (`hl.score(lab, kind)`) stay full.

The original way headlab made masks (`make_mask(lab, "score", kind="retrieval")`), kept for the CLI,
the app and the analyses. `ScoredSource` is the base of every source that ranks heads by one score
(`retrieval`, `attention_area`): the score's query-head values `[n_layers, n_heads]` are reduced to KV
heads by the group's max (or mean, `group`) and the top `full_fraction` of KV heads stay full
(`HeadMask.from_scores`). Scores are read from the store when stored, so a second mask is instant.
"""
from __future__ import annotations

from dataclasses import dataclass

from headlab.lab import Lab
from headlab.mask_sources import MaskSource, budget_of
from headlab.masks import HeadMask, MaskConfig

GROUPS = ("max", "mean")


@dataclass(frozen=True)
class ScoredSource(MaskSource):
    """The top KV heads of one score. Subclasses say which score (`score_kind`) with which parameters (`scorer_params`)."""

    group: str = "max"
    score_params: dict | None = None

    def __post_init__(self):
        if self.group not in GROUPS:
            raise ValueError(f"Mask source '{self.name}': group must be 'max' or 'mean', not {self.group!r}.")
        from headlab.scorers import make_scorer

        make_scorer(self.score_kind(), **self.scorer_params(None))  # the score's parameters, checked now

    def score_kind(self) -> str:
        raise NotImplementedError

    def scorer_params(self, config: MaskConfig | None) -> dict:
        """The parameters the score runs with for `config` (None: before the window is known, to check the others)."""
        return dict(self.score_params or {})

    def check(self, lab: Lab, config: MaskConfig) -> None:
        from headlab.scorers import make_scorer

        super().check(lab, config)
        make_scorer(self.score_kind(), **self.scorer_params(config))

    def make(self, lab: Lab, config: MaskConfig) -> HeadMask:
        from headlab.scorers import score

        scores = score(lab, self.score_kind(), **self.scorer_params(config))
        full_fraction, threshold = budget_of(config, self.name)  # checked by `check` before the score ran
        mask = HeadMask.from_scores(scores, full_fraction, threshold, config.sink, config.recent, self.group, info=lab.info)
        mask.source.update(source=self.name, source_params=self.params(), seconds=scores.meta.get("seconds"))
        return mask


@dataclass(frozen=True)
class Score(ScoredSource):
    """The top KV heads of the score `kind` (any of `hl.kinds()`), with `score_params` for the scorer.

    Cost: the score's own (its scorer's docstring), once; nothing when the run is stored.
    """

    name = "score"
    kind: str = MaskConfig.kind

    def __post_init__(self):
        from headlab.scorers import kinds

        if self.kind not in kinds():
            raise ValueError(f"Mask source 'score': kind must be one of {', '.join(kinds())}; got {self.kind!r}.")
        super().__post_init__()

    def score_kind(self) -> str:
        return self.kind
