"""Active and dormant heads (Guo et al. 2024): attention sinks, value-state drains, residual peaks.

Per input domain and head: the attention mass on the first token (the sink), averaged over the
queries after it; the sink's value norm over the mean value norm of the other tokens; the norm of
the head's output (`hook_z` of the head through its slice of W_O); and per layer the residual norm
at the sink over that of the other tokens.

A head is *dormant* on a domain when it puts at least `mass_threshold` of its attention on the
sink and writes little: its output norm relative to its layer's reference (the 90th percentile of
the output norms of that layer's heads over all domains, i.e. what an active head of that layer
writes) is at most `output_threshold`. The continuous score is
`dormancy = sink_mass * clamp(1 - relative_output, 0, 1)`: 1 for a head that only looks at the sink
and writes nothing, 0 for one that attends elsewhere or writes as much as an active head.

`hl.score(lab, "sink", domain="prose")`: values = dormancy on `domain`; `raw` holds every measure
for every domain (`[domain, layer, head]`, residual ones `[domain, layer]`); `meta["domains"]`
names the first axis.

Views of a sink run: `dormancy_figure(scores)` (head x domain heatmap), `switching_frame(scores)`
(the heads that switch between dormant and active), `sink_summary(scores)`, and `domain_text` (a
sample of a domain to look at one head's pattern on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headlab.activations import act_name, capture, layer_names
from headlab.datasets import domains as domain_data
from headlab.heads import Head, head_label
from headlab.lab import Lab
from headlab.scorers import Scorer
from headlab.scores import HeadScores

REFERENCE_QUANTILE = 0.9


def head_sink_measures(pattern: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-head measures of one layer on one batch.

    Args:
        pattern: `[batch, head, q, k]` attention.
        z: `[batch, pos, head, d_head]` the heads' mixed values (`hook_z`).
        w_o: `[head, d_head, d_model]` each head's slice of the output projection.
        v: `[batch, pos, head, d_head]` value vectors (KV heads already repeated to query heads).
    Returns:
        `sink_mass`, `output_norm`, `value_ratio`, each `[head]`: mean attention on key 0 over
        queries 1.., mean norm of the head's output over positions 1.., and the norm of the sink's
        value over the mean norm of the other positions' values.
    """
    sink_mass = pattern[:, :, 1:, 0].float().mean(dim=(0, 2))
    out = torch.einsum("bphd,hdm->bphm", z[:, 1:].float(), w_o.float())
    output_norm = out.norm(dim=-1).mean(dim=(0, 1))
    v_norm = v.float().norm(dim=-1)  # [batch, pos, head]
    value_ratio = v_norm[:, 0].mean(0) / v_norm[:, 1:].mean(dim=(0, 1)).clamp(min=1e-12)
    return {"sink_mass": sink_mass, "output_norm": output_norm, "value_ratio": value_ratio}


def relative_output(output_norm: torch.Tensor, quantile: float = REFERENCE_QUANTILE) -> torch.Tensor:
    """`[domain, layer, head]` output norms over their layer's reference (the `quantile` over domains and heads)."""
    per_layer = output_norm.transpose(0, 1).flatten(1)  # [layer, domain * head]
    reference = torch.quantile(per_layer, quantile, dim=1).clamp(min=1e-12)
    return output_norm / reference[None, :, None]


def dormancy(sink_mass: torch.Tensor, output_rel: torch.Tensor) -> torch.Tensor:
    """`sink_mass * clamp(1 - output_rel, 0, 1)`, elementwise: 1 = fully dormant, 0 = active."""
    return sink_mass * (1 - output_rel).clamp(0, 1)


def classify_dormant(sink_mass: torch.Tensor, output_rel: torch.Tensor, mass_threshold: float, output_threshold: float) -> torch.Tensor:
    """Bool, same shape: most attention on the sink and little output."""
    return (sink_mass >= mass_threshold) & (output_rel <= output_threshold)


