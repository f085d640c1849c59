"""`headlab channels`: one pair's SVD channel (and its causal test), or the all-pairs composition map.

    headlab channels L16H0 L18H6,L17H3,L17H4 --kind k [--experiment --task repeated_tokens --n 8]
    headlab channels --map --kind k --top 20 [--layers 10-20]

`headlab/cli.py` wires it in with `add_channels_parser(sub, model_args)`.
"""
from __future__ import annotations

import argparse
import json

from headlab import validate
from headlab.heads import check_layer


def _layer_range(text: str | None, info=None) -> tuple[int, int] | None:
    """'10-20' -> (10, 20); with `info`, both ends are checked against the model's layers."""
    if not text:
        return None
    try:
        low, high = (int(part) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"Write a layer range as LOW-HIGH, e.g. '10-20'; got {text!r}.") from None
    if low > high:
        raise ValueError(f"--layers {text!r}: LOW must not be above HIGH.")
    if info is not None:
        check_layer(info, low), check_layer(info, high)
    return low, high


def _check_counts(args) -> tuple[int, ...] | None:
    """`--top`, `--n`, `--n-random` and `--ranks`, checked before the model loads; returns the ranks."""
    validate.count(args.top, "--top")
    validate.count(args.n, "--n")
    validate.count(args.n_random, "--n-random")
    _layer_range(args.layers)
    if not args.ranks:
        return None
    return tuple(validate.count(rank, "--ranks") for rank in validate.int_list(args.ranks, "--ranks"))


def _print_map(lab, args) -> int:
    from headlab.circuits import composition_map

    layers = _layer_range(args.layers, lab.info)
    cmap = composition_map(lab, args.kind, fold_ln=not args.no_fold_ln, recompute=args.recompute)
    frame = cmap.to_frame(args.top, layers)
    if args.json:
        print(json.dumps({"kind": cmap.kind, "model": cmap.model, "path": str(cmap.path()), "baseline": cmap.baseline,
                          "top": frame.to_dict(orient="records")}))
    else:
        base = cmap.baseline
        print(f"{cmap.title} -> {cmap.path()}\nrandom matrices: {base['mean']:.4f} ± {base['std']:.4f} (99th pct {base['q99']:.4f})")
        print(frame.to_string(index=False))
    return 0


def cmd_channels(args) -> int:
    import headlab as hl
    from headlab.circuits import channel_experiment
    from headlab.cli import load_lab

    ranks = _check_counts(args)
    if not args.map and (not args.sender or not args.receivers):
        raise ValueError("Give a sender and receiver heads, e.g. `headlab channels L16H0 L18H6,L17H3` (or use --map).")
    lab = load_lab(args)
    if args.map:
        return _print_map(lab, args)
    sender = validate.heads(args.sender, lab.info, "the sender")
    if len(sender) != 1:
        raise ValueError(f"Give exactly one sender head; got {args.sender!r}.")
    receivers = validate.heads(",".join(args.receivers), lab.info, "the receivers")
    report = hl.channels(lab, sender[0], receivers, args.kind, fold_ln=not args.no_fold_ln)
    path = report.save()
    out = {"summary": report.summary(), "path": str(path), "directions": report.to_frame().head(args.top).to_dict(orient="records")}
    if args.experiment:
        exp = channel_experiment(lab, report, args.task, ranks=ranks, n_random=args.n_random, n=args.n, seed=args.seed,
                                 recompute=args.recompute)
        out["experiment"] = {"summary": exp.summary(), "table": exp.to_frame().to_dict(orient="records")}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{report.summary()}\n-> {path}")
    print(report.to_frame().head(args.top).to_string(index=False))
    print(report.tokens_frame().to_string(index=False))
    if args.experiment:
        print(out["experiment"]["summary"])
    return 0


def add_channels_parser(sub, model_args) -> argparse.ArgumentParser:
    """Add the `channels` subcommand to `sub` (the CLI's subparsers); `model_args(p)` adds --model/--device."""
    import headlab as hl
    from headlab.circuits.intervention import DEFAULTS

    p = sub.add_parser("channels", help="SVD channels between heads (Talking Heads) or the composition map")
    p.add_argument("sender", nargs="?", help="sender head, e.g. L16H0 (or 16.0)")
    p.add_argument("receivers", nargs="*", help="receiver head(s), e.g. L18H6,L17H3 (a group is read as one)")
    model_args(p)
    p.add_argument("--kind", default="k", choices=["q", "k", "v"], help="which input of the receiver the sender feeds")
    p.add_argument("--map", action="store_true", help="print the top pairs of the all-pairs composition map instead")
    p.add_argument("--layers", default=None, help="--map: only heads of layers LOW-HIGH")
    p.add_argument("--top", type=int, default=20, help="rows to print")
    p.add_argument("--no-fold-ln", action="store_true", help="use the raw W_Q/W_K/W_V (TransformerLens' own scores)")
    p.add_argument("--experiment", action="store_true", help="remove the channel vs random subspaces on --task")
    p.add_argument("--task", default=DEFAULTS.task, choices=hl.task_names())
    p.add_argument("--ranks", default=None, help="channel ranks, e.g. '8,16' (default: 50%% and 90%% of the composition)")
    p.add_argument("--n", type=int, default=DEFAULTS.n, help="task samples")
    p.add_argument("--n-random", type=int, default=DEFAULTS.n_random, help="random subspaces per rank")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--recompute", action="store_true", help="ignore stored runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_channels)
    return p
