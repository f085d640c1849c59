"""Which tokens write or read a residual direction, in the spirit of TransformerLens' `SVDInterpreter`.

Two readings of a unit direction `u` `[d_model]`:
- **via the sender**: `norm(W_E[t]) @ W_V @ W_O @ u` — how far the sender pushes along `u` when it
  attends to a position holding token t (the raw token embedding stands in for the residual
  stream there, RMS-normalised as ln1 does, the ln1 weight already folded into `W_V`). A direct
  path estimate: what the real residual at that layer holds is more than the embedding.
- **via the unembedding**: `u @ diag(g_final) @ W_U` — which next-token logits the direction
  would raise if it reached the output (SVDInterpreter's projection onto `W_U`).
The sign of a singular direction is arbitrary, so both ends (+ and −) are listed.
"""
from __future__ import annotations

import torch

from headlab.datasets import data
from headlab.heads import Head
from headlab.lab import Lab
from headlab.circuits.weights import HeadWeights



def _final_norm_scale(lab: Lab) -> torch.Tensor | None:
    weight = getattr(getattr(lab.model, "ln_final", None), "weight", None)
    if weight is None:
        return None
    weight = weight.detach().float().cpu()
    return 1.0 + weight if getattr(lab.model.cfg, "rmsnorm_uses_offset", False) else weight


def _top_strings(lab: Lab, values: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[list[str], list[str]]:
    """Decoded tokens with the `k` highest and `k` lowest `values` (`[n_ids]`, aligned with `ids`)."""
    order = torch.argsort(values, descending=True)
    decode = lambda picks: [lab.tokenizer.decode([int(ids[i])]) for i in picks]  # noqa: E731
    return decode(order[:k].tolist()), decode(order[-k:].flip(0).tolist())


@torch.no_grad()
def direction_tokens(lab: Lab, weights: HeadWeights, sender: Head, directions: torch.Tensor, indices: list[int], k: int = 8) -> list[dict]:
    """For each column of `directions` `[d_model, n]` (named by `indices`), the tokens at both ends.

    Returns one dict per direction: `direction`, `sender_writes_plus/minus`, `unembed_plus/minus`.
    """
    if directions.shape[1] == 0:
        return []
    ids = data.ordinary_token_ids(lab)
    embed = lab.model.W_E.detach().float().cpu()[ids]  # [n_ids, d_model]
    embed = embed / embed.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    layer, head = sender
    write_map = weights.W_O[layer, head] @ directions  # [d_head, n]
    via_sender = (embed @ weights.W_V[layer, weights.kv_head(head)]) @ write_map  # [n_ids, n]
    unembed = lab.model.W_U.detach().float().cpu()[:, ids]  # [d_model, n_ids]
    scale = _final_norm_scale(lab)
    lifted = directions * scale[:, None] if scale is not None else directions
    via_unembed = lifted.T @ unembed  # [n, n_ids]
    rows = []
    for column, index in enumerate(indices):
        writes_plus, writes_minus = _top_strings(lab, via_sender[:, column], ids, k)
        unembed_plus, unembed_minus = _top_strings(lab, via_unembed[column], ids, k)
        rows.append({"direction": int(index), "sender_writes_plus": writes_plus, "sender_writes_minus": writes_minus,
                     "unembed_plus": unembed_plus, "unembed_minus": unembed_minus})
    return rows
