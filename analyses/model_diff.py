"""Which heads did the refusal adapter change, and are they the top Ships (safety) heads?

    .venv/bin/python analyses/model_diff.py [--top 10] [--n-permutations 10000] [--recompute]

`hl.diff(embedded, embedded-refusal)` with the `DiffConfig` defaults (Ships scores on both models, read from the
shipped runs; the 2 most changed heads vs random pairs mean-ablated on the refusal task), stored in cached_runs/.
Then: overlap of the `top` most changed heads with the refusal model's `top` Ships heads, Spearman rank
correlation of weight change and Ships over all heads, and a permutation baseline for both. Writes the
"model_diff" section of analyses/README.md.
"""
from __future__ import annotations

import argparse

import torch

import headlab as hl
from headlab.diff import DiffConfig
from headlab.heads import format_heads
from report import Report, recompute_args  # analyses/report.py


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=DiffConfig.top)
    parser.add_argument("--n-permutations", type=int, default=10000)
    args = recompute_args(__doc__, parser)
    emit = Report("model_diff")
    a, b = hl.load("embedded", device="cpu"), hl.load("embedded-refusal", device="cpu")
    d = hl.diff(a, b, top=args.top, recompute=args.recompute)
    emit(f"## Model diff — {d.model_b} vs {d.model_a} (`hl.diff`)\n")
    emit(d.summary() + "\n")
    emit("| rank | head | QK change | OV change | Ships rank in A | Ships rank in B |")
    emit("|---|---|---|---|---|---|")
    frame = d.to_frame()
    for _, row in frame.head(args.top).iterrows():
        emit(f"| {row['change_rank']} | {row['head']} | {row['qk']:.4f} | {row['ov']:.4f} | {row['safety_rank_a']} | {row['safety_rank_b']} |")
    change, ships = d.change.flatten(), d.scores["safety"]["b"].flatten()
    changed, top_ships = set(d.changed_heads(args.top)), set(hl.stored(b, "safety").top_heads(args.top))
    overlap, rho = len(changed & top_ships), spearman(change, ships)
    g = torch.Generator().manual_seed(0)
    n_heads = change.numel()
    perm_overlap, perm_rho = [], []
    top_idx = set(torch.topk(ships, args.top).indices.tolist())
    for _ in range(args.n_permutations):
        perm = torch.randperm(n_heads, generator=g)
        perm_overlap.append(len(set(perm[: args.top].tolist()) & top_idx))
        perm_rho.append(spearman(change[perm], ships))
    p_overlap = sum(o >= overlap for o in perm_overlap) / len(perm_overlap)
    p_rho = sum(abs(r) >= abs(rho) for r in perm_rho) / len(perm_rho)
    emit(f"\n**Do the most changed heads coincide with the top Ships heads?** Top-{args.top} most changed heads "
         f"({format_heads(sorted(changed))}) vs the refusal model's top-{args.top} Ships heads ({format_heads(sorted(top_ships))}): "
         f"overlap **{overlap}** (random {args.top}-head sets: mean {sum(perm_overlap) / len(perm_overlap):.2f}, "
         f"P(overlap ≥ {overlap}) = {p_overlap:.3f}, {args.n_permutations} permutations). Spearman correlation of weight change "
         f"and Ships over all {n_heads} heads: **{rho:.3f}** (permutation p = {p_rho:.3f}).")
    if d.behaviour:
        emit("\n| model | intact | 2 most changed heads ablated | random pairs (mean) | min | max |")
        emit("|---|---|---|---|---|---|")
        for _, r in d.behaviour_frame().iterrows():
            emit(f"| {r['model']} | {r['intact']:.2f} | {r['changed_heads_ablated']:.2f} | {r['random_mean']:.2f} | {r['random_min']:.2f} | {r['random_max']:.2f} |")
    emit(f"\n_Diff computed in {d.seconds:.0f} s (CPU; the Ships scores are the shipped runs)._")
    emit.write()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
