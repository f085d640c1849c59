"""`ModelDiff`: what `hl.diff` returns: weight change per head and MLP, score shifts, and whether changed heads matter.

Tables (`to_frame`, `mlp_frame`, `parameter_frame`, `moved`, `behaviour_frame`), plotly figures
(`figure`: the QK / OV / MLP heatmaps; `score_figure`; `behaviour_figure`), a Markdown `summary`, and
storage as one record (`store.write_record`: the tensors in a safetensors file, the rest in JSON).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from headlab import store
from headlab.ablation.curve import AblationCurve
from headlab.heads import Head, format_heads, head_label
from headlab.scores import ranked

FORMAT = "headlab.model_diff/v1"


def ranks(values: torch.Tensor) -> torch.Tensor:
    """`[n_layers, n_heads]` -> the same shape of ranks, 1 = highest value (NaN last), as `HeadScores.top` orders."""
    flat = values.flatten()
    out = torch.empty(flat.shape, dtype=torch.long)
    out[ranked(flat)] = torch.arange(1, len(flat) + 1)
    return out.view(values.shape)


@dataclass
class ModelDiff:
    """Model B against model A, head by head.

    Attributes:
        model_a, model_b: the two models' names.
        params: the run's key: both models' names and fingerprints and the `DiffConfig`.
        qk, ov: `[n_layers, n_heads]` relative change of each head's QK / OV circuit, ||C_B - C_A|| / ||C_A||.
        mlp: `[n_layers]` relative change of each block's MLP weights.
        parameters: one row per parameter: name, layer, module, change.
        scores: `{kind: {"a": [n_layers, n_heads], "b": [n_layers, n_heads]}}` (the default run of each kind).
        behaviour: None, or `{"heads": the most changed heads, "a": AblationCurve, "b": AblationCurve}`: those
            heads vs random sets ablated in each model on the task.
    """

    model_a: str
    model_b: str
    params: dict
    qk: torch.Tensor
    ov: torch.Tensor
    mlp: torch.Tensor
    parameters: list[dict]
    scores: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    behaviour: dict | None = None
    seconds: float = 0.0

    @property
    def change(self) -> torch.Tensor:
        """`[n_layers, n_heads]`: a head's change, the mean of its QK and OV relative changes (what `changed_heads` ranks)."""
        return (self.qk + self.ov) / 2

    @property
    def top(self) -> int:
        return int(self.params["config"]["top"])

    def changed_heads(self, k: int | None = None) -> list[Head]:
        """The `k` (default: the config's `top`) heads whose circuits changed most, most first."""
        n_heads = self.change.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads) for i in ranked(self.change.flatten())[: k or self.top]]

    # --- tables ----------------------------------------------------------------------------------

    def to_frame(self):
        """One row per head, most changed first: head, qk, ov, change, change_rank, and per score kind its value in
        A and B, the difference, both ranks and `moved` (rank in A - rank in B: positive = rose in B)."""
        import pandas as pd

        n_layers, n_heads = self.qk.shape
        frame = pd.DataFrame({
            "head": [head_label(l, h) for l in range(n_layers) for h in range(n_heads)],
            "layer": [l for l in range(n_layers) for _ in range(n_heads)],
            "head_index": [h for _ in range(n_layers) for h in range(n_heads)],
            "qk": self.qk.flatten().numpy(), "ov": self.ov.flatten().numpy(), "change": self.change.flatten().numpy(),
            "change_rank": ranks(self.change).flatten().numpy(),
        })
        for kind, pair in self.scores.items():
            rank_a, rank_b = ranks(pair["a"]).flatten(), ranks(pair["b"]).flatten()
            frame[f"{kind}_a"], frame[f"{kind}_b"] = pair["a"].flatten().numpy(), pair["b"].flatten().numpy()
            frame[f"{kind}_delta"] = (pair["b"] - pair["a"]).flatten().numpy()
            frame[f"{kind}_rank_a"], frame[f"{kind}_rank_b"] = rank_a.numpy(), rank_b.numpy()
            frame[f"{kind}_moved"] = (rank_a - rank_b).numpy()
        return frame.sort_values("change_rank").reset_index(drop=True)

    def moved(self, kind: str, k: int | None = None):
        """The `k` heads whose `kind` rank moved most between A and B, among the heads in either model's top `top`
        (a move deep in the tail, rank 200 -> 150, is noise; entering or leaving the top is what a user reads)."""
        if kind not in self.scores:
            raise KeyError(f"This diff has no '{kind}' scores; it has {', '.join(self.scores) or 'none'}.")
        frame = self.to_frame()
        near_top = (frame[f"{kind}_rank_a"] <= self.top) | (frame[f"{kind}_rank_b"] <= self.top)
        frame = frame[near_top].assign(abs_moved=lambda f: f[f"{kind}_moved"].abs())
        columns = ["head", f"{kind}_a", f"{kind}_b", f"{kind}_delta", f"{kind}_rank_a", f"{kind}_rank_b", f"{kind}_moved", "change_rank"]
        return frame.sort_values(["abs_moved", "change_rank"], ascending=[False, True])[columns].head(k or self.top).reset_index(drop=True)

    def mlp_frame(self):
        import pandas as pd

        return pd.DataFrame({"layer": range(len(self.mlp)), "mlp_change": self.mlp.numpy()})

    def parameter_frame(self):
        """Every parameter's relative change; the modules a fine-tune touched are the non-zero rows."""
        import pandas as pd

        return pd.DataFrame(self.parameters, columns=["name", "layer", "module", "change"])

    def curves(self) -> dict[str, AblationCurve]:
        """`{"a": curve, "b": curve}` of the behaviour check (empty without one)."""
        if not self.behaviour:
            return {}
        return {side: AblationCurve(**self.behaviour[side]) for side in ("a", "b")}

    def behaviour_frame(self):
        """One row per model: the task intact, with the most changed heads ablated, and with random sets (mean, min, max)."""
        import pandas as pd

        rows = []
        for side, curve in self.curves().items():
            rand = curve.random[-1]
            rows.append({"model": curve.model, "intact": curve.baseline, "changed_heads_ablated": curve.top[-1],
                         "random_mean": sum(rand) / len(rand), "random_min": min(rand), "random_max": max(rand)})
        return pd.DataFrame(rows)

    # --- figures -----------------------------------------------------------------------------------

    def figure(self):
        """The weight change: QK and OV per head, and the MLP per layer, side by side (layer 0 at the bottom)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=3, column_widths=[0.45, 0.45, 0.1], horizontal_spacing=0.06,
                            subplot_titles=("QK circuit", "OV circuit", "MLP"))
        zmax = float(max(self.qk.max(), self.ov.max(), self.mlp.max(), 1e-12))
        heat = dict(colorscale="Viridis", zmin=0, zmax=zmax, hoverongaps=False)
        for col, (name, values) in enumerate((("QK", self.qk), ("OV", self.ov)), start=1):
            fig.add_trace(go.Heatmap(z=values.numpy(), showscale=col == 1, colorbar={"title": "relative change"},
                                     hovertemplate=f"L%{{y}}H%{{x}}<br>{name} change %{{z:.4f}}<extra></extra>", **heat), 1, col)
        fig.add_trace(go.Heatmap(z=self.mlp.numpy()[:, None], x=["MLP"], showscale=False,
                                 hovertemplate="layer %{y}<br>MLP change %{z:.4f}<extra></extra>", **heat), 1, 3)
        n_layers = self.qk.shape[0]
        fig.update_xaxes(title_text="head", row=1, col=1)
        fig.update_xaxes(title_text="head", row=1, col=2)
        fig.update_yaxes(title_text="layer", row=1, col=1)
        fig.update_layout(title=f"Weight change, {self.model_a} → {self.model_b} (||B − A|| / ||A||)",
                          height=max(380, 18 * n_layers + 140), margin={"l": 60, "r": 20, "t": 70, "b": 50})
        return fig

    def score_figure(self, kind: str):
        """Heatmap of the `kind` score in B minus A."""
        from headlab.viz import head_heatmap

        if kind not in self.scores:
            raise KeyError(f"This diff has no '{kind}' scores; it has {', '.join(self.scores) or 'none'}.")
        delta = self.scores[kind]["b"] - self.scores[kind]["a"]
        return head_heatmap(delta, f"{kind} score, {self.model_b} − {self.model_a}", f"Δ {kind}",
                            hovertemplate=f"L%{{y}}H%{{x}}<br>Δ {kind} %{{z:.4f}}<extra></extra>")

    def behaviour_figure(self):
        """Bars per model: intact, the most changed heads ablated, random head sets ablated (each set a dot)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        curves = self.curves()
        names = [curve.model for curve in curves.values()]
        for label, key, color in (("intact", "baseline", "lightgrey"), ("most changed heads ablated", "top", "crimson")):
            values = [getattr(c, key) if key == "baseline" else c.top[-1] for c in curves.values()]
            fig.add_trace(go.Bar(x=names, y=values, name=label, marker_color=color))
        fig.add_trace(go.Bar(x=names, y=[c.random_mean[-1] for c in curves.values()], name="random heads ablated (mean)",
                             marker_color="grey"))
        if curves:
            curve = next(iter(curves.values()))
            fig.update_layout(yaxis_title=curve.metric, title=f"{curve.method}-ablating the {len(curve.top_heads[-1])} most "
                              f"changed heads vs random heads on {curve.task['task']}")
        fig.update_layout(barmode="group", height=400)
        return fig

    def summary(self) -> str:
        """Markdown: where the weights changed, the most changed heads, score shifts and the behaviour check."""
        touched = sorted({row["module"] for row in self.parameters if row["change"] > 0})
        untouched = sorted({row["module"] for row in self.parameters if row["change"] == 0})
        heads = self.changed_heads()
        layer, head = heads[0]
        text = (f"**{self.model_b}** vs **{self.model_a}**: {int((self.change > 0).sum())} of {self.change.numel()} heads "
                f"changed; most changed **{head_label(layer, head)}** (QK {float(self.qk[layer, head]):.4f}, OV "
                f"{float(self.ov[layer, head]):.4f}; median head {float(self.change.median()):.4f}); MLP change "
                f"{float(self.mlp.min()):.4f}–{float(self.mlp.max()):.4f} per layer. Changed parameters: "
                f"{', '.join(touched) or 'none'}; unchanged: {', '.join(untouched) or 'none'}.")
        for kind in self.scores:
            moved = self.moved(kind, 3)
            listed = ", ".join(f"{r['head']} ({r[f'{kind}_rank_a']}→{r[f'{kind}_rank_b']})" for _, r in moved.iterrows())
            text += f" **{kind}**: ranks moved most near the top: {listed or 'none'}."
        for curve in self.curves().values():
            text += (f" On **{curve.task['task']}**, {curve.model}: intact {curve.baseline:.3f}, the {len(heads[:len(curve.top_heads[-1])])} "
                     f"most changed heads ({format_heads(curve.top_heads[-1])}) ablated {curve.top[-1]:.3f}, random sets "
                     f"{curve.random_mean[-1]:.3f} (mean of {len(curve.random[-1])}).")
        return text

    # --- storage -----------------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        tensors = {"qk": self.qk, "ov": self.ov, "mlp": self.mlp}
        for kind, pair in self.scores.items():
            tensors[f"score_a/{kind}"], tensors[f"score_b/{kind}"] = pair["a"], pair["b"]
        payload = {"format": FORMAT, "record": "model_diff", "kind": "diff", "params": self.params,
                   "model_a": self.model_a, "model_b": self.model_b, "parameters": self.parameters,
                   "kinds": list(self.scores), "behaviour": self.behaviour, "seconds": self.seconds}
        return store.write_record(Path(path), payload, tensors, file_key="tensors_file")

    @classmethod
    def load(cls, path: Path | str) -> "ModelDiff":
        path = Path(path)
        record = store.read_record(path, FORMAT, "model-diff")
        tensors = store.read_tensors(path.parent / record["tensors_file"])
        scores = {kind: {"a": tensors[f"score_a/{kind}"], "b": tensors[f"score_b/{kind}"]} for kind in record["kinds"]}
        return cls(model_a=record["model_a"], model_b=record["model_b"], params=record["params"], qk=tensors["qk"],
                   ov=tensors["ov"], mlp=tensors["mlp"], parameters=record["parameters"], scores=scores,
                   behaviour=record["behaviour"], seconds=record.get("seconds", 0.0))
