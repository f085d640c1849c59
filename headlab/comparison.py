"""`MaskComparison`: what `headlab.compare.compare_masks` returns: the table, the Pareto figure, the winners.

Rows are one per (mask, task, length): source, seed (seeded sources), budget, n_full_kv_heads, kv_bytes
(measured after prefill), task, length, accuracy (mean RULER score), stderr, ci_low / ci_high (95% Wilson),
n, kl_vs_full (the `prose_kl` rows) and time_s (the source's scoring or training). The full cache and
all-streaming are reference rows (budgets 1 and 0). Quality of a mask = its mean accuracy over the suite's
RULER tasks and lengths; the winner at a budget is the source whose mean over its masks (seeds) is highest.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from headlab import store
from headlab.compare import ALL_STREAMING, FORMAT, FULL_CACHE, KL_TASK, SEEDED_SOURCES
from headlab.masks import MIB, HeadMask

COLUMNS = ["source", "seed", "budget", "n_full_kv_heads", "kv_bytes", "task", "length", "accuracy", "stderr", "ci_low",
           "ci_high", "n", "kl_vs_full", "time_s"]
REFERENCES = (FULL_CACHE, ALL_STREAMING)
MASK_FIELDS = ("model", "n_layers", "n_heads", "n_kv_heads", "full", "sink", "recent", "source", "scores")


@dataclass
class MaskComparison:
    """The comparison's rows, its parameters and every mask it ran (`headlab.head_mask/v1` records)."""

    model: str
    config: dict
    source_params: dict
    rows: list[dict]
    masks: list[dict]  # {"source", "seed", "budget", "time_s", "mask": HeadMask record}
    runtime: dict

    def to_frame(self) -> pd.DataFrame:
        """Every row, in `COLUMNS` order."""
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def per_mask(self) -> pd.DataFrame:
        """One row per mask: mean accuracy over the RULER cells, mean KL, KV MiB at the longest length, time."""
        frame = self.to_frame()
        longest = frame["length"].max()
        keys = ["source", "seed", "budget"]
        suite = frame[frame["task"] != KL_TASK].groupby(keys, dropna=False)["accuracy"].mean().rename("accuracy")
        kl = frame[frame["task"] == KL_TASK].groupby(keys, dropna=False)["kl_vs_full"].mean()
        at = frame[frame["length"] == longest].groupby(keys, dropna=False)
        out = pd.concat([suite, kl, (at["kv_bytes"].first() / MIB).rename("kv_mib"), at["n_full_kv_heads"].first(),
                         at["time_s"].first()], axis=1).reset_index()
        return out

    def summary(self) -> pd.DataFrame:
        """One row per (source, budget): quality over seeds (mean, min, max), KL, KV MiB, full KV heads, time."""
        masks = self.per_mask()
        grouped = masks.groupby(["source", "budget"], dropna=False)
        out = grouped.agg(accuracy=("accuracy", "mean"), accuracy_min=("accuracy", "min"), accuracy_max=("accuracy", "max"),
                          kl_vs_full=("kl_vs_full", "mean"), kv_mib=("kv_mib", "mean"),
                          n_full_kv_heads=("n_full_kv_heads", "first"), masks=("accuracy", "size"), time_s=("time_s", "mean"))
        return out.reset_index().sort_values(["budget", "accuracy"], ascending=[True, False], ignore_index=True)

    def winners(self) -> pd.DataFrame:
        """Per budget: the best source, its accuracy, the full cache's, the gap in points, and the runner-up."""
        table = self.summary()
        full = table.loc[table["source"] == FULL_CACHE, "accuracy"]
        full_accuracy = float(full.iloc[0]) if len(full) else float("nan")
        rows = []
        for budget, group in table[~table["source"].isin(REFERENCES)].groupby("budget"):
            ranked = group.sort_values(["accuracy", "kl_vs_full"], ascending=[False, True])
            best = ranked.iloc[0]
            rows.append({"budget": budget, "winner": best["source"], "accuracy": best["accuracy"],
                         "full_cache": full_accuracy, "gap_points": 100 * (full_accuracy - best["accuracy"]),
                         "runner_up": ranked.iloc[1]["source"] if len(ranked) > 1 else None,
                         "runner_up_accuracy": ranked.iloc[1]["accuracy"] if len(ranked) > 1 else None})
        return pd.DataFrame(rows)

    def best_mask(self, budget: float) -> HeadMask:
        """The winning source's mask at `budget` (for a seeded source, its best seed)."""
        winners = self.winners()
        match = winners[(winners["budget"] - budget).abs() < 1e-9]
        if match.empty:
            raise ValueError(f"This comparison has no budget {budget}; it has {sorted(winners['budget'])}.")
        source = match.iloc[0]["winner"]
        masks = self.per_mask()
        mine = masks[(masks["source"] == source) & ((masks["budget"] - budget).abs() < 1e-9)]
        seed = mine.sort_values("accuracy", ascending=False).iloc[0]["seed"]
        for entry in self.masks:
            if entry["source"] == source and abs(entry["budget"] - budget) < 1e-9 and (pd.isna(seed) or entry["seed"] == seed):
                record = entry["mask"]
                return HeadMask(**{k: record[k] for k in MASK_FIELDS})
        raise KeyError(f"No stored mask for {source} at {budget}.")

    def figure(self):
        """Plotly Pareto plot: suite accuracy against KV MiB held at the longest length, one line per source
        across budgets, seeded sources as a band (min to max over seeds) around their mean, the full cache and
        all-streaming as reference points."""
        import plotly.graph_objects as go

        table = self.summary().sort_values("kv_mib")
        fig = go.Figure()
        for source, group in table[~table["source"].isin(REFERENCES)].groupby("source", sort=False):
            if is_seeded(source):
                fig.add_trace(go.Scatter(x=list(group["kv_mib"]) + list(group["kv_mib"])[::-1],
                                         y=list(group["accuracy_max"]) + list(group["accuracy_min"])[::-1], fill="toself",
                                         line={"width": 0}, opacity=0.25, name=f"{source} (min-max over seeds)", hoverinfo="skip"))
            fig.add_trace(go.Scatter(x=group["kv_mib"], y=group["accuracy"], mode="lines+markers", name=source,
                                     customdata=group[["budget", "n_full_kv_heads"]],
                                     hovertemplate="%{customdata[0]:.0%} budget, %{customdata[1]} full KV heads<br>"
                                                   "%{x:.1f} MiB, accuracy %{y:.3f}<extra>" + source + "</extra>"))
        for source, symbol in ((FULL_CACHE, "star"), (ALL_STREAMING, "x")):
            ref = table[table["source"] == source]
            fig.add_trace(go.Scatter(x=ref["kv_mib"], y=ref["accuracy"], mode="markers", name=source,
                                     marker={"symbol": symbol, "size": 14, "color": "black"}))
        fig.update_layout(title=self.title(), xaxis_title=f"KV cache held after prefill at {max(self.config['lengths'])} tokens (MiB)",
                          yaxis_title="RULER-style accuracy (mean over tasks)", height=420,
                          margin={"l": 60, "r": 20, "t": 60, "b": 50})
        return fig

    def title(self) -> str:
        lengths = ", ".join(str(x) for x in self.config["lengths"])
        return f"{self.model}: mask sources at equal KV budget ({lengths} tokens, n={self.config['n']} per task)"

    # --- storage ------------------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        params = {"config": self.config, "source_params": self.source_params, "runtime": self.runtime}
        store.write_json(path, {"format": FORMAT, "record": "compare_masks", "kind": "compare_masks", "params": params,
                                "comparison": asdict(self)})
        return path

    @classmethod
    def load(cls, path: Path) -> "MaskComparison":
        return cls(**store.read_record(path, FORMAT, "mask-comparison")["comparison"])


def is_seeded(source: str) -> bool:
    return source in SEEDED_SOURCES
