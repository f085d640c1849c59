"""`hl.channels(lab, sender, receiver, kind)`: the sender's composition into each singular direction of the receiver.

Talking Heads (Merullo et al. 2024) decomposes the receiver's input side by SVD,
`W_B^side = Σ_i s_i u_i v_iᵀ` (u_i: orthonormal residual directions the receiver reads), and scores
the sender against each rank-1 piece:

    c_i = ‖W_A^OV u_i‖ / ‖W_A^OV‖_F          (the composition score of W_A^OV with s_i u_i v_iᵀ)

Since the v_i are orthonormal too, the pair's Elhage score splits exactly over the directions:
`score² = Σ_i s_i² c_i² / Σ_i s_i²`, so `share_i = s_i² c_i² / Σ_j s_j² c_j²` is direction i's part
of the composition and the shares sum to 1. The few directions holding most of it are the channel.
Two yardsticks: a random direction has `E[c_i²] = 1 / d_model`, and a sender with no preference
among the receiver's directions would spread its composition like the spectrum `s_i²`.

A group of receivers (e.g. the top induction heads) is read as one: their input sides are set side
by side, `[W_B1^side | W_B2^side | ...]`, and decomposed together; the group's score is the
Frobenius-weighted pool of the members' scores.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformer_lens import FactoredMatrix

from headlab import store
from headlab.heads import Head, head_label
from headlab.lab import Lab
from headlab.circuits.composition import KIND_NAMES
from headlab.circuits.tokens import direction_tokens
from headlab.circuits.weights import HeadWeights, check_kind, check_pair, folded_weights

FORMAT = "headlab.channel_report/v1"
RANK_TOLERANCE = 1e-5  # directions with s_i below this fraction of s_0 are numerically absent


def as_receivers(receiver) -> list[Head]:
    """`(18, 6)` or `[(18, 6), (17, 3)]` (or `[[18, 6], ...]`) -> a list of distinct `(layer, head)`."""
    if len(receiver) == 2 and all(isinstance(x, numbers.Integral) for x in receiver):
        receiver = [receiver]
    heads: list[Head] = []
    for item in receiver:
        head = (int(item[0]), int(item[1]))
        if head not in heads:
            heads.append(head)
    if not heads:
        raise ValueError("Name at least one receiver head.")
    return heads


def group_label(heads: list[Head]) -> str:
    """A receiver group as one name: 'L18H6+L17H3'."""
    return "+".join(head_label(layer, head) for layer, head in heads)


def stacked_reader(weights: HeadWeights, receivers: list[Head], kind: str) -> FactoredMatrix:
    """`[W_B1^side | W_B2^side | ...]` as one FactoredMatrix `[d_model, n_receivers * d_model]`."""
    readers = [weights.reader(layer, head, kind) for layer, head in receivers]
    if len(readers) == 1:
        return readers[0]
    return FactoredMatrix(torch.cat([r.A for r in readers], dim=1), torch.block_diag(*[r.B for r in readers]))


def n_for_share(shares: torch.Tensor, fraction: float) -> int:
    """How many of `shares` (largest first) it takes to reach `fraction` of their sum."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}.")
    ordered = torch.sort(shares / shares.sum(), descending=True).values
    return min(int((ordered.cumsum(0) < fraction - 1e-9).sum()) + 1, len(ordered))


