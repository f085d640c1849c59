"""`retrieval`: the KV heads of the strongest retrieval heads (Wu et al. 2024) stay full.

A retrieval head copies the needle token by token while the model answers a needle-in-a-haystack
question (`headlab.scorers.retrieval`); this is what RazorAttention and DuoAttention call the heads
that must see the whole context. The same mask as `make_mask(lab, "score", kind="retrieval")`.
"""
from __future__ import annotations

from dataclasses import dataclass

from headlab.mask_sources.score import ScoredSource


@dataclass(frozen=True)
class Retrieval(ScoredSource):
    """The top KV heads by retrieval score (`hl.score(lab, "retrieval", **score_params)`).

    Cost: the retrieval score's: greedy generation on every needle prompt (lengths x depths x n), each
    step keeping only the newest query's attention row, so time grows with prompts x prompt length x
    model size and memory with one prompt's KV cache; nothing when the run is stored (the embedded
    model's default run is shipped).
    """

    name = "retrieval"

    def score_kind(self) -> str:
        return "retrieval"
