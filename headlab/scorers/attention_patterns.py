"""Previous-token, duplicate-token and induction heads: how much attention lands where the pattern says.

The target positions come from TransformerLens' own detection patterns
(`transformer_lens.head_detector.get_*_detection_pattern`). Unlike `detect_head`, which divides by
all query rows, a head's score here is its attention mass on the targets averaged over only the
queries that have a target (e.g. the second copy for induction), so 1.0 means a perfect head.
Default prompts: BOS + a random token sequence + the same sequence again (`n` samples).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import head_detector

from headlab.activations import act_name, capture, layer_names
from headlab.datasets import data
from headlab.lab import Lab
from headlab.longpass import eager_pass_bytes
from headlab.scorers import Scorer
from headlab.scores import HeadScores

DETECTION_PATTERNS = {
    "previous_token": head_detector.get_previous_token_head_detection_pattern,
    "duplicate_token": head_detector.get_duplicate_token_head_detection_pattern,
    "induction": head_detector.get_induction_head_detection_pattern,
}


@torch.no_grad()
def attention_mass_on_targets(lab: Lab, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean attention each head puts on the target keys, over queries that have any target.

    Args:
        tokens: `[batch, pos]` token ids.
        targets: `[batch, q_pos, k_pos]` 0/1, the keys each query should attend to.
    Returns:
        `[batch, n_layers, n_heads]`.
    """
    patterns = capture(lab, tokens, layer_names(lab, "pattern"))
    targets = targets.to(lab.device, torch.float32)
    has_target = (targets.sum(-1) > 0).float()  # [batch, q_pos]
    n_queries = has_target.sum(-1).clamp(min=1)  # [batch]
    per_layer = []
    for layer in range(lab.info.n_layers):
        pattern = patterns[act_name("pattern", layer)].float()  # [batch, head, q, k]
        mass = torch.einsum("bhqk,bqk->bhq", pattern, targets)
        per_layer.append((mass * has_target[:, None]).sum(-1) / n_queries[:, None])
    return torch.stack(per_layer, dim=1).cpu()


@dataclass(frozen=True)
class PatternScorer(Scorer):
    """Attention mass on the kind's detection-pattern targets, over `n` repeated random sequences or `prompts`.

    Cost: one eager forward pass per batch of `n` prompts of `2 * seq_len + 1` tokens, keeping every layer's
    `[batch, head, pos, pos]` pattern: time grows with n x (weights x pos + layers x heads x d_head x pos^2), memory
    with batch x layers x heads x pos^2 (quadratic: meant for short prompts; `longpass.eager_pass_bytes`).
    Refused up front when the largest batch would not fit in free memory.
    """

    prompts: list[str] | None = None
    n: int = 16
    seed: int = 0
    seq_len: int = 48
    batch_size: int = 8

    def __post_init__(self):
        for name in ("n", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{self.kind}: {name} must be at least 1; got {getattr(self, name)}.")

    def samples(self, lab: Lab) -> list[torch.Tensor]:
        """`[1, pos]` token rows: the user's prompts (repeated twice, but for previous-token) or the random sequences."""
        if self.prompts:
            return data.texts_to_tokens(lab, self.prompts, repeat=1 if self.kind == "previous_token" else 2)
        return list(data.repeated_random_tokens(lab, self.n, self.seq_len, self.seed).split(1))

    def compute(self, lab: Lab) -> HeadScores:
        samples = self.samples(lab)
        longest = max(sample.shape[1] for sample in samples)
        lab.require_memory(eager_pass_bytes(lab, longest, min(self.batch_size, len(samples)), lab.info.n_layers),
                           f"{self.kind} on {len(samples)} prompts of up to {longest} tokens",
                           "lower batch_size or seq_len (or use shorter prompts)")
        detect = DETECTION_PATTERNS[self.kind]
        per_sample = []
        # Samples of one length are batched; user prompts of different lengths run one by one.
        groups: dict[int, list[torch.Tensor]] = {}
        for sample in samples:
            groups.setdefault(sample.shape[1], []).append(sample)
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                tokens = torch.cat(group[start : start + self.batch_size])
                targets = torch.stack([detect(row[None].cpu()) for row in tokens])
                per_sample.append(attention_mass_on_targets(lab, tokens, targets))
        per_sample = torch.cat(per_sample)
        return self.result(lab, per_sample.mean(0), raw={"per_sample": per_sample}, meta={
            "metric": f"mean attention mass on the {self.kind.replace('_', '-')} target positions", "n_samples": len(samples)})


@dataclass(frozen=True)
class PreviousToken(PatternScorer):
    """Attention from each token to the one just before it."""

    kind = "previous_token"


@dataclass(frozen=True)
class DuplicateToken(PatternScorer):
    """Attention from a repeated token to its earlier occurrences."""

    kind = "duplicate_token"


@dataclass(frozen=True)
class Induction(PatternScorer):
    """Attention from a repeated token to the token after its earlier occurrence."""

    kind = "induction"
