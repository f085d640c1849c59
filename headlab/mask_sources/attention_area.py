"""`attention_area`: kvpress-style on-the-fly scoring, training-free and cheap.

kvpress decides what to evict from where each head's attention falls on the input itself; for a
head mask the question is how much of a head's attention lands outside what a streaming head keeps.
The `attention_area` score (`headlab.scorers.attention_area`) measures exactly that on prose: the
attention mass outside the first `sink` and the last `recent` tokens. The heads that would lose the
most stay full. The score runs at the mask's own window, so it answers this mask's question.
"""
from __future__ import annotations

from dataclasses import dataclass

from headlab.mask_sources.score import ScoredSource
from headlab.masks import MaskConfig


@dataclass(frozen=True)
class AttentionArea(ScoredSource):
    """The top KV heads by attention mass outside sink + recent (`hl.score(lab, "attention_area", sink=, recent=)`).

    `score_params` are the scorer's other parameters (domain, n, seq_len, ...); its `sink` and `recent`
    are always the mask's. Cost: the score's: one forward pass per batch of `n` texts of `seq_len` tokens
    (time ~ n x model size x seq_len^2); memory holds one layer's attention pattern at a time.
    """

    name = "attention_area"

    def __post_init__(self):
        if {"sink", "recent"} & set(self.score_params or {}):
            raise ValueError("Mask source 'attention_area' scores at the mask's own window: give sink and recent "
                             "to make_mask (or --sink/--recent), not in score_params.")
        super().__post_init__()

    def score_kind(self) -> str:
        return "attention_area"

    def scorer_params(self, config: MaskConfig | None) -> dict:
        sink, recent = (config.sink, config.recent) if config is not None else (0, 1)  # no window yet: the smallest
        return {**(self.score_params or {}), "sink": sink, "recent": recent}

    def check(self, lab, config: MaskConfig) -> None:
        from headlab.scorers import make_scorer

        super().check(lab, config)  # the scorer refuses seq_len <= sink + recent
        lab.check_length(make_scorer("attention_area", **self.scorer_params(config)).seq_len, "attention_area text")
