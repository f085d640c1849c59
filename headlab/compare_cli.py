"""`headlab compare-masks`: every mask source at the same KV budgets on the RULER-style suite (`headlab.compare`).

    headlab compare-masks --sources retrieval,attention_area,random --budgets 0.25,0.5,0.75 --lengths 1024,2048 \
        --tasks niah_single,variable_tracking,prose_kl --n 10 --out compare.tsv   # or .json

One flag per `CompareConfig` field, generated from the dataclass (a list field takes comma-separated values); a
flag left out is not passed, so the library's default applies. `headlab/cli.py` wires it in with
`add_compare_parser(sub, model_args)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from headlab import validate
from headlab.compare import DEFAULTS, CompareConfig

ELEMENT_TYPES = {"budgets": float, "lengths": int, "seeds": int, "sources": str, "tasks": str}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _list_of(cast):
    def parse(text: str) -> tuple:
        items = [item for item in text.replace(",", " ").split() if item]
        try:
            return tuple(cast(item) for item in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {cast.__name__} values separated by commas, got {text!r}") from None
    return parse


def config_from_args(args) -> CompareConfig:
    """The `CompareConfig` the flags describe (flags left out keep the library's defaults), checked now."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig) if getattr(args, f.name) is not None}
    return CompareConfig(**given)


def source_params(pairs: list[str] | None) -> dict:
    """['duo_file:path=mask_dir/'] -> {'duo_file': {'path': 'mask_dir/'}}."""
    from headlab.cli import parse_assignments

    out: dict[str, dict] = {}
    for pair in pairs or []:
        source, sep, assignment = pair.partition(":")
        if not sep:
            raise ValueError(f"Write --source-param as SOURCE:KEY=VALUE (e.g. duo_file:path=mask_dir/); got {pair!r}.")
        out.setdefault(source.strip(), {}).update(parse_assignments([assignment], "--source-param"))
    return out


def cmd_compare_masks(args) -> int:
    from headlab.cli import load_lab
    from headlab.compare import compare_masks

    config = config_from_args(args)
    params = source_params(args.source_param)
    out = validate.out_file(args.out) if args.out else None
    lab = load_lab(args)
    result = compare_masks(lab, **{k: v for k, v in dataclasses.asdict(config).items()}, source_params=params,
                           recompute=args.recompute)
    frame = result.to_frame()
    if out is not None:
        write_table(result, out)
    if args.json:
        print(json.dumps({"rows": frame.to_dict(orient="records"), "winners": result.winners().to_dict(orient="records"),
                          "out": str(out) if out else None}))
        return 0
    print(result.summary().to_string(index=False))
    print(result.winners().to_string(index=False))
    if out is not None:
        print(f"-> {out}")
    return 0


def write_table(result, path) -> None:
    """The comparison's rows as TSV (a `.tsv` path) or JSON (any other), written atomically."""
    from pathlib import Path

    from headlab import store

    path = Path(path)
    frame = result.to_frame()
    if path.suffix == ".tsv":
        text = frame.to_csv(sep="\t", index=False)
        store._atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    else:
        store.write_json(path, {"model": result.model, "config": result.config, "rows": frame.to_dict(orient="records"),
                                "summary": result.summary().to_dict(orient="records"),
                                "winners": result.winners().to_dict(orient="records")})


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per `CompareConfig` field (default None: the library's default applies); lists comma-separated."""
    for f in dataclasses.fields(CompareConfig):
        default = getattr(DEFAULTS, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if f.name in ELEMENT_TYPES:
            p.add_argument(_flag(f.name), dest=f.name, default=None, type=_list_of(ELEMENT_TYPES[f.name]),
                           help=f"comma-separated (default: {shown if default is not None else 'every registered source that needs no file'})")
        else:
            p.add_argument(_flag(f.name), dest=f.name, default=None, type=type(default), help=f"default {shown}")
    p.add_argument("--source-param", action="append", metavar="SOURCE:KEY=VALUE",
                   help="a source's own parameter, e.g. duo_file:path=mask_dir/ (repeatable)")


def add_compare_parser(sub, model_args) -> argparse.ArgumentParser:
    """Add `compare-masks` to `sub` (the CLI's subparsers); its flags come from `CompareConfig`'s fields."""
    p = sub.add_parser("compare-masks", help="every mask source at equal KV budgets on a RULER-style suite, through the runtime")
    model_args(p)
    add_config_flags(p)
    p.add_argument("--out", default=None, help="write the table here: .tsv, else JSON")
    p.add_argument("--recompute", action="store_true", help="ignore stored runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_compare_masks)
    return p
