"""The `headlab` command line: batch jobs whose results land in the user's results folder (`$HEADLAB_RUNS`, default
`~/.cache/headlab/runs`), read before the shipped `cached_runs/`, which the CLI never writes.

Defaults are read, never retyped: a scorer's from its dataclass, an ablation method's flags are
generated from the registered methods' fields (`headlab.ablation.METHODS`), the curve's from
`CurveConfig`, a mask's from `MaskConfig` and the registered mask sources' fields (`headlab.mask_sources`). A flag left out is not passed, so the library's own
default applies.

Every input is checked (`headlab.validate`) before any work starts: what needs no model before the
model loads, heads, k, ks and contexts against the loaded model before anything is computed. A bad
input, like every expected error (`headlab.errors`), is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import dataclasses
import json
import sys
from typing import Callable

from headlab import store, validate
from headlab.heads import format_heads, head_label

JSON_HELP = "print JSON"


def parse_assignments(pairs: list[str] | None, what: str) -> dict:
    """['lengths=[256,512]', 'needle=fact'] -> {'lengths': [256, 512], 'needle': 'fact'}.

    A value is read as JSON when it parses (numbers, lists, true/false), else kept as a string.
    """
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Write {what} as KEY=VALUE (e.g. lengths=[256,512]); got {pair!r}.")
        params[key.strip()] = _json_or_text(value)
    return params


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _given(**values) -> dict:
    """The keyword arguments a user actually gave (flags left out are None): the callee's defaults apply to the rest."""
    return {key: value for key, value in values.items() if value is not None}


def load_lab(args):
    """The model `--model` names; its own code runs only with `--trust-remote-code`."""
    import headlab as hl

    from headlab.placement import parse_device_map

    return hl.load(args.model, device=args.device, **_given(trust_remote_code=True if args.trust_remote_code else None,
                                                            device_map=parse_device_map(getattr(args, "device_map", None))))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line `headlab: error: ...` (exit 2), like every other error."""

    def error(self, message: str):
        print(f"headlab: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# --- ablation method flags, generated from the registered methods' fields ---------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _dest(name: str) -> str:
    return f"method_{name}"


def registry_flag_fields(classes: dict[str, type]) -> dict[str, dict[str, object]]:
    """`{field: {name: default}}` over the registered dataclasses `classes` (`{name: class}`), fields in declaration order."""
    fields: dict[str, dict[str, object]] = {}
    for name in sorted(classes):
        for field in dataclasses.fields(classes[name]):
            fields.setdefault(field.name, {})[name] = field.default
    return fields


def method_flag_fields() -> dict[str, dict[str, object]]:
    """`{field: {method: default}}` over every registered ablation method, fields in declaration order."""
    from headlab.ablation import METHODS

    return registry_flag_fields(METHODS)


OWN_FLAG_NAMES = {"kind": "--kind", "seed": "--seed", "score_params": "--param"}  # mask-source fields with flags of their own


def mask_source_flag_fields() -> dict[str, dict[str, object]]:
    """`{field: {mask source: default}}` over every registered mask source, but those with flags of their own."""
    from headlab.mask_sources import source_class, source_names

    fields = registry_flag_fields({name: source_class(name) for name in source_names()})
    return {name: owners for name, owners in fields.items() if name not in OWN_FLAG_NAMES}


def _read_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag_type(default) -> Callable[[str], object]:
    """How a flag's text is read: like the field's default (int, float, str, bool), else as JSON."""
    if isinstance(default, bool):
        return _read_bool
    if isinstance(default, (int, float, str)):
        return type(default)
    return _json_or_text


def _add_registry_args(p: argparse.ArgumentParser, fields: dict[str, dict[str, object]], prefix: str, what: str) -> None:
    """One flag per distinct field (`fields` as `registry_flag_fields`); default None so the owner's own default applies."""
    for name, defaults in fields.items():
        owners = ", ".join(f"{owner} (default {default!r})" for owner, default in defaults.items())
        p.add_argument(_flag(name), dest=f"{prefix}_{name}", metavar=name.upper(), default=None,
                       type=_flag_type(next(iter(defaults.values()))), help=f"{what} parameter {name!r} of {owners}")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    _add_registry_args(p, method_flag_fields(), "method", "ablation method")