@dataclass
class ChannelReport:
    """Composition of `sender` into each input direction of `receivers` for one kind (q, k or v).

    Directions are numbered by singular value (0 = largest). Attributes:
        score: the pair's (or group's) Elhage composition score.
        singular_values: `[n_dirs]` s_i of the receiver side.
        composition: `[n_dirs]` c_i, the sender's composition into direction i.
        share: `[n_dirs]` direction i's part of the squared score (sums to 1).
        directions: `[d_model, n_dirs]` orthonormal residual directions u_i the receiver reads.
        sender_modes: `[n_sender_dirs, n_dirs]` signed `s^A_j ⟨v^A_j, u_i⟩ / ‖W_A^OV‖` — which of the
            sender's own OV output directions feed direction i (column norms equal `composition`).
        tokens: per top direction, tokens at both ends (see `headlab.circuits.tokens`).
        baseline: `composition_random` (= 1/sqrt(d_model)), `spectrum_share` `[n_dirs]` as a list.
    """

    model: str
    sender: Head
    receivers: list[Head]
    kind: str
    fold_ln: bool
    score: float
    singular_values: torch.Tensor
    composition: torch.Tensor
    share: torch.Tensor
    directions: torch.Tensor
    sender_modes: torch.Tensor
    tokens: list[dict] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    slug: str = ""  # the store folder of the model (`lab.info.slug`); empty: from the model's name

    @property
    def pair_label(self) -> str:
        return f"{head_label(*self.sender)} → {group_label(self.receivers)} ({KIND_NAMES[self.kind]})"

    @property
    def order(self) -> list[int]:
        """Direction indices by share of the composition, largest first."""
        return torch.argsort(self.share, descending=True, stable=True).tolist()

    def n_directions(self, fraction: float = 0.9) -> int:
        """How many directions hold `fraction` of the composition."""
        return n_for_share(self.share, fraction)

    def n_directions_spectrum_only(self, fraction: float = 0.9) -> int:
        """The same count for a sender with no preference among directions (shares ∝ s_i²)."""
        return n_for_share(self.singular_values.pow(2), fraction)

    def channel_indices(self, fraction: float | None = 0.9, rank: int | None = None) -> list[int]:
        """The channel's direction indices: the top `rank` by share, or as many as hold `fraction`."""
        rank = rank if rank is not None else self.n_directions(fraction)
        if not 1 <= rank <= len(self.share):
            raise ValueError(f"A channel rank must be from 1 to {len(self.share)}; got {rank}.")
        return self.order[:rank]

    def channel(self, fraction: float | None = 0.9, rank: int | None = None) -> torch.Tensor:
        """Orthonormal basis `[d_model, r]` of the channel subspace of the residual stream."""
        return self.directions[:, self.channel_indices(fraction, rank)]

    def summary(self) -> str:
        n50, n90 = self.n_directions(0.5), self.n_directions(0.9)
        top = self.order[0]
        return (
            f"{self.pair_label}: score {self.score:.3f}. {n50} of {len(self.share)} directions hold 50% of the "
            f"composition and {n90} hold 90% (a sender without preference would need "
            f"{self.n_directions_spectrum_only(0.5)} and {self.n_directions_spectrum_only(0.9)}). Top direction {top}: "
            f"composition {float(self.composition[top]):.3f} (random direction {self.baseline['composition_random']:.3f}), "
            f"{100 * float(self.share[top]):.1f}% of the total."
        )

    def to_frame(self):
        """pandas, one row per direction by share: singular value, composition, share, cumulative share."""
        import pandas as pd

        order = self.order
        shares = self.share[order]
        return pd.DataFrame({
            "rank": range(1, len(order) + 1),
            "direction": order,
            "singular_value": self.singular_values[order].numpy().round(4),
            "composition": self.composition[order].numpy().round(4),
            "share": shares.numpy().round(4),
            "cumulative_share": shares.cumsum(0).numpy().round(4),
        })

    def tokens_frame(self):
        """pandas, one row per reported direction: its tokens at both ends."""
        import pandas as pd

        rows = [{
            "direction": row["direction"],
            "share": round(float(self.share[row["direction"]]), 4),
            "sender writes (+)": " ".join(repr(t) for t in row["sender_writes_plus"]),
            "sender writes (−)": " ".join(repr(t) for t in row["sender_writes_minus"]),
            "unembed (+)": " ".join(repr(t) for t in row["unembed_plus"]),
            "unembed (−)": " ".join(repr(t) for t in row["unembed_minus"]),
        } for row in self.tokens]
        return pd.DataFrame(rows, columns=["direction", "share", "sender writes (+)", "sender writes (−)", "unembed (+)", "unembed (−)"])

    def spectrum_figure(self):
        """Plotly: the receiver's singular values (bars) and the sender's composition per direction (line)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        index = list(range(len(self.share)))
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        fig.add_trace(go.Bar(x=index, y=self.singular_values.numpy(), name="singular value s_i", marker_color="lightsteelblue"), secondary_y=False)
        fig.add_trace(go.Scatter(x=index, y=self.composition.numpy(), mode="lines+markers", name="composition c_i", line={"color": "crimson"}), secondary_y=True)
        fig.add_hline(y=self.baseline["composition_random"], line_dash="dot", line_color="crimson", secondary_y=True,
                      annotation_text="random direction")
        fig.update_layout(title=f"Receiver spectrum and sender composition — {self.pair_label}", xaxis_title="direction (by singular value)", height=420)
        fig.update_yaxes(title_text="singular value", secondary_y=False)
        fig.update_yaxes(title_text="composition c_i", secondary_y=True)
        return fig

    def share_figure(self):
        """Plotly: cumulative share of the composition over directions (by share), vs the spectrum-only yardstick."""
        import plotly.graph_objects as go

        n = len(self.share)
        spectrum = torch.sort(self.singular_values.pow(2) / self.singular_values.pow(2).sum(), descending=True).values
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=list(range(1, n + 1)), y=self.share[self.order].cumsum(0).numpy(), mode="lines+markers", name="this sender"))
        fig.add_trace(go.Scatter(x=list(range(1, n + 1)), y=spectrum.cumsum(0).numpy(), mode="lines", line={"dash": "dot", "color": "grey"},
                                 name="sender without preference (∝ s_i²)"))
        for fraction in (0.5, 0.9):
            fig.add_hline(y=fraction, line_dash="dash", line_color="lightgrey")
        fig.update_layout(title=f"Cumulative share of the composition — {self.pair_label}", xaxis_title="number of directions",
                          yaxis_title="share of composition", xaxis={"type": "log"}, height=380)
        return fig

    # --- storage -------------------------------------------------------------------------------

    def params(self) -> dict:
        return report_params(self.sender, self.receivers, self.kind, self.fold_ln, len(self.tokens))

    def path(self, root: Path | None = None) -> Path:
        return store.run_path(self.slug or store.slugify(self.model), "channels", self.params(), root)

    def save(self, path: Path | None = None) -> Path:
        tensors = {"singular_values": self.singular_values, "composition": self.composition, "share": self.share,
                   "directions": self.directions, "sender_modes": self.sender_modes}
        return store.write_record(Path(path) if path else self.path(), {
            "format": FORMAT, "record": "channel_report", "kind": self.kind, "model": self.model, "params": self.params(),
            "score": self.score, "tokens": self.tokens, "baseline": self.baseline, "slug": self.slug,
        }, tensors, file_key="tensors_file")

    @classmethod
    def load(cls, path: Path | str) -> "ChannelReport":
        path = Path(path)
        record = store.read_record(path, FORMAT, "channel-report")
        tensors = store.read_tensors(path.parent / record["tensors_file"])
        params = record["params"]
        return cls(model=record["model"], sender=tuple(params["sender"]), receivers=[tuple(r) for r in params["receivers"]],
                   kind=record["kind"], fold_ln=params["fold_ln"], score=record["score"], tokens=record["tokens"],
                   baseline=record["baseline"], slug=record.get("slug", ""), **tensors)


def report_params(sender: Head, receivers: list[Head], kind: str, fold_ln: bool, token_directions: int) -> dict:
    return {"sender": list(sender), "receivers": [list(r) for r in receivers], "kind": kind, "fold_ln": fold_ln,
            "token_directions": token_directions}


@torch.no_grad()
def decompose(weights: HeadWeights, sender: Head, receivers: list[Head], kind: str) -> dict:
    """The numbers of a `ChannelReport` (no tokens): see the module docstring for the formulas."""
    ov = weights.ov(*sender)
    U, S, _ = stacked_reader(weights, receivers, kind).svd()  # U [d_model, m], S [m]
    keep = S > S[0] * RANK_TOLERANCE
    U, S = U[:, keep], S[keep]
    modes = (ov.collapse_l() @ U) / ov.norm()  # [m_A, n_dirs]: s^A_j <v^A_j, u_i> / ‖ov‖
    composition = modes.norm(dim=0)
    weighted = (S * composition).pow(2)
    return {
        "score": float(weighted.sum().sqrt() / S.pow(2).sum().sqrt()),
        "singular_values": S,
        "composition": composition,
        "share": weighted / weighted.sum(),
        "directions": U,
        "sender_modes": modes,
    }


def channels(lab: Lab, sender: Head, receiver, kind: str = "k", *, fold_ln: bool = True, token_directions: int = 8,
             top_tokens: int = 8) -> ChannelReport:
    """SVD channel report of `sender` (layer, head) into `receiver` (a head or a list of heads).

    Args:
        kind: "k" (the sender feeds the receiver's keys), "q" (queries) or "v" (values).
        fold_ln: fold each head's ln1 weight into its W_Q/W_K/W_V first (recommended).
        token_directions: how many top directions (by share) get token readouts.
        top_tokens: tokens listed at each end of a direction.
    """
    kind = check_kind(kind)
    sender = (int(sender[0]), int(sender[1]))
    receivers = as_receivers(receiver)
    check_pair(lab, sender, receivers)
    weights = folded_weights(lab, fold_ln)
    numbers = decompose(weights, sender, receivers, kind)
    report = ChannelReport(model=lab.info.name, sender=sender, receivers=receivers, kind=kind, fold_ln=fold_ln, **numbers,
                           baseline={"composition_random": weights.d_model ** -0.5}, slug=lab.info.slug)
    chosen = report.order[:token_directions]
    report.tokens = direction_tokens(lab, weights, sender, report.directions[:, chosen], chosen, top_tokens)
    return report
