"""Attention area outside the streaming window: how much a head would lose if it kept only sink + recent tokens.

kvpress scores heads on the fly by where their attention falls; the training-free question behind a
DuoAttention-style mask is the same: a head whose attention stays on the first `sink` tokens and the
last `recent` ones loses nothing when it streams. For every head, over the queries that have keys
outside the window (positions `q >= sink + recent`):

    area(h) = mean over those queries of  sum_{k: sink <= k <= q - recent} pattern[h, q, k]

i.e. the attention mass a streaming head would drop (0 = streams for free, 1 = all its attention is
on evicted tokens), averaged over `n` prose windows of `seq_len` tokens. Higher = keep the head full.
The window defaults are the head masks' own (`MaskConfig`), so the score answers the mask's question.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.ablation.methods import streaming_window_allowed
from headlab.activations import act_name, capturing, layer_names
from headlab.datasets import domains
from headlab.lab import Lab
from headlab.masks import MaskConfig
from headlab.scorers import Scorer
from headlab.scores import HeadScores


def evicted_mass(pattern: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """`[batch, head, q, k]` attention -> `[batch, head]`: mean mass outside sink + recent, over queries that evict any key."""
    n = pattern.shape[-1]
    outside = ~streaming_window_allowed(n, n, sink, recent, pattern.device) & torch.ones(n, n, device=pattern.device).tril().bool()
    queries = outside.any(-1)  # [q]: queries with at least one evicted key
    mass = (pattern.float() * outside).sum(-1)  # [batch, head, q]
    return mass[..., queries].mean(-1)


@dataclass(frozen=True)
class AttentionArea(Scorer):
    """Attention mass each head puts outside the first `sink` and last `recent` tokens, on `domain` text.

    Cost: one forward pass per batch of `n` texts of `seq_len` tokens; each layer's pattern is reduced to
    `[batch, head]` inside its hook, so memory holds one layer's `[batch, head, seq_len, seq_len]` at a time
    (quadratic in seq_len, linear in batch); time grows with n x model size x seq_len^2.
    """

    kind = "attention_area"
    domain: str = "prose"
    n: int = 4
    seed: int = 0
    seq_len: int = 1024
    sink: int = MaskConfig.sink
    recent: int = MaskConfig.recent
    batch_size: int = 2

    def __post_init__(self):
        if self.domain not in domains.BUILTIN_DOMAINS:
            raise ValueError(f"attention_area: domain must be one of {', '.join(domains.BUILTIN_DOMAINS)}; got {self.domain!r}.")
        if self.sink < 0 or self.recent < 1 or self.seq_len <= self.sink + self.recent:
            raise ValueError(f"attention_area needs sink >= 0, recent >= 1 and seq_len > sink + recent (else nothing is "
                             f"evicted); got sink={self.sink}, recent={self.recent}, seq_len={self.seq_len}.")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"attention_area needs n >= 1 and batch_size >= 1; got n={self.n}, batch_size={self.batch_size}.")

    @torch.no_grad()
    def compute(self, lab: Lab) -> HeadScores:
        lab.check_length(self.seq_len, "attention_area text")
        tokens = domains.domain_tokens(lab, self.domain, self.n, self.seq_len, self.seed)  # [n, seq_len]
        names = layer_names(lab, "pattern")
        per_text = []
        with capturing(lab, names, lambda p: evicted_mass(p, self.sink, self.recent)) as area:
            for batch in tokens.split(self.batch_size):
                lab.model(batch.to(lab.device), return_type=None)
                per_text.append(torch.stack([area[act_name("pattern", layer)] for layer in range(lab.info.n_layers)], 1).cpu())
        per_text = torch.cat(per_text)  # [n, layer, head]
        return self.result(lab, per_text.mean(0), {"per_text": per_text}, meta={
            "metric": f"attention mass outside the first {self.sink} and last {self.recent} tokens on {self.domain} "
                      f"({self.seq_len} tokens), mean over queries that evict any key",
            "n_samples": int(per_text.shape[0]),
        })
