"""`HeadScores`: one number per attention head `[n_layers, n_heads]`, with provenance and storage."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from headlab import store
from headlab.heads import Head, HeadGrid, head_label

FORMAT = "headlab.head_scores/v1"


def ranked(values: torch.Tensor) -> torch.Tensor:
    """Indices of the 1-d `values`, highest first, ties in index order, NaN last."""
    nan = values.isnan()
    order = torch.argsort(values.masked_fill(nan, float("-inf")), descending=True, stable=True)
    return torch.cat([order[~nan[order]], order[nan[order]]])


@dataclass
class HeadScores(HeadGrid):
    """Scores of every attention head for one kind of behaviour.

    Attributes:
        kind: registered scorer name ("induction", "previous_token", ...).
        model: model name the scores were computed on.
        params: everything needed to reproduce the run (n, seed, scorer options).
        values: `[n_layers, n_heads]` float tensor; higher means more of the behaviour.
        raw: optional per-sample values, e.g. `{"per_sample": [n_samples, n_layers, n_heads]}`.
        meta: free-form extra facts (model slug, timings, what the metric means).
    """

    kind: str
    model: str
    params: dict
    values: torch.Tensor
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The `k` highest-scoring heads as `(layer, head, value)`, best first; NaN scores rank last."""
        flat = self.values.flatten()
        idx = ranked(flat)[:k]
        return [(int(i) // self.n_heads, int(i) % self.n_heads, float(flat[i])) for i in idx]

    def top_heads(self, k: int) -> list[Head]:
        """The `k` highest-scoring heads, best first (NaN scores last)."""
        return [(layer, head) for layer, head, _ in self.top(k)]

    def to_frame(self):
        """A pandas DataFrame with one row per head: layer, head, value, rank (1 = best)."""
        import pandas as pd

        layers, heads = torch.meshgrid(torch.arange(self.n_layers), torch.arange(self.n_heads), indexing="ij")
        frame = pd.DataFrame(
            {"layer": layers.flatten().numpy(), "head": heads.flatten().numpy(), "value": self.values.flatten().numpy()}
        )
        frame["rank"] = frame["value"].rank(ascending=False, method="first", na_option="bottom").astype(int)
        return frame.sort_values("rank").reset_index(drop=True)

    def top_frame(self, k: int = 10, value_name: str | None = None) -> "pandas.DataFrame":
        """The `k` best heads as a table: `rank` (1 = best), `head` (`L18H6`), and the score in a column
        named `value_name` (default: the kind)."""
        import pandas as pd

        column = value_name or self.kind
        rows = [
            {"rank": rank, "head": head_label(layer, head), column: round(value, 4)}
            for rank, (layer, head, value) in enumerate(self.top(k), start=1)
        ]
        return pd.DataFrame(rows, columns=["rank", "head", column])

    def summary(self) -> str:
        """One Markdown sentence: the kind, the model, the run's sample count and seed (when it has them), the best head."""
        run = ", ".join(f"{name}={self.params[name]}" for name in ("n", "seed") if self.params.get(name) is not None)
        layer, head, value = self.top(1)[0]
        return (f"**{self.kind}** scores of {self.model}{f' ({run})' if run else ''}. "
                f"Best head: **{head_label(layer, head)}** ({value:.3f}).")

    def heatmap(self, title: str | None = None):
        """A plotly heatmap, layers on the y axis (layer 0 at the bottom), heads on the x axis."""
        from headlab.viz import head_heatmap

        return head_heatmap(self.values, title or f"{self.kind} score — {self.model}", self.kind)

    # --- storage -------------------------------------------------------------------------------

    def path(self, root: Path | None = None) -> Path:
        return store.run_path(self.meta.get("slug") or store.slugify(self.model), self.kind, self.params, root)

    def save(self, path: Path | None = None) -> Path:
        """Write the record as one unit (`store.write_record`): the raw arrays to a safetensors file named by
        its content hash, then the JSON naming it; NaN scores are written as null. Returns the JSON path."""
        path = Path(path) if path else self.path()
        payload = {"format": FORMAT, "record": "head_scores", "kind": self.kind, "model": self.model,
                   "params": self.params, "values": self.values.tolist(), "meta": self.meta}
        return store.write_record(path, payload, self.raw, file_key="raw_file")

    @classmethod
    def load(cls, path: Path | str) -> "HeadScores":
        """The record at `path` (null scores read back as NaN); ValueError (or OSError) if it is damaged."""
        path = Path(path)
        record = store.read_record(path, FORMAT, "head-scores")
        values = torch.tensor(store.nan_for_null(record["values"]), dtype=torch.float32)
        if values.dim() != 2:
            raise ValueError(f"{path}: values have shape {list(values.shape)}, expected [n_layers, n_heads].")
        raw = store.read_tensors(path.parent / record["raw_file"]) if record.get("raw_file") else {}
        return cls(kind=record["kind"], model=record["model"], params=record["params"], values=values, raw=raw,
                   meta=record.get("meta", {}))

