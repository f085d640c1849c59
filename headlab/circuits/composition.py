"""Q-, K- and V-composition scores of every earlier head into every later head (Elhage et al. 2021).

    score(A -> B) = ‖W_A^OV · W_B^side‖_F / (‖W_A^OV‖_F · ‖W_B^side‖_F)

with `W^side` the receiver's reader for the kind (`HeadWeights.reader`). Everything stays factored
(TransformerLens `FactoredMatrix`): `‖W_A^OV X‖_F = ‖S_A V_Aᵀ X‖_F` and `‖Y W_B^side‖_F = ‖Y U_B S_B‖_F`,
so one score is the norm of a `[d_head, d_head]` product, never a `[d_model, d_model]` one.

A score means little on its own: the map carries the same score for random Gaussian matrices of
the same shapes (mean, std, 99th percentile) so a user sees which pairs stand out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformer_lens import FactoredMatrix

from headlab import store
from headlab.heads import Head, HeadGrid, head_label
from headlab.lab import Lab
from headlab.circuits.weights import HeadWeights, check_kind, folded_weights

FORMAT = "headlab.composition_map/v1"
KIND_NAMES = {"q": "Q-composition", "k": "K-composition", "v": "V-composition"}


def factored_score(left: FactoredMatrix, right: FactoredMatrix) -> torch.Tensor:
    """`‖left @ right‖_F / (‖left‖_F ‖right‖_F)` for matching leading dims, from the factored forms."""
    product = left.collapse_l() @ right.collapse_r()
    return product.norm(dim=(-2, -1)) / left.norm() / right.norm()


@torch.no_grad()
def all_pair_scores(ov: FactoredMatrix, readers: FactoredMatrix, progress: Callable[[float, str], None] | None = None) -> torch.Tensor:
    """Composition of every head's OV into every later head's reader.

    Args:
        ov: `[layer, head, d_model, d_model]` senders' OV circuits.
        readers: `[layer, head, d_model, d_model]` receivers' input sides.
    Returns:
        `[layer, head, layer, head]` (sender layer, sender head, receiver layer, receiver head);
        0 wherever the receiver's layer is not after the sender's.
    """
    left, right = ov.collapse_l(), readers.collapse_r()  # [L, H, m, d], [L, H, d, m]
    left_norm, right_norm = ov.norm(), readers.norm()  # [L, H]
    n_layers, n_heads, rank, d_model = left.shape
    scores = torch.zeros(n_layers, n_heads, n_layers, n_heads)
    for layer in range(n_layers - 1):
        later = right[layer + 1 :]  # [L', H, d, m]
        n_later, rank_r = later.shape[0], later.shape[-1]
        flat = later.permute(2, 0, 1, 3).reshape(d_model, -1)  # [d, L' * H * m]
        product = (left[layer].reshape(n_heads * rank, d_model) @ flat).reshape(n_heads, rank, n_later, n_heads, rank_r)
        norms = product.pow(2).sum(dim=(1, 4)).sqrt()  # [H, L', H]
        scores[layer, :, layer + 1 :] = norms / left_norm[layer][:, None, None] / right_norm[layer + 1 :][None]
        if progress:
            progress((layer + 1) / (n_layers - 1), f"composition from layer {layer}")
    return scores


@torch.no_grad()
def random_baseline(d_model: int, d_head: int, n_samples: int = 256, seed: int = 0) -> dict:
    """Composition score of random Gaussian matrices shaped like a head's OV and reader.

    Every reader (Q, K or V side) is a `[d_model, d_head] @ [d_head, d_model]` product like the OV
    circuit, so one distribution serves all three kinds. The score ignores each factor's scale.
    """
    gen = torch.Generator().manual_seed(seed)

    def factored() -> FactoredMatrix:
        return FactoredMatrix(torch.randn(n_samples, d_model, d_head, generator=gen), torch.randn(n_samples, d_head, d_model, generator=gen))

    values = factored_score(factored(), factored())
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "q99": float(values.quantile(0.99)),
        "max": float(values.max()),
        "n_samples": n_samples,
        "seed": seed,
        "what": f"Gaussian [{d_model}x{d_head}]@[{d_head}x{d_model}] sender and receiver",
    }


@torch.no_grad()
def pair_score(weights: HeadWeights, sender: Head, receiver: Head, kind: str, rotary: torch.Tensor | None = None) -> float:
    """One pair's composition score; with `rotary` R(Δ) `[d_head, d_head]` the Q/K reader is the
    bilinear form at relative offset Δ (query position minus key position), `W_Q R(Δ) W_Kᵀ`."""
    kind = check_kind(kind)
    reader = weights.reader(*receiver, kind)
    if rotary is not None:
        if kind == "v":
            raise ValueError("Rotary turns queries and keys only; V-composition does not depend on it.")
        layer, head = receiver
        W_Q, W_K = weights.W_Q[layer, head], weights.W_K[layer, weights.kv_head(head)]
        reader = FactoredMatrix(W_Q @ rotary, W_K.T) if kind == "q" else FactoredMatrix(W_K, rotary.T @ W_Q.T)
    return float(factored_score(weights.ov(*sender), reader))


@dataclass
class CompositionMap(HeadGrid):
    """Composition scores of one kind for every (earlier sender, later receiver) head pair.

    Attributes:
        values: `[layer, head, layer, head]`, sender first; 0 where the receiver is not later.
        baseline: the random-matrix score distribution (`random_baseline`).
    """

    model: str
    kind: str
    fold_ln: bool
    values: torch.Tensor
    baseline: dict
    meta: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return f"{KIND_NAMES[self.kind]} of every head pair — {self.model}"

    def valid(self) -> torch.Tensor:
        """`[layer, head, layer, head]` bool: True where the receiver's layer is after the sender's."""
        layers = torch.arange(self.n_layers)
        later = layers[:, None] < layers[None, :]
        return later[:, None, :, None].expand_as(self.values)

    def score(self, sender: Head, receiver: Head) -> float:
        return float(self.values[sender[0], sender[1], receiver[0], receiver[1]])

    def _in_range(self, layers: tuple[int, int] | None) -> torch.Tensor:
        low, high = layers if layers is not None else (0, self.n_layers - 1)
        keep = (torch.arange(self.n_layers) >= low) & (torch.arange(self.n_layers) <= high)
        return keep

    def top(self, k: int = 10, layers: tuple[int, int] | None = None) -> list[tuple[Head, Head, float]]:
        """The `k` strongest pairs `((s_layer, s_head), (r_layer, r_head), score)` with both heads in `layers`."""
        keep = self._in_range(layers)
        mask = self.valid() & keep[:, None, None, None] & keep[None, None, :, None]
        flat = torch.where(mask, self.values, torch.tensor(float("-inf"))).flatten()
        order = torch.argsort(flat, descending=True, stable=True)[: max(0, min(k, int(mask.sum())))]
        H, L = self.n_heads, self.n_layers
        rows = []
        for index in order.tolist():
            sl, rest = divmod(index, H * L * H)
            sh, rest = divmod(rest, L * H)
            rl, rh = divmod(rest, H)
            rows.append(((sl, sh), (rl, rh), float(flat[index])))
        return rows

    def z_score(self, value: float) -> float:
        """How many random-baseline standard deviations `value` lies above the baseline mean."""
        return (value - self.baseline["mean"]) / self.baseline["std"]

    def fraction_above(self, threshold: float | None = None) -> float:
        """Share of valid pairs scoring above `threshold` (default: the baseline's 99th percentile)."""
        threshold = self.baseline["q99"] if threshold is None else threshold
        valid = self.values[self.valid()]
        return float((valid > threshold).float().mean())

    def to_frame(self, k: int = 20, layers: tuple[int, int] | None = None):
        """pandas: the top `k` pairs with their score and z-score against random matrices."""
        import pandas as pd

        rows = [
            {"sender": head_label(*s), "receiver": head_label(*r), "score": round(v, 4), "z_vs_random": round(self.z_score(v), 1)}
            for s, r, v in self.top(k, layers)
        ]
        return pd.DataFrame(rows, columns=["sender", "receiver", "score", "z_vs_random"])

    def heatmap(self, layers: tuple[int, int] | None = None, title: str | None = None):
        """Plotly heatmap: senders on the y axis, receivers on the x axis, heads of `layers` only.

        Pairs whose receiver is not later than the sender are blank. The colour scale starts at
        the random baseline's mean so only pairs above chance light up.
        """
        from headlab.viz import head_heatmap

        keep = self._in_range(layers)
        chosen = torch.nonzero(keep).flatten()
        block = self.values[chosen][:, :, chosen].reshape(len(chosen) * self.n_heads, len(chosen) * self.n_heads)
        valid = self.valid()[chosen][:, :, chosen].reshape(block.shape)
        labels = [head_label(layer, head) for layer in chosen.tolist() for head in range(self.n_heads)]
        return head_heatmap(
            torch.where(valid, block, torch.tensor(float("nan"))),
            title or f"{self.title} (random matrices: {self.baseline['mean']:.3f} ± {self.baseline['std']:.3f})", "score",
            x=labels, y=labels, x_title="receiver (later head)", y_title="sender (earlier head)",
            hovertemplate="sender %{y} → receiver %{x}<br>score %{z:.3f}<extra></extra>",
            zmin=self.baseline["mean"], zmax=float(block[valid].max()) if valid.any() else 1.0, height=760,
        )

    # --- storage -------------------------------------------------------------------------------

    def params(self) -> dict:
        return composition_params(self.kind, self.fold_ln, self.baseline["n_samples"], self.baseline["seed"])

    def path(self, root: Path | None = None) -> Path:
        return store.run_path(self.meta.get("slug") or store.slugify(self.model), "composition", self.params(), root)

    def save(self, path: Path | None = None) -> Path:
        return store.write_record(Path(path) if path else self.path(), {
            "format": FORMAT, "record": "composition_map", "kind": self.kind, "model": self.model,
            "params": self.params(), "baseline": self.baseline, "meta": self.meta,
        }, {"values": self.values}, file_key="values_file")

    @classmethod
    def load(cls, path: Path | str) -> "CompositionMap":
        path = Path(path)
        record = store.read_record(path, FORMAT, "composition-map")
        values = store.read_tensors(path.parent / record["values_file"])["values"]
        return cls(model=record["model"], kind=record["kind"], fold_ln=record["params"]["fold_ln"], values=values,
                   baseline=record["baseline"], meta=record.get("meta", {}))


def composition_params(kind: str, fold_ln: bool, baseline_samples: int, seed: int) -> dict:
    return {"kind": kind, "fold_ln": fold_ln, "baseline_samples": baseline_samples, "seed": seed}


FOLD_LN, BASELINE_SAMPLES, BASELINE_SEED = True, 256, 0  # composition_map's defaults (the stored maps' key)


def composition_map(
    lab: Lab,
    kind: str = "k",
    *,
    fold_ln: bool = FOLD_LN,
    baseline_samples: int = BASELINE_SAMPLES,
    seed: int = BASELINE_SEED,
    recompute: bool = False,
    save: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> CompositionMap:
    """Composition scores of `kind` ("q", "k" or "v") for all head pairs of `lab`, from the store when there.

    Returns a `CompositionMap` whose `values` are `[layer, head, layer, head]`.
    """
    kind = check_kind(kind)
    path = store.run_path(lab.info.slug, "composition", composition_params(kind, fold_ln, baseline_samples, seed))
    return store.cached_run(path, CompositionMap.load,
                            lambda: _compute_map(lab, kind, fold_ln, baseline_samples, seed, progress), recompute=recompute, save=save)


def stored_map(lab: Lab, kind: str = "k") -> CompositionMap | None:
    """The stored composition map of `kind` with `composition_map`'s default parameters, or None (nothing computed)."""
    path = store.run_path(lab.info.slug, "composition", composition_params(check_kind(kind), FOLD_LN, BASELINE_SAMPLES, BASELINE_SEED))
    return store.stored_run(path, CompositionMap.load)


def _compute_map(lab: Lab, kind: str, fold_ln: bool, baseline_samples: int, seed: int,
                 progress: Callable[[float, str], None] | None) -> CompositionMap:
    weights = folded_weights(lab, fold_ln)
    values = all_pair_scores(weights.all_ov(), weights.all_readers(kind), progress=progress)
    return CompositionMap(
        model=lab.info.name, kind=kind, fold_ln=fold_ln, values=values,
        baseline=random_baseline(weights.d_model, weights.W_Q.shape[-1], baseline_samples, seed),
        meta={"slug": lab.info.slug, "group_size": weights.group_size, "n_kv_heads": weights.n_kv_heads,
              "weights": "ln1 weight folded into W_Q/W_K/W_V" if fold_ln else "raw TransformerBridge weights",
              "rotary": "un-rotated W_Q/W_K (relative offset 0)"},
    )
