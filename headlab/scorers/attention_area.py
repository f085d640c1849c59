"""Attention area outside the streaming window: how much a head would lose if it kept only sink + recent tokens.

kvpress scores heads on the fly by where their attention falls; the training-free question behind a
DuoAttention-style mask is the same: a head whose attention stays on the first `sink` tokens and the
last `recent` ones loses nothing when it streams. For every head, over the queries that have keys
outside the window (positions `q >= sink + recent`):

    area(h) = mean over those queries of  sum_{k: sink <= k <= q - recent} pattern[h, q, k]

i.e. the attention mass a streaming head would drop (0 = streams for free, 1 = all its attention is
on evicted tokens), averaged over `n` prose windows of `seq_len` tokens. Higher = keep the head full.
The window defaults are the head masks' own (`MaskConfig`), so the score answers the mask's question.

The texts run through `headlab.longpass.prefill` (chunked SDPA with the KV cache); a read-only hook on each
layer's `hook_pattern` receives exactly recomputed blocks of pattern rows and keeps only their sums, so no
`[seq_len, seq_len]` pattern is ever held.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from headlab.ablation.methods import streaming_window_allowed
from headlab.activations import act_name, reads_only
from headlab.datasets import domains
from headlab.lab import Lab
from headlab.longpass import pass_bytes, prefill
from headlab.masks import MaskConfig
from headlab.scorers import Scorer
from headlab.scores import HeadScores


def evicted_sums(pattern: torch.Tensor, sink: int, recent: int) -> tuple[torch.Tensor, int]:
    """Attention `[batch, head, q, k]` of the last `q` of `k` positions -> (`[batch, head]` the summed mass outside
    sink + recent over the queries that evict any key, how many such queries)."""
    n_q, n_k = pattern.shape[-2:]
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=pattern.device).tril(n_k - n_q)
    outside = ~streaming_window_allowed(n_q, n_k, sink, recent, pattern.device) & causal
    queries = outside.any(-1)  # [q]: queries with at least one evicted key
    mass = (pattern.float() * outside).sum(-1)  # [batch, head, q]
    return mass[..., queries].sum(-1), int(queries.sum())


def evicted_mass(pattern: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """`[batch, head, q, k]` attention -> `[batch, head]`: mean mass outside sink + recent, over queries that evict any key."""
    total, count = evicted_sums(pattern, sink, recent)
    return total / count


@dataclass(frozen=True)
class AttentionArea(Scorer):
    """Attention mass each head puts outside the first `sink` and last `recent` tokens, on `domain` text.

    Cost: one chunked linear pass per batch of `batch_size` of the `n` texts of `seq_len` tokens, every layer's
    pattern recomputed in row blocks and reduced at once to `[batch, head]` sums. Time grows with
    n x (weights x seq_len + 2 x layers x heads x d_head x seq_len^2); memory linearly with batch_size x seq_len
    (the KV cache plus one chunk and one row block, `longpass.pass_bytes`), never seq_len^2. Refused up front
    when that exceeds free memory.
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
        batch_size = min(self.batch_size, self.n)
        lab.require_memory(pass_bytes(lab, self.seq_len, batch_size, reads_pattern=True),
                           f"attention_area on {batch_size} texts of {self.seq_len} tokens", "lower seq_len or batch_size")
        tokens = domains.domain_tokens(lab, self.domain, self.n, self.seq_len, self.seed)  # [n, seq_len]
        per_text = torch.cat([self._area(lab, batch) for batch in tokens.split(self.batch_size)])  # [n, layer, head]
        return self.result(lab, per_text.mean(0), {"per_text": per_text}, meta={
            "metric": f"attention mass outside the first {self.sink} and last {self.recent} tokens on {self.domain} "
                      f"({self.seq_len} tokens), mean over queries that evict any key",
            "n_samples": int(per_text.shape[0]),
        })

    def _area(self, lab: Lab, tokens: torch.Tensor) -> torch.Tensor:
        """`[batch, layer, head]` evicted mass of `tokens` `[batch, seq_len]`, from one linear pass."""
        sums = {layer: [0.0, 0] for layer in range(lab.info.n_layers)}  # layer -> [mass [batch, head], queries]

        def add(layer: int, pattern: torch.Tensor, hook=None) -> None:
            total, count = evicted_sums(pattern, self.sink, self.recent)
            sums[layer][0] = sums[layer][0] + total
            sums[layer][1] += count

        hooks = [(act_name("pattern", layer), reads_only(partial(add, layer))) for layer in sums]
        with lab.model.hooks(fwd_hooks=hooks):
            prefill(lab, tokens)
        return torch.stack([total / count for total, count in sums.values()], 1).cpu()
