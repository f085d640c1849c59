"""SVD channels of the embedded model: composition maps, the previous-token -> induction channel, its causal test, laundry lists.

    .venv/bin/python analyses/channels.py [--recompute]

Computes (or reads from cached_runs/) the Q/K/V composition maps, the channel report of the
previous-token head L16H0 into the top-5 induction heads' keys, removes that channel against
same-rank random subspaces on the repeated-token task, and measures the laundry-list task intact,
with the channel removed or doubled, and with the induction heads ablated. Writes the tables into
analyses/README.md.
"""
from __future__ import annotations


import torch

import headlab as hl
from headlab.ablation import ablation_hooks
from headlab.circuits import channel_hooks
from headlab.circuits.intervention import DEFAULTS
from headlab.heads import format_heads, head_label
from headlab.tasks import make_task
from report import Report, recompute_args  # analyses/report.py

SENDER = (16, 0)  # the embedded model's strongest previous-token head (foundation's scores)
N_RECEIVERS = 5
LAUNDRY_N = 64
LAUNDRY_ITEMS = (2, 3, 4, 5)


def main() -> None:
    args = recompute_args(__doc__)
    lab = hl.load("embedded")
    emit = Report("channels")

    emit(f"## SVD channels — {lab.info.name}\n")
    emit("### Composition of every earlier head into every later head (ln1 folded in, un-rotated W_Q/W_K)\n")
    emit("| kind | random matrices: mean ± std (99th pct) | pairs above the 99th pct | top 5 pairs (score, z vs random) |")
    emit("|---|---|---|---|")
    for kind in ("q", "k", "v"):
        cmap = hl.composition_map(lab, kind, recompute=args.recompute)
        base = cmap.baseline
        top = ", ".join(f"{head_label(*s)}→{head_label(*r)} {v:.3f} ({cmap.z_score(v):.0f}σ)" for s, r, v in cmap.top(5))
        emit(f"| {kind.upper()} | {base['mean']:.4f} ± {base['std']:.4f} ({base['q99']:.4f}) | "
             f"{100 * cmap.fraction_above():.1f}% | {top} |")

    receivers = hl.score(lab, "induction").top_heads(N_RECEIVERS)
    report = hl.channels(lab, SENDER, receivers, "k")
    emit(f"\n### The channel: {head_label(*SENDER)} → top-{N_RECEIVERS} induction heads ({format_heads(receivers)}), K-composition\n")
    emit(report.summary() + "\n")
    emit("| direction | singular value | composition | share | cumulative |")
    emit("|---|---|---|---|---|")
    for row in report.to_frame().head(8).itertuples():
        emit(f"| {row.direction} | {row.singular_value:.3f} | {row.composition:.3f} | {row.share:.3f} | {row.cumulative_share:.3f} |")

    exp = hl.channel_experiment(lab, report, recompute=args.recompute)  # the Channels tab's defaults, so the tab reads this run
    emit(f"\n### Removing the channel from {head_label(*SENDER)}'s output, {DEFAULTS.task} task (n={DEFAULTS.n}; {exp.metric})\n")
    emit(exp.summary() + "\n")
    emit("| rank | share of composition | channel removed | random subspaces (mean, worst) | top-variance removed | "
         "output variance removed: channel / random / top-variance |")
    emit("|---|---|---|---|---|---|")
    for i, rank in enumerate(exp.ranks):
        rand = exp.random[i]
        worst = max(rand) if not exp.higher_is_better else min(rand)
        emit(f"| {rank} | {exp.shares[i]:.2f} | {exp.channel[i]:.3f} | {sum(rand) / len(rand):.3f}, {worst:.3f} | "
             f"{exp.top_variance[i]:.3f} | {exp.energy_channel[i]:.2f} / "
             f"{sum(exp.energy_random[i]) / len(exp.energy_random[i]):.2f} / {exp.energy_top_variance[i]:.2f} |")
    emit(f"\nintact {exp.baseline:.3f}; whole {head_label(*SENDER)} mean-ablated {exp.head_removed:.3f}; "
         + ", ".join(f"channel (rank {exp.scale_rank}) ×{s:g} → {v:.3f}" for s, v in zip(exp.scales, exp.scaled)))

    emit(f"\n### Laundry-list recall (n={LAUNDRY_N} prompts per length; accuracy among the list's items)\n")
    channel = report.channel(0.9)
    emit(f"| items | chance | intact | channel (rank {channel.shape[1]}) removed | channel ×2 | {head_label(*SENDER)} ablated | "
         f"top-{N_RECEIVERS} induction heads ablated |")
    emit("|---|---|---|---|---|---|---|")
    for n_items in LAUNDRY_ITEMS:
        laundry = make_task("laundry_list", lab, n=LAUNDRY_N, n_items=n_items)
        cells = [
            laundry.evaluate(),
            laundry.evaluate(channel_hooks(lab, SENDER, channel, scale=0.0, task=laundry)),
            laundry.evaluate(channel_hooks(lab, SENDER, channel, scale=2.0, task=laundry)),
            laundry.evaluate(ablation_hooks(lab, [SENDER], "mean", laundry)),
            laundry.evaluate(ablation_hooks(lab, receivers, "mean", laundry)),
        ]
        emit(f"| {n_items} | {1 / n_items:.2f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")

    emit("\n_Made by `.venv/bin/python analyses/channels.py`._")
    emit.write()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
