"""`razor`: RazorAttention's choice of full heads (Tang et al. 2024, "RazorAttention: Efficient KV Cache
Compression Through Retrieval Heads"), for RoPE models.

RazorAttention calls a head a retrieval head when it is an *echo* head or an *induction* head, both
found on repeated random tokens (no task data): on a random sequence followed by itself,

    echo(h)      = attention from a repeated token to its earlier occurrence(s)     (the same token)
    induction(h) = attention from a repeated token to the token after its earlier occurrence

These are TransformerLens' duplicate-token and induction detection targets, scored by
`headlab.scorers.attention_patterns` (`duplicate_token`, `induction`). The paper keeps a small share of
echo heads and a larger share of induction heads full (1% echo and 14% induction of all heads, 15% in
all): at a budget of k KV heads this source takes `round(echo_share * k)` KV heads by echo score first
(the paper's 1/15 by default), then fills the budget with the best remaining KV heads by induction
score, so the mask has exactly k full KV heads. Differences from the paper: the scorers repeat the
random sequence twice (the paper several times) and scores are per query head, reduced to KV heads by
the group's max, as for every source.

The paper also gives every streaming head a compensation token (the mean of the keys and values it
evicted); that is a runtime option, not a choice of heads: the mask records `compensate: true` as the
paper's recommendation for the runtime that runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.lab import Lab
from headlab.mask_sources import MaskSource
from headlab.masks import HeadMask, MaskConfig, group_scores
from headlab.mask_sources.score import GROUPS

ECHO, INDUCTION = "duplicate_token", "induction"


@dataclass(frozen=True)
class Razor(MaskSource):
    """Echo heads, then induction heads, kept full (RazorAttention); `score_params` go to both pattern scorers.

    Cost: two pattern scores (`duplicate_token`, `induction`): one forward pass per batch of `n` sequences
    of `2 * seq_len + 1` tokens each, every layer's `[batch, head, pos, pos]` pattern kept: time ~ n x
    model size x pos, memory ~ batch x layers x pos^2; nothing when both runs are stored (the embedded
    model's default runs are shipped).
    """

    name = "razor"
    ranks_by_value = False  # two scores
    echo_share: float = 1 / 15
    group: str = "max"
    score_params: dict | None = None

    def __post_init__(self):
        from headlab.scorers import make_scorer

        if not 0.0 <= self.echo_share <= 1.0:
            raise ValueError(f"Mask source 'razor': echo_share must be in [0, 1] (the share of the budget given to "
                             f"echo heads; the paper's is 1/15), got {self.echo_share}.")
        if self.group not in GROUPS:
            raise ValueError(f"Mask source 'razor': group must be 'max' or 'mean', not {self.group!r}.")
        for kind in (ECHO, INDUCTION):
            make_scorer(kind, **(self.score_params or {}))

    def make(self, lab: Lab, config: MaskConfig) -> HeadMask:
        from headlab.scorers import score

        runs = {kind: score(lab, kind, **(self.score_params or {})) for kind in (ECHO, INDUCTION)}
        echo, induction = (group_scores(runs[kind].values, lab.info.n_kv_heads, self.group) for kind in (ECHO, INDUCTION))
        k = config.n_full(echo.numel())
        full = choose_echo_then_induction(echo, induction, k, round(self.echo_share * k))
        budget = {"full_fraction": float(config.full_fraction), "n_full": k, "n_echo": round(self.echo_share * k)}
        seconds = sum(run.meta.get("seconds") or 0.0 for run in runs.values())
        return HeadMask.for_model(lab.info, full, config.sink, config.recent, self.record(
            budget=budget, compensate=True, seconds=seconds, echo=echo.tolist(), induction=induction.tolist(),
            score_params={kind: run.params for kind, run in runs.items()}))


def choose_echo_then_induction(echo: torch.Tensor, induction: torch.Tensor, k: int, n_echo: int) -> torch.Tensor:
    """`[n_layers, n_kv_heads]` bool with exactly `k` True: the `n_echo` best KV heads by `echo`, then the best
    of the rest by `induction` (both `[n_layers, n_kv_heads]`), ties to the earlier head."""
    order_echo = torch.argsort(echo.flatten(), descending=True, stable=True)
    order_induction = torch.argsort(induction.flatten(), descending=True, stable=True)
    chosen = order_echo[:min(n_echo, k)].tolist()
    taken = set(chosen)
    chosen += [i for i in order_induction.tolist() if i not in taken][:k - len(chosen)]
    full = torch.zeros(echo.numel(), dtype=torch.bool)
    full[chosen] = True
    return full.reshape(echo.shape)