def _chosen_params(args, fields: dict, takes, prefix: str, owner: str) -> dict:
    """The registry flags given (`prefix_<field>` in `args`), checked against `takes`, the chosen `owner`'s fields."""
    given = {name: getattr(args, f"{prefix}_{name}") for name in fields if getattr(args, f"{prefix}_{name}", None) is not None}
    foreign = [name for name in given if name not in takes]
    if foreign:
        flags = ", ".join(_flag(name) for name in foreign)
        allowed = ", ".join(OWN_FLAG_NAMES.get(name, _flag(name)) for name in takes) or "no parameters"
        raise ValueError(f"{flags} is not a parameter of {owner}; it takes {allowed}.")
    return given


def chosen_method_params(args) -> dict:
    """The method flags given, checked against `args.method`'s fields (a flag of another method is an error)."""
    from headlab.ablation import method_fields

    return _chosen_params(args, method_flag_fields(), method_fields(args.method), "method",
                          f"ablation method '{args.method}'")


# --- commands ---------------------------------------------------------------------------------------

def score_params(args) -> dict:
    """`--param` pairs plus `--n` / `--seed` when given, checked against the scorer's fields and their types
    before any model loads."""
    from headlab.scorers import make_scorer, scorer_fields

    params = parse_assignments(args.param, "--param")
    takes = scorer_fields(args.kind)
    for name, value in _given(n=args.n, seed=args.seed).items():
        if name not in takes:
            raise ValueError(f"--{name}: score kind '{args.kind}' takes no parameter '{name}'; "
                             f"it takes {', '.join(takes)}.")
        params[name] = value
    make_scorer(args.kind, **params)  # the types and counts, checked now
    return params


def cmd_score(args) -> int:
    import headlab as hl

    params = score_params(args)
    validate.count(args.top, "--top")
    out = validate.out_file(args.out) if args.out else None
    lab = load_lab(args)
    scores = hl.score(lab, args.kind, recompute=args.recompute, **params)
    path = scores.save(out) if out else scores.path()
    top = scores.top(args.top)
    if args.json:
        print(json.dumps({"kind": scores.kind, "model": scores.model, "params": scores.params, "path": str(path),
                          "top": [{"layer": l, "head": h, "label": head_label(l, h), "value": v} for l, h, v in top]}))
    else:
        print(f"{scores.kind} scores for {scores.model} -> {path}")
        for layer, head, value in top:
            print(f"  {head_label(layer, head):>7}  {value:.3f}")
    return 0


def _print_frame(frame, as_json: bool) -> None:
    print(frame.to_json(orient="records") if as_json else frame.to_string(index=False))


def _run_curve(lab, args, method_params: dict, task_params: dict, score_params: dict) -> int:
    import headlab as hl

    ks = validate.curve_ks(validate.int_list(args.ks, "--ks"), lab.info)
    scores = hl.score(lab, args.kind, **score_params)
    curve = hl.ablation_curve(lab, scores, task=args.task, ks=ks, method=args.method,
                              n_random=args.n_random, task_params=task_params, method_params=method_params,
                              recompute=args.recompute, **_given(n=args.n, seed=args.seed))
    _print_frame(curve.to_frame(), args.json)
    return 0


def _ablate_inputs(args) -> tuple[dict, dict, dict]:
    """The method, task and score parameters of `ablate`, checked before the model loads."""
    from headlab.scorers import make_scorer

    method_params = chosen_method_params(args)
    task_params = parse_assignments(args.task_param, "--task-param")
    score_params = parse_assignments(args.param, "--param")
    for value, flag in ((args.n, "--n"), (args.n_random, "--n-random")):
        if value is not None:
            validate.count(value, flag)
    if args.curve:
        validate.int_list(args.ks, "--ks")
    if args.curve or args.heads is None:
        make_scorer(args.kind, **score_params)
    return method_params, task_params, score_params


