"""`headlab diff A B [--kinds safety,induction] [...]`: flags generated from `DiffConfig`'s fields, defaults read from it."""
from __future__ import annotations

import argparse
import dataclasses
import json

from headlab.diff import DiffConfig

JSON_HELP = "print JSON"


def _flag_type(default):
    """How a flag's text is read, from the field's default: a tuple is a comma list, else as `headlab.cli` reads
    method flags (int, float, str, bool true/false); `n` (default None) is an int."""
    from headlab.cli import _flag_type as scalar_type

    if isinstance(default, tuple):
        return lambda text: tuple(item for item in text.replace(",", " ").split())
    return int if default is None else scalar_type(default)


def add_diff_parser(sub) -> None:
    """Add the `diff` subcommand to `sub` (two positional models instead of --model)."""
    p = sub.add_parser("diff", help="which heads did fine-tuning change: model B against model A, head by head")
    p.add_argument("model_a", help="'embedded', a Hugging Face name or a local folder")
    p.add_argument("model_b", help="a model of the same shape, e.g. 'embedded-refusal'")
    for field in dataclasses.fields(DiffConfig):
        p.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None, type=_flag_type(field.default),
                       help=f"default {field.default!r}" + (" (comma-separated)" if isinstance(field.default, tuple) else ""))
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="let a model folder run its own Python code")
    p.add_argument("--recompute", action="store_true", help="ignore a stored run")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_diff)


def cmd_diff(args: argparse.Namespace) -> int:
    import headlab as hl

    params = {f.name: getattr(args, f.name) for f in dataclasses.fields(DiffConfig) if getattr(args, f.name) is not None}
    DiffConfig(**params)  # bad flags fail before any model loads
    remote = {"trust_remote_code": True} if args.trust_remote_code else {}
    lab_a = hl.load(args.model_a, device=args.device, **remote)
    lab_b = hl.load(args.model_b, device=args.device, **remote)
    result = hl.diff(lab_a, lab_b, recompute=args.recompute, **params)
    if args.json:
        print(json.dumps({"model_a": result.model_a, "model_b": result.model_b, "summary": result.summary(),
                          "heads": result.to_frame().head(result.top).to_dict(orient="records"),
                          "behaviour": result.behaviour_frame().to_dict(orient="records")}, default=str))
        return 0
    print(result.summary())
    print(result.to_frame().head(result.top).to_string(index=False))
    for kind in result.scores:
        print(f"\n{kind}: ranks moved most\n{result.moved(kind).to_string(index=False)}")
    if result.behaviour:
        print(f"\nbehaviour\n{result.behaviour_frame().to_string(index=False)}")
    return 0
