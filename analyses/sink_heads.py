"""Sink heads of the embedded model: sink prevalence by layer and the heads that switch between domains.

    .venv/bin/python analyses/sink_heads.py [--recompute]

Runs `hl.score(lab, "sink")` with its defaults (stored in cached_runs/) and writes markdown tables into analyses/README.md.
"""
from __future__ import annotations

import headlab as hl
from headlab.scorers.sinks import switching_frame
from report import recompute_args, write_section  # analyses/report.py

SWITCHING_K = 15  # switching heads listed, most domain-dependent first


def prevalence_table(scores: hl.HeadScores) -> str:
    """Per layer and domain: mean sink mass and heads with more than the run's `mass_threshold` of their attention
    on the sink; value ratio; residual peak."""
    names, raw, threshold = scores.meta["domains"], scores.raw, scores.params["mass_threshold"]
    head = ["layer", *[f"{d} mass" for d in names], *[f"{d} >{threshold}" for d in names], "value ratio", "resid peak", "dormant (any)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in range(scores.n_layers):
        mass = raw["sink_mass"][:, layer]  # [domain, head]
        peak = raw["resid_norm_sink"][:, layer] / raw["resid_norm_other"][:, layer]
        cells = [str(layer), *[f"{float(m.mean()):.2f}" for m in mass], *[str(int((m > threshold).sum())) for m in mass],
                 f"{float(raw['value_ratio'][:, layer].median()):.2f}", f"{float(peak.mean()):.0f}x",
                 str(int(raw["dormant"][:, layer].any(0).sum()))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(frame) -> str:
    """A pandas DataFrame as a Markdown table, numbers with two decimals."""
    cell = lambda value: f"{value:.2f}" if isinstance(value, float) else str(value)  # noqa: E731
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def report(scores: hl.HeadScores) -> str:
    """The section's markdown: per-domain prevalence, the per-layer table and the switching heads."""
    n_heads, threshold = scores.n_layers * scores.n_heads, scores.params["mass_threshold"]
    lines = [f"## Sink heads — {scores.model} (n={scores.params['n']}, seq_len={scores.params['seq_len']})\n"]
    for i, name in enumerate(scores.meta["domains"]):
        mass = scores.raw["sink_mass"][i]
        lines.append(f"- {name}: mean sink mass {float(mass.mean()):.3f}, heads > {threshold}: "
                     f"{int((mass > threshold).sum())}/{n_heads}, dormant: {scores.meta['n_dormant'][name]}, "
                     f"value ratio median {float(scores.raw['value_ratio'][i].median()):.3f}")
    lines += [f"- switching heads: {len(scores.meta['switching_heads'])}\n", prevalence_table(scores) + "\n",
              markdown_table(switching_frame(scores, SWITCHING_K, per_domain=True).drop(columns="domain dependence")),
              "\n_Made by `.venv/bin/python analyses/sink_heads.py`._"]
    return "\n".join(lines)


def main() -> None:
    args = recompute_args(__doc__)
    markdown = report(hl.score(hl.load("embedded"), "sink", recompute=args.recompute))
    print(markdown, flush=True)
    write_section("sink_heads", markdown)


if __name__ == "__main__":
    main()