def switching_heads(dormant: torch.Tensor, domain_names: list[str]) -> list[dict]:
    """Heads dormant on some domains and active on others.

    Args:
        dormant: `[domain, layer, head]` bool.
    Returns:
        One dict per switching head: `layer`, `head`, `dormant_on`, `active_on` (domain names).
    """
    some, every = dormant.any(0), dormant.all(0)
    rows = []
    for layer, head in torch.nonzero(some & ~every).tolist():
        column = dormant[:, layer, head].tolist()
        rows.append({
            "layer": layer, "head": head,
            "dormant_on": [d for d, x in zip(domain_names, column) if x],
            "active_on": [d for d, x in zip(domain_names, column) if not x],
        })
    return rows


def _layer_output_weights(lab: Lab, layer: int) -> torch.Tensor:
    """`[head, d_head, d_model]`: the slices of the HF `o_proj` each head's output goes through."""
    weight = lab.hf_model.model.layers[layer].self_attn.o_proj.weight  # [d_model, head * d_head]
    return weight.detach().T.reshape(lab.info.n_heads, lab.info.d_head, -1)


@torch.no_grad()
def domain_measures(lab: Lab, tokens: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Every measure on one domain's `tokens` `[n, pos]`.

    Returns `sink_mass`, `output_norm`, `value_ratio` `[layer, head]` and `resid_norm_sink`,
    `resid_norm_other` `[layer]` (mean residual norm entering the layer at position 0 / at the rest).
    """
    info = lab.info
    w_o = [_layer_output_weights(lab, layer) for layer in range(info.n_layers)]
    sums: dict[str, torch.Tensor] = {}
    batches = list(tokens.split(batch_size))
    names = layer_names(lab, "pattern", "z", "v", "resid_pre")
    for batch in batches:
        stash = capture(lab, batch, names)
        layer_rows: dict[str, list[torch.Tensor]] = {}
        for layer in range(info.n_layers):
            v = stash[act_name("v", layer)]
            v = v.repeat_interleave(info.n_heads // v.shape[2], dim=2)
            measures = head_sink_measures(stash[act_name("pattern", layer)], stash[act_name("z", layer)], w_o[layer], v)
            resid = stash[act_name("resid_pre", layer)].float().norm(dim=-1)  # [batch, pos]
            measures["resid_norm_sink"] = resid[:, 0].mean()
            measures["resid_norm_other"] = resid[:, 1:].mean()
            for key, value in measures.items():
                layer_rows.setdefault(key, []).append(value.cpu())
        for key, rows in layer_rows.items():
            sums[key] = sums.get(key, 0) + torch.stack(rows) * len(batch)
    return {key: total / tokens.shape[0] for key, total in sums.items()}


def domain_dependence(dormancy_matrix: torch.Tensor) -> torch.Tensor:
    """`[layer, head]`: how much a head's dormancy changes with the domain (max - min over domains)."""
    return dormancy_matrix.amax(0) - dormancy_matrix.amin(0)


@dataclass(frozen=True)
class Sink(Scorer):
    """Dormancy of every head on `domain`, with all measures for all `domains` (+ the user's `texts`).

    Cost: one forward pass per domain over `n` texts of `seq_len` tokens, keeping every layer's pattern,
    values and outputs: time grows with domains x n x model size x seq_len, memory with batch x layers x seq_len^2.
    """

    kind = "sink"
    domain: str = "prose"
    domains: tuple[str, ...] = domain_data.BUILTIN_DOMAINS
    texts: dict[str, str] | None = None
    n: int = 4
    seed: int = 0
    seq_len: int = 256
    mass_threshold: float = 0.5
    output_threshold: float = 0.3
    batch_size: int = 4

    @property
    def names(self) -> list[str]:
        """Every scored domain: the built-in `domains`, then the user's `texts`."""
        return list(dict.fromkeys([*self.domains, *(self.texts or {})]))

    def __post_init__(self):
        if self.domain not in self.names:
            raise ValueError(f"The chosen domain '{self.domain}' is not among the scored domains {self.names}.")
        for name in ("n", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"sink: {name} must be at least 1; got {getattr(self, name)}.")

    def compute(self, lab: Lab) -> HeadScores:
        names = self.names
        per_domain = []
        for index, name in enumerate(names):
            tokens = domain_data.domain_tokens(lab, name, self.n, self.seq_len, self.seed + 1000 * index, self.texts)
            per_domain.append(domain_measures(lab, tokens, self.batch_size))
        raw = {key: torch.stack([m[key] for m in per_domain]).float() for key in per_domain[0]}
        raw["output_rel"] = relative_output(raw["output_norm"])
        raw["dormancy"] = dormancy(raw["sink_mass"], raw["output_rel"])
        raw["dormant"] = classify_dormant(raw["sink_mass"], raw["output_rel"], self.mass_threshold, self.output_threshold).float()
        raw["domain_dependence"] = domain_dependence(raw["dormancy"])
        return self.result(lab, raw["dormancy"][names.index(self.domain)].clone(), raw, meta={
            "metric": f"dormancy on {self.domain}: sink attention mass x (1 - output norm relative to an active head of the layer)",
            "domains": names,
            "n_dormant": {d: int(raw["dormant"][i].sum()) for i, d in enumerate(names)},
            "switching_heads": switching_heads(raw["dormant"].bool(), names),
        })


def top_switching(scores: HeadScores, k: int = 10) -> list[Head]:
    """The `k` switching heads whose dormancy depends most on the domain, most dependent first."""
    heads = [(row["layer"], row["head"]) for row in scores.meta["switching_heads"]]
    dependence = scores.raw["domain_dependence"]
    return sorted(heads, key=lambda h: -float(dependence[h]))[:k]


def dormancy_figure(scores: HeadScores):
    """Plotly heatmap: one row per head (`L18H6`, layer 0 at the top), one column per domain, colour = dormancy."""
    from headlab.viz import head_heatmap

    matrix = scores.raw["dormancy"].flatten(1).T  # [layer * head, domain]
    labels = [head_label(layer, head) for layer in range(scores.n_layers) for head in range(scores.n_heads)]
    fig = head_heatmap(
        matrix, f"Dormancy of every head per domain — {scores.model}", "dormancy", x=scores.meta["domains"], y=labels,
        x_title="domain", y_title="head", zmin=0, zmax=1, height=1400,
        hovertemplate="%{y} on %{x}<br>dormancy %{z:.3f}<extra></extra>",
    )
    fig.update_layout(yaxis={"autorange": "reversed"})
    return fig


def switching_frame(scores: HeadScores, k: int | None = None, per_domain: bool = False):
    """pandas: the `k` (default all) switching heads, most domain-dependent first: `head`, `dormant on`,
    `active on`, `domain dependence` (and with `per_domain`, a `dormancy <domain>` column per domain)."""
    import pandas as pd

    by_head = {(row["layer"], row["head"]): row for row in scores.meta["switching_heads"]}
    names = scores.meta["domains"]
    rows = []
    for layer, head in top_switching(scores, len(by_head) if k is None else k):
        row = {"head": head_label(layer, head), "dormant on": ", ".join(by_head[layer, head]["dormant_on"]),
               "active on": ", ".join(by_head[layer, head]["active_on"]),
               "domain dependence": round(float(scores.raw["domain_dependence"][layer, head]), 3)}
        if per_domain:
            row.update({f"dormancy {d}": round(float(v), 2) for d, v in zip(names, scores.raw["dormancy"][:, layer, head])})
        rows.append(row)
    columns = ["head", "dormant on", "active on", "domain dependence", *([f"dormancy {d}" for d in names] if per_domain else [])]
    return pd.DataFrame(rows, columns=columns)


def sink_summary(scores: HeadScores) -> str:
    """One Markdown paragraph: dormant heads and mean attention on the first token per domain, and how many heads switch."""
    counts = ", ".join(f"{d}: {c}" for d, c in scores.meta["n_dormant"].items())
    mass = scores.raw["sink_mass"].mean(dim=(1, 2))
    masses = ", ".join(f"{d}: {float(m):.2f}" for d, m in zip(scores.meta["domains"], mass))
    return (
        f"**Dormant heads** per domain (of {scores.n_layers * scores.n_heads}) — {counts}. "
        f"**Mean attention on the first token** — {masses}. "
        f"**{len(scores.meta['switching_heads'])} heads switch** between dormant and active."
    )


def domain_text(lab: Lab, domain: str, n_tokens: int, seed: int = 0) -> str:
    """A sample of `domain` of `n_tokens` tokens as text (its leading BOS dropped: a view adds it back)."""
    tokens = domain_data.domain_tokens(lab, domain, 1, n_tokens, seed)[0, 1:]
    return lab.tokenizer.decode(tokens)
