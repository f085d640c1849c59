"""Loss on the second copy of a repeated random token sequence: what induction heads make low."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from headlab.datasets import data
from headlab.tasks import Hook, Task, register


@register
class RepeatedTokens(Task):
    """Cross-entropy of predicting the second copy of `[BOS] A A` (A = `seq_len` random tokens).

    An intact model copies A the second time round, so the loss is far below the first copy's;
    breaking induction heads raises it.
    """

    name = "repeated_tokens"
    metric = "loss on the second copy (nats/token)"
    higher_is_better = False

    def __init__(self, lab, n=None, seed=0, seq_len: int = 48, batch_size: int = 8):
        super().__init__(lab, n=n, seed=seed, seq_len=seq_len, batch_size=batch_size)
        # The task's own seed stream is offset so its sequences differ from the scorers' defaults.
        self.tokens = data.repeated_random_tokens(lab, self.n, seq_len, 10_000 + seed)
        self.seq_len, self.batch_size = seq_len, batch_size

    def reference_tokens(self) -> torch.Tensor:
        return data.repeated_random_tokens(self.lab, self.n, self.seq_len, 20_000 + self.seed)

    @torch.no_grad()
    def evaluate(self, hooks: list[Hook] | None = None) -> float:
        offset = self.tokens.shape[1] - self.seq_len  # first position of the second copy
        losses = []
        with self.lab.model.hooks(fwd_hooks=hooks or []):
            for batch in self.tokens.split(self.batch_size):
                batch = batch.to(self.lab.device)
                logits = self.lab.model(batch, return_type="logits").float()
                # logits at position p predict token p + 1: predictions for the second copy
                pred = logits[:, offset - 1 : -1]
                losses.append(F.cross_entropy(pred.flatten(0, 1), batch[:, offset:].flatten(), reduction="none"))
        return float(torch.cat(losses).mean())
