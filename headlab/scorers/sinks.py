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

from headlab.activations import act_name, reads_only
from headlab.datasets import domains as domain_data
from headlab.heads import Head, head_label
from headlab.lab import Lab
from headlab.longpass import pass_bytes, prefill
from headlab.scorers import Scorer
from headlab.scores import HeadScores

REFERENCE_QUANTILE = 0.9


class SinkSums:
    """Running sums of one layer's per-head measures over the chunks of one batch (positions in order).

    `pattern(block)` takes attention rows `[batch, head, R, K]` (the last R of K positions: a linear pass's
    recomputed blocks, or a whole `[batch, head, pos, pos]` pattern), `z(act)` the heads' mixed values
    `[batch, C, head, d_head]` (`hook_z`), `v(act)` value vectors `[batch, C, kv_head, d_head]` and `resid(act)` the
    residual `[batch, C, d_model]`, each chunk after the one before. `measures()` gives the batch means.
    """

    def __init__(self, w_o: torch.Tensor, block_bytes: int = 64 << 20):
        self.w_o = w_o.float()  # [head, d_head, d_model]
        self.block_bytes = block_bytes  # bound on one block of head outputs [batch, P, head, d_model]
        self.sums: dict[str, torch.Tensor | float] = {}
        self.seen = {"z": 0, "v": 0, "resid": 0}  # positions of each activation summed so far

    def _add(self, key: str, value) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def _after_first(self, kind: str, act: torch.Tensor, pos_dim: int = 1) -> torch.Tensor:
        """`act` without position 0 (only the first chunk holds it); counts the chunk's positions."""
        first = self.seen[kind] == 0
        self.seen[kind] += act.shape[pos_dim]
        return act.narrow(pos_dim, 1, act.shape[pos_dim] - 1) if first else act

    def pattern(self, block: torch.Tensor) -> None:
        rows = block[:, :, max(0, 1 - (block.shape[-1] - block.shape[-2])):, 0].float()  # queries 1.. on key 0
        self._add("sink_mass", rows.sum(dim=(0, 2)))
        self._add("sink_queries", rows.shape[0] * rows.shape[2])

    def z(self, z: torch.Tensor) -> None:
        z = self._after_first("z", z)
        per_position = z.shape[0] * z.shape[2] * self.w_o.shape[-1] * 4
        for part in z.split(max(1, self.block_bytes // per_position), dim=1):
            out = torch.einsum("bphd,hdm->bphm", part.float(), self.w_o.to(part.device))
            self._add("output_norm", out.norm(dim=-1).sum(dim=(0, 1)))
        self._add("output_positions", z.shape[0] * z.shape[1])

    def v(self, v: torch.Tensor) -> None:
        norm = v.float().norm(dim=-1)  # [batch, C, kv_head]
        if self.seen["v"] == 0:
            self._add("value_sink", norm[:, 0].sum(0))
            self._add("batch", norm.shape[0])
        rest = self._after_first("v", norm)
        self._add("value_other", rest.sum(dim=(0, 1)))
        self._add("value_positions", rest.shape[0] * rest.shape[1])

    def resid(self, resid: torch.Tensor) -> None:
        norm = resid.float().norm(dim=-1)  # [batch, C]
        if self.seen["resid"] == 0:
            self._add("resid_sink", norm[:, 0].sum())
        rest = self._after_first("resid", norm)
        self._add("resid_other", rest.sum())
        self._add("resid_positions", rest.numel())

    def measures(self) -> dict[str, torch.Tensor]:
        """`sink_mass`, `output_norm`, `value_ratio` `[head]` and, when the residual was given, `resid_norm_sink`,
        `resid_norm_other` (scalars): means over the batch and positions 1.. (the sink's value over the others')."""
        s, n_heads = self.sums, self.w_o.shape[0]
        value_mean = s["value_other"] / s["value_positions"]
        value_ratio = (s["value_sink"] / s["batch"]) / value_mean.clamp(min=1e-12)  # [kv_head]
        out = {"sink_mass": s["sink_mass"] / s["sink_queries"], "output_norm": s["output_norm"] / s["output_positions"],
               "value_ratio": value_ratio.repeat_interleave(n_heads // value_ratio.shape[0])}
        if "resid_sink" in s:
            out["resid_norm_sink"] = s["resid_sink"] / s["batch"]
            out["resid_norm_other"] = s["resid_other"] / s["resid_positions"]
        return {key: torch.as_tensor(value).cpu() for key, value in out.items()}


def head_sink_measures(pattern: torch.Tensor, z: torch.Tensor, w_o: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-head measures of one layer on one batch, from whole activations (`SinkSums` on one chunk).

    Args:
        pattern: `[batch, head, q, k]` attention.
        z: `[batch, pos, head, d_head]` the heads' mixed values (`hook_z`).
        w_o: `[head, d_head, d_model]` each head's slice of the output projection.
        v: `[batch, pos, kv_head, d_head]` value vectors (KV head g serves query heads g * group ...).
    Returns:
        `sink_mass`, `output_norm`, `value_ratio`, each `[head]`: mean attention on key 0 over
        queries 1.., mean norm of the head's output over positions 1.., and the norm of the sink's
        value over the mean norm of the other positions' values.
    """
    sums = SinkSums(w_o)
    sums.pattern(pattern)
    sums.z(z)
    sums.v(v)
    return sums.measures()


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
def batch_measures(lab: Lab, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every measure of every layer on one batch `[batch, pos]`, from one linear pass (`longpass.prefill`): read-only
    hooks on `hook_pattern` (recomputed row blocks), `hook_z`, `hook_v` and `hook_resid_pre` keep running sums only.

    Returns `sink_mass`, `output_norm`, `value_ratio` `[layer, head]`, `resid_norm_sink`, `resid_norm_other` `[layer]`.
    """
    layers = [SinkSums(_layer_output_weights(lab, layer)) for layer in range(lab.info.n_layers)]
    hooks = []
    for layer, sums in enumerate(layers):
        for name, method in (("pattern", sums.pattern), ("z", sums.z), ("v", sums.v), ("resid_pre", sums.resid)):
            hooks.append((act_name(name, layer), reads_only(lambda act, hook=None, method=method: method(act))))
    with lab.model.hooks(fwd_hooks=hooks):
        prefill(lab, tokens)
    per_layer = [sums.measures() for sums in layers]
    return {key: torch.stack([m[key] for m in per_layer]) for key in per_layer[0]}


def domain_measures(lab: Lab, tokens: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Every measure on one domain's `tokens` `[n, pos]`: `batch_measures` per batch, weighted by batch size.

    Returns `sink_mass`, `output_norm`, `value_ratio` `[layer, head]` and `resid_norm_sink`,
    `resid_norm_other` `[layer]` (mean residual norm entering the layer at position 0 / at the rest).
    """
    sums: dict[str, torch.Tensor] = {}
    for batch in tokens.split(batch_size):
        for key, value in batch_measures(lab, batch).items():
            sums[key] = sums.get(key, 0) + value * len(batch)
    return {key: total / tokens.shape[0] for key, total in sums.items()}


def domain_dependence(dormancy_matrix: torch.Tensor) -> torch.Tensor:
    """`[layer, head]`: how much a head's dormancy changes with the domain (max - min over domains)."""
    return dormancy_matrix.amax(0) - dormancy_matrix.amin(0)


@dataclass(frozen=True)
class Sink(Scorer):
    """Dormancy of every head on `domain`, with all measures for all `domains` (+ the user's `texts`).

    Cost: one chunked linear pass (`longpass.prefill`) per batch of `batch_size` texts of `seq_len` tokens, for
    each domain; hooks reduce every layer's recomputed pattern rows, outputs, values and residual to running sums.
    Time grows with domains x n x (weights x seq_len + 2 x layers x heads x d_head x seq_len^2); memory linearly
    with batch_size x seq_len (the KV cache, one chunk, one row block: `longpass.pass_bytes`), never seq_len^2.
    Refused up front when that exceeds free memory.
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
        lab.check_length(self.seq_len, "sink text")
        batch = min(self.batch_size, self.n)
        lab.require_memory(pass_bytes(lab, self.seq_len, batch, reads_pattern=True),
                           f"sink on {batch} texts of {self.seq_len} tokens", "lower seq_len or batch_size")
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
