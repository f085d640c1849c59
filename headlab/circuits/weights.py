"""Per-head weights as composition analysis reads them: norm weights folded in, GQA resolved, rotary made explicit.

Convention (TransformerLens): row vectors, a head reads `x @ W_Q` and writes `z @ W_O`.

- **Norm folding.** A head reads `ln1(x) = x / rms(x) * g` (RMSNorm), so its effective input
  weights are `diag(g) @ W_Q` (likewise `W_K`, `W_V`). `folded_weights` multiplies each layer's
  ln1 weight into the rows of that layer's `W_Q`, `W_K`, `W_V` (for LayerNorm models it also
  removes the rows' mean, as LayerNorm's centring does). The remaining `1 / rms(x)` is one scalar
  per token: it changes how loud a read is, never which residual direction is read, so it is left
  out. `W_O` writes straight into the residual stream and is not changed. With `fold_ln=False`
  the weights are exactly what `TransformerBridge.W_Q` etc. return.
- **Grouped-query attention.** `W_K` and `W_V` hold one matrix per KV head
  (`[layer, kv_head, d_model, d_head]`); query head `h` reads KV head `h // group_size`
  (`group_size = n_heads // n_kv_heads`), the `repeat_interleave` layout of Hugging Face's
  `repeat_kv` and of `TransformerBridge._expand_kv_heads`.
- **Rotary.** `W_Q` / `W_K` are the un-rotated projections (the weights before rotary, what
  `hook_q` / `hook_k` see). Rotary multiplies q at position p and k at position j by rotations
  of d_head space, so the real bilinear form is `W_Q @ R(p - j) @ W_K.T`; the un-rotated
  `W_Q @ W_K.T` is the form at relative offset 0. Which residual directions a head reads (the
  column spaces of `W_Q`, `W_K`) does not depend on rotary at all; how query and key directions
  pair up does. `rotary_rotation` gives `R(offset)` so that dependence can be measured.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformer_lens import FactoredMatrix

from headlab.heads import Head, check_head, head_label
from headlab.lab import Lab

KINDS = ("q", "k", "v")
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class HeadWeights:
    """Stacked attention weights of a model (float32, CPU, detached).

    Attributes:
        W_Q: `[layer, head, d_model, d_head]`.
        W_K: `[layer, kv_head, d_model, d_head]`.
        W_V: `[layer, kv_head, d_model, d_head]`.
        W_O: `[layer, head, d_head, d_model]`.
        fold_ln: whether each layer's ln1 weight is folded into W_Q, W_K, W_V.
    """

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    fold_ln: bool

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.W_K.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_Q.shape[2]

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head that query head `head` reads its keys and values from."""
        return head // self.group_size

    def expanded(self, weight: torch.Tensor) -> torch.Tensor:
        """`[layer, kv_head, ...]` -> `[layer, head, ...]`: each query head gets its KV head's matrix."""
        return weight.repeat_interleave(self.group_size, dim=1)

    # --- one head's circuits (FactoredMatrix [d_model, d_model]) --------------------------------

    def ov(self, layer: int, head: int) -> FactoredMatrix:
        """What the head writes given what it reads: `W_V @ W_O`, residual in -> residual out."""
        return FactoredMatrix(self.W_V[layer, self.kv_head(head)], self.W_O[layer, head])

    def reader(self, layer: int, head: int, kind: str) -> FactoredMatrix:
        """The head's input side for `kind`, rows indexing the residual direction it reads.

        - "q": `W_Q @ W_K.T`, the query side of the QK circuit (rows: what the query reads).
        - "k": `W_K @ W_Q.T`, the key side (rows: what the key reads).
        - "v": `W_V @ W_O`, the OV circuit (rows: what the value reads).
        A sender A composes into this reader by `ov_A @ reader` (Elhage et al.'s Q/K/V-composition).
        """
        kv = self.kv_head(head)
        if kind == "q":
            return FactoredMatrix(self.W_Q[layer, head], self.W_K[layer, kv].T)
        if kind == "k":
            return FactoredMatrix(self.W_K[layer, kv], self.W_Q[layer, head].T)
        if kind == "v":
            return FactoredMatrix(self.W_V[layer, kv], self.W_O[layer, head])
        raise ValueError(f"Composition kind must be one of {', '.join(KINDS)}; got {kind!r}.")

    # --- every head at once (FactoredMatrix [layer, head, d_model, d_model]) ------------------

    def all_ov(self) -> FactoredMatrix:
        return FactoredMatrix(self.expanded(self.W_V), self.W_O)

    def all_readers(self, kind: str) -> FactoredMatrix:
        """`reader(layer, head, kind)` for every head, stacked `[layer, head, d_model, d_model]`."""
        W_K, W_V = self.expanded(self.W_K), self.expanded(self.W_V)
        if kind == "q":
            return FactoredMatrix(self.W_Q, W_K.transpose(-2, -1))
        if kind == "k":
            return FactoredMatrix(W_K, self.W_Q.transpose(-2, -1))
        if kind == "v":
            return FactoredMatrix(W_V, self.W_O)
        raise ValueError(f"Composition kind must be one of {', '.join(KINDS)}; got {kind!r}.")