def cmd_ablate(args) -> int:
    import headlab as hl

    method_params, task_params, score_params = _ablate_inputs(args)
    lab = load_lab(args)
    if args.curve:
        return _run_curve(lab, args, method_params, task_params, score_params)
    if args.heads is not None:  # an empty --heads '' is an error, never "the top-k"
        heads = validate.heads(args.heads, lab.info)
    else:
        k = validate.top_k(args.k, lab.info)
        heads = hl.score(lab, args.kind, **score_params).top_heads(k)
    result = hl.ablate(lab, heads, task=args.task, method=args.method, task_params=task_params,
                       method_params=method_params, **_given(n=args.n, seed=args.seed))
    row = {"task": result.task, "metric": result.metric, "method": result.method, "method_params": result.method_params,
           "heads": result.heads, "baseline": result.baseline, "ablated": result.ablated, "damage": result.damage}
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{result.task} ({result.metric}), {result.method}-ablating {format_heads(heads)}: "
              f"{result.baseline:.4f} intact -> {result.ablated:.4f} ablated")
    return 0


def _mask_config(args) -> dict:
    """The mask flags (`MaskConfig`'s fields, the chosen source's generated flags, `--param` for its score),
    checked before the model loads."""
    from headlab.mask_sources import make_source, source_fields
    from headlab.masks import MaskConfig

    config = dict(kind=args.kind, full_fraction=args.full_fraction, threshold=args.threshold, sink=args.sink,
                  recent=args.recent, seed=args.seed)
    MaskConfig(source=args.source, **config)
    takes = source_fields(args.source)
    own = _chosen_params(args, mask_source_flag_fields(), takes, "source", f"mask source '{args.source}'")
    score_params = parse_assignments(args.param, "--param")
    if score_params and "score_params" not in takes:
        raise ValueError(f"--param (score parameters) is not a parameter of mask source '{args.source}'.")
    if score_params:
        own["score_params"] = score_params
    make_source(args.source, **own, **{k: config[k] for k in ("kind", "seed") if k in takes})  # its types and values, checked now
    return {**config, **own, "source": args.source}


def _make_mask(lab, config: dict):
    """The mask `--source` and the mask flags describe (`MaskConfig`'s fields)."""
    from headlab.masks import make_mask

    return make_mask(lab, **config)


def cmd_export_mask(args) -> int:
    out = validate.out_file(args.out)
    duo = validate.out_folder(args.duo) if args.duo else None
    config = _mask_config(args)
    mask = _make_mask(load_lab(args), config)
    paths = {"json": str(mask.save(out))}
    if duo:
        paths["duo"] = str(mask.save_duo(duo))
    if args.json:
        print(json.dumps({"mask": repr(mask), "n_full": mask.n_full, "n_kv_heads": mask.full.numel(), **paths}))
    else:
        print(f"{mask!r}\n-> {', '.join(paths.values())}")
    return 0


def _same_budget_quality(lab, mask, args) -> list[dict]:
    """Needle accuracy and KL of `mask` vs a random and an all-streaming mask of the same budget."""
    from headlab.runtime.quality import quality_at_budget

    frame = quality_at_budget(lab, mask, lengths=validate.contexts(validate.int_list(args.lengths, "--lengths"),
                                                                   lab.info, "--lengths"),
                              depths=validate.float_list(args.depths, "--depths"), n=args.n)
    return frame.to_dict(orient="records")


def _bench_inputs(args) -> dict:
    """What `bench-runtime` measures, checked before the model loads (contexts again against it after)."""
    from headlab.runtime.benchmark import KINDS

    inputs = {"caches": validate.caches(args.caches, KINDS), "contexts": validate.int_list(args.contexts, "--contexts"),
              "new_tokens": validate.count(args.new_tokens, "--new-tokens")}
    if args.quality:
        validate.count(args.n, "--n")
        validate.int_list(args.lengths, "--lengths")
        validate.float_list(args.depths, "--depths")
    if not args.mask:
        inputs["mask_config"] = _mask_config(args)
    return inputs


def cmd_bench_runtime(args) -> int:
    from headlab import runtime
    from headlab.masks import HeadMask

    inputs = _bench_inputs(args)
    lab = load_lab(args)
    from headlab.runtime import benchmark

    warmup = inspect.signature(benchmark.measure).parameters["warmup"].default  # decode steps before the timed ones
    contexts = validate.contexts(inputs["contexts"], lab.info, extra_tokens=inputs["new_tokens"] + warmup)
    mask = HeadMask.load(args.mask, info=lab.info) if args.mask else _make_mask(lab, inputs["mask_config"])
    table = runtime.measure(lab, mask, contexts=contexts, new_tokens=inputs["new_tokens"], kinds=inputs["caches"])
    out = {"mask": repr(mask), "measure": table.to_dict(orient="records")}
    if args.quality:
        out["quality"] = _same_budget_quality(lab, mask, args)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{mask!r}\n{table.to_string(index=False)}")
    if args.quality:
        import pandas as pd

        print(pd.DataFrame(out["quality"]).to_string(index=False))
    return 0