def check_kind(kind: str) -> str:
    """'Q'/'k'/... -> 'q'/'k'/'v', or `ValueError` naming the choices."""
    normal = str(kind).strip().lower()
    if normal not in KINDS:
        raise ValueError(f"Composition kind must be one of {', '.join(KINDS)} (query, key, value); got {kind!r}.")
    return normal


def _norm_weight(module) -> tuple[torch.Tensor | None, bool]:
    """(scale vector, is LayerNorm) of a bridge norm component; (None, False) when it has no weight."""
    weight = getattr(module, "weight", None) if module is not None else None
    if weight is None:
        return None, False
    is_layer_norm = getattr(module, "bias", None) is not None
    return weight.detach().float().cpu(), is_layer_norm


def _fold(weight: torch.Tensor, scale: torch.Tensor, center: bool) -> torch.Tensor:
    """`[head, d_model, d_head]` with `scale` `[d_model]` multiplied into its rows (and rows centred)."""
    folded = weight * scale[None, :, None]
    return folded - folded.mean(dim=1, keepdim=True) if center else folded


def ln1_scale(lab: Lab, layer: int) -> tuple[torch.Tensor | None, bool]:
    """The ln1 weight `[d_model]` of `layer` as the model applies it, and whether it is a LayerNorm."""
    block = lab.model.blocks[layer]
    weight, is_layer_norm = _norm_weight(getattr(block, "ln1", None))
    if weight is not None and getattr(lab.model.cfg, "rmsnorm_uses_offset", False):
        weight = 1.0 + weight  # Gemma-style RMSNorm stores the scale as an offset from 1
    return weight, is_layer_norm


def folded_weights(lab: Lab, fold_ln: bool = True) -> HeadWeights:
    """The model's attention weights, ln1 folded in unless `fold_ln=False` (cached per model)."""
    per_model = _CACHE.setdefault(lab.model, {})
    if fold_ln in per_model:
        return per_model[fold_ln]
    with torch.no_grad():
        W_Q, W_K, W_V, W_O = (getattr(lab.model, name).detach().float().cpu() for name in ("W_Q", "W_K", "W_V", "W_O"))
        if fold_ln:
            W_Q, W_K, W_V = W_Q.clone(), W_K.clone(), W_V.clone()
            for layer in range(W_Q.shape[0]):
                scale, center = ln1_scale(lab, layer)
                if scale is None:
                    continue
                W_Q[layer], W_K[layer], W_V[layer] = (_fold(w[layer], scale, center) for w in (W_Q, W_K, W_V))
    if W_Q.shape[1] % W_K.shape[1]:
        raise ValueError(f"{lab.info.name}: {W_Q.shape[1]} query heads do not split evenly over {W_K.shape[1]} KV heads.")
    weights = HeadWeights(W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, fold_ln=fold_ln)
    per_model[fold_ln] = weights
    return weights


def check_pair(lab: Lab, sender: Head, receivers: list[Head]) -> None:
    """Heads must exist and every receiver must sit in a later layer than the sender."""
    check_head(lab.info, *sender)
    for receiver in receivers:
        check_head(lab.info, *receiver)
        if receiver[0] <= sender[0]:
            raise ValueError(
                f"{head_label(*receiver)} cannot read {head_label(*sender)}: a head only reads what "
                "earlier layers wrote, so the receiver's layer must be greater than the sender's."
            )


def rotary_frequencies(lab: Lab) -> torch.Tensor | None:
    """The model's rotary inverse frequencies `[d_head // 2]`, or None for a model without rotary.

    Read from the running model (its `inv_freq` buffer), not from the config: on the embedded
    model `bridge.cfg.rotary_base` says 10000 while the weights run with rope_theta = 100000.
    """
    for module in lab.hf_model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            return inv_freq.detach().float().cpu()
    return None


def rotary_rotation(inv_freq: torch.Tensor, offset: int) -> torch.Tensor:
    """`[d_head, d_head]` R with `rotated = x @ R` for Hugging Face's rotate-half rotary at position `offset`.

    Dimension i pairs with i + d_head/2 and turns by `offset * inv_freq[i]`. Since R(p) @ R(j).T =
    R(p - j), the score of a query at p and a key at j is `q @ R(p - j) @ k.T`.
    """
    half = inv_freq.shape[0]
    angle = offset * inv_freq
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(2 * half, 2 * half)
    idx = torch.arange(half)
    rotation[idx, idx] = cos
    rotation[idx + half, idx + half] = cos
    rotation[idx + half, idx] = -sin
    rotation[idx, idx + half] = sin
    return rotation