def cmd_runs(args) -> int:
    rows = store.list_runs()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"No runs stored under {store.runs_dir()} (yours) or {store.shipped_dir()} (shipped).")
    for row in rows:
        print(f"{row['where']:<8} {row['model']:<28} {row['record']:<15} {row['kind']:<16} {row['path']}")
    return 0


def cmd_app(args) -> int:
    """Serve the app; a non-loopback --host without --allow-remote is refused before the model loads
    (`launch` prints what a remote app exposes when it starts)."""
    from app.main import launch

    auth = validate.auth_pair(args.auth)
    files_dir = validate.files_dir(args.files_dir)
    validate.serve_host(args.host, args.allow_remote)
    launch(host=args.host, port=args.port, lab=load_lab(args), allow_remote=args.allow_remote, auth=auth,
           files_dir=files_dir)
    return 0


# --- the parser: one function per subcommand's arguments ---------------------------------------------

def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="'embedded', a Hugging Face name or a local folder")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--device-map", default=None, help="shard a model larger than one GPU over this host's GPUs: auto, "
                   "balanced, ... or a JSON object {module: device} (instead of --device)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a model folder or hub repository run its own Python code (only for code you trust)")


def _score_source_args(p: argparse.ArgumentParser, kind: str, kind_help: str) -> None:
    import headlab as hl

    p.add_argument("--kind", default=kind, choices=hl.kinds(), help=f"{kind_help} (default %(default)s)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="parameters of the --kind score (repeatable)")


def score_args(p: argparse.ArgumentParser) -> None:
    import headlab as hl

    p.add_argument("kind", choices=hl.kinds())
    model_args(p)
    p.add_argument("--n", type=int, default=None, help="number of samples (default: the scorer's)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the scorer's; not every scorer takes one)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="any other scorer parameter, e.g. needle=fact, lengths=[256,512], domain=code (repeatable)")
    p.add_argument("--top", type=int, default=10, help="how many top heads to print")
    p.add_argument("--out", default=None, help="also write the result to this JSON path")
    p.add_argument("--recompute", action="store_true", help="ignore a stored run")
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def ablate_args(p: argparse.ArgumentParser) -> None:
    import headlab as hl
    from headlab.ablation import METHODS, CurveConfig

    curve = CurveConfig()
    model_args(p)
    p.add_argument("--heads", default=None, help="heads, e.g. 'L18H6,L17H3' or '18.6,17.3' (default: top-k of --kind)")
    _score_source_args(p, "induction", "score kind for top-k")
    p.add_argument("--k", type=int, default=4, help="how many top heads of --kind to ablate (default %(default)s)")
    p.add_argument("--task", default=curve.task, choices=hl.task_names(), help="default %(default)s")
    p.add_argument("--method", default=curve.method, choices=sorted(METHODS), help="default %(default)s")
    _add_method_args(p)
    p.add_argument("--n", type=int, default=None, help=f"task samples (default: the task's own; --curve: {curve.n})")
    p.add_argument("--seed", type=int, default=None, help="task (and random sets') seed (default: the library's)")
    p.add_argument("--task-param", action="append", metavar="KEY=VALUE",
                   help="task parameters, e.g. lengths=[256] haystack=prose (repeatable)")
    p.add_argument("--curve", action="store_true", help="top-k of --kind vs random-k for each of --ks")
    p.add_argument("--ks", default=",".join(map(str, curve.ks)), help="--curve: the ks (default %(default)s)")
    p.add_argument("--n-random", type=int, default=curve.n_random, help="--curve: random sets per k (default %(default)s)")
    p.add_argument("--recompute", action="store_true", help="--curve: ignore a stored run")
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def _fraction_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def mask_args(p: argparse.ArgumentParser) -> None:
    """`MaskConfig`'s fields as flags, defaults read from it; then every mask source's own parameters (generated)."""
    from headlab.masks import MaskConfig, mask_sources

    config = MaskConfig()
    p.add_argument("--source", default=config.source, choices=mask_sources(), help="how full KV heads are chosen (default %(default)s)")
    _score_source_args(p, config.kind, "--source score: the score kind whose top KV heads stay full")
    p.add_argument("--full-fraction", type=_fraction_or_none, default=config.full_fraction,
                   help="share of KV heads that keep the full cache (default %(default)s); 'none': the source's own cut "
                        "(duo, duo_file: gate >= 0.5)")
    p.add_argument("--threshold", type=float, default=config.threshold,
                   help="instead: KV heads whose group score is above this stay full")
    p.add_argument("--sink", type=int, default=config.sink, help="first tokens a streaming head keeps (default %(default)s)")
    p.add_argument("--recent", type=int, default=config.recent,
                   help="last tokens a streaming head keeps (default %(default)s)")
    p.add_argument("--seed", type=int, default=config.seed, help="the seed of a seeded source (random, duo) (default %(default)s)")
    _add_registry_args(p, mask_source_flag_fields(), "source", "mask source")


def export_mask_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    mask_args(p)
    p.add_argument("--out", required=True, help="headlab.head_mask/v1 JSON path")
    p.add_argument("--duo", default=None, help="also write the DuoAttention folder (full_attention_heads.tsv + config.json)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def bench_runtime_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--mask", default=None, help="a head-mask JSON file or DuoAttention folder (default: build one)")
    mask_args(p)
    p.add_argument("--contexts", default="512,1024", help="context lengths to measure, e.g. 8192,32768")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per context")
    from headlab.runtime.benchmark import DEFAULT_KINDS, KINDS
    from headlab.runtime.quality import quality

    grid = {name: param.default for name, param in inspect.signature(quality).parameters.items()}  # quality()'s defaults
    p.add_argument("--caches", default=",".join(DEFAULT_KINDS),
                   help=f"caches to measure, from {', '.join(KINDS)} (kvpress_duo needs kvpress)")
    p.add_argument("--quality", action="store_true", help="also needle accuracy and KL vs the full cache, against a random "
                                                          "and an all-streaming mask at the same budget")
    p.add_argument("--lengths", default=",".join(map(str, grid["lengths"])), help="--quality: needle context lengths")
    p.add_argument("--depths", default=",".join(map(str, grid["depths"])), help="--quality: needle depths")
    p.add_argument("--n", type=int, default=grid["n"], help="--quality: needles per (length, depth)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def app_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--allow-remote", action="store_true",
                   help="required for a --host other than 127.0.0.1/localhost/::1: the app then runs the model, "
                        "uses this machine's compute and reads --files-dir for anyone who can reach it")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login (Gradio's own auth)")
    p.add_argument("--files-dir", default=None, metavar="DIR",
                   help="the one folder whose files the app may read (haystacks, datasets); default: uploads only")
    model_args(p)


COMMANDS = [  # (name, help, arguments, command); `channels` is added by headlab.circuits.cli after ablate
    ("score", "score every head for one behaviour", score_args, cmd_score),
    ("ablate", "ablate heads and measure a task (or a top-k vs random-k curve)", ablate_args, cmd_ablate),
    ("export-mask", "a head mask (full-KV vs streaming KV heads) as JSON and/or a DuoAttention folder",
     export_mask_args, cmd_export_mask),
    ("bench-runtime", "KV memory, speed and quality of a head mask in the compressed-KV runtime",
     bench_runtime_args, cmd_bench_runtime),
    ("runs", "list stored runs", runs_args, cmd_runs),
    ("app", "launch the web app", app_args, cmd_app),
]


def build_parser() -> argparse.ArgumentParser:
    """The `headlab` parser, built from the registries as they are now (scorers, tasks, ablation methods)."""
    from headlab.circuits.cli import add_channels_parser
    from headlab.diff.cli import add_diff_parser
    from headlab.compare_cli import add_compare_parser

    parser = _Parser(prog="headlab", description="What does each attention head do, and which ones can we cut?")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_args, command in COMMANDS:
        command_parser = sub.add_parser(name, help=help_text)
        add_args(command_parser)
        command_parser.set_defaults(func=command)
        if name == "ablate":
            add_channels_parser(sub, model_args)
            add_diff_parser(sub)
        if name == "export-mask":
            add_compare_parser(sub, model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    from headlab.errors import EXPECTED_ERRORS, user_message

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2, one line already printed)
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.func(args)
    except EXPECTED_ERRORS as err:
        print(f"headlab: error: {user_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
