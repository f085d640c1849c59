"""The `headlab` command line: batch jobs whose results land in the store (`cached_runs/`)."""
from __future__ import annotations

import argparse
import json
import sys

from headlab import store
from headlab.heads import parse_heads


def parse_assignments(pairs: list[str] | None, what: str) -> dict:
    """['lengths=[256,512]', 'needle=fact'] -> {'lengths': [256, 512], 'needle': 'fact'}.

    A value is read as JSON when it parses (numbers, lists, true/false), else kept as a string.
    """
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Write {what} as KEY=VALUE (e.g. lengths=[256,512]); got {pair!r}.")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


def _load(args):
    import headlab as hl

    return hl.load(args.model, device=args.device)


def cmd_score(args) -> int:
    import headlab as hl

    lab = _load(args)
    params = parse_assignments(args.param, "--param")
    params.update({k: v for k, v in {"n": args.n, "seed": args.seed}.items() if v is not None})
    scores = hl.score(lab, args.kind, recompute=args.recompute, **params)
    path = scores.save(args.out) if args.out else scores.path()
    top = scores.top(args.top)
    if args.json:
        print(json.dumps({"kind": scores.kind, "model": scores.model, "params": scores.params, "path": str(path),
                          "top": [{"layer": l, "head": h, "value": v} for l, h, v in top]}))
    else:
        print(f"{scores.kind} scores for {scores.model} -> {path}")
        for layer, head, value in top:
            print(f"  L{layer:>2} H{head:>2}  {value:.3f}")
    return 0


def _method_params(args) -> dict:
    if args.method == "streaming_window":
        return {"sink": args.sink, "recent": args.recent}
    return {"epsilon": args.epsilon} if args.method == "scaled_query" else {}


def cmd_ablate(args) -> int:
    import headlab as hl

    lab = _load(args)
    task_params = parse_assignments(args.task_param, "--task-param")
    score_params = parse_assignments(args.param, "--param")
    if args.curve:
        scores = hl.score(lab, args.kind, **score_params)
        ks = [int(k) for k in args.ks.split(",")]
        curve = hl.ablation_curve(lab, scores, task=args.task, ks=ks, method=args.method, n_random=args.n_random,
                                  n=args.n, seed=args.seed, task_params=task_params, method_params=_method_params(args),
                                  recompute=args.recompute)
        frame = curve.to_frame()
        print(frame.to_json(orient="records") if args.json else frame.to_string(index=False))
        return 0
    heads = parse_heads(args.heads) if args.heads else hl.score(lab, args.kind, **score_params).top_heads(args.k)
    result = hl.ablate(lab, heads, task=args.task, method=args.method, n=args.n, seed=args.seed,
                       task_params=task_params, method_params=_method_params(args))
    row = {"task": result.task, "metric": result.metric, "method": result.method, "heads": result.heads,
           "baseline": result.baseline, "ablated": result.ablated, "damage": result.damage}
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{result.task} ({result.metric}), {result.method}-ablating {heads}: "
              f"{result.baseline:.4f} intact -> {result.ablated:.4f} ablated")
    return 0


def cmd_export_mask(args) -> int:
    from headlab.masks import make_mask

    lab = _load(args)
    mask = make_mask(lab, args.source, kind=args.kind, full_fraction=args.full_fraction, threshold=args.threshold,
                      sink=args.sink, recent=args.recent, seed=args.seed, score_params=parse_assignments(args.param, "--param"))
    paths = {"json": str(mask.save(args.out))}
    if args.duo:
        paths["duo"] = str(mask.save_duo(args.duo))
    if args.json:
        print(json.dumps({"mask": repr(mask), "n_full": mask.n_full, "n_kv_heads": mask.full.numel(), **paths}))
    else:
        print(f"{mask!r}\n-> {', '.join(paths.values())}")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(item) for item in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{what} must be whole numbers separated by commas, e.g. 512,1024; got {text!r}.") from None


def cmd_bench_runtime(args) -> int:
    from headlab import runtime
    from headlab.masks import HeadMask, make_mask
    from headlab.runtime.quality import quality

    lab = _load(args)
    if args.mask:
        mask = HeadMask.load(args.mask, info=lab.info)
    else:
        mask = make_mask(lab, args.source, kind=args.kind, full_fraction=args.full_fraction, sink=args.sink,
                         recent=args.recent, score_params=parse_assignments(args.param, "--param"))
    table = runtime.measure(lab, mask, contexts=_int_list(args.contexts, "--contexts"), new_tokens=args.new_tokens,
                            kinds=[kind.strip() for kind in args.caches.split(",") if kind.strip()])
    out = {"mask": repr(mask), "measure": table.to_dict(orient="records")}
    if args.quality:
        same_budget = {
            "this mask": mask,
            "random, same budget": HeadMask.random(lab.info, mask.full_fraction, sink=mask.sink, recent=mask.recent),
            "all streaming": HeadMask.all_streaming(lab.info, sink=mask.sink, recent=mask.recent),
        }
        lengths = _int_list(args.lengths, "--lengths")
        depths = [float(d) for d in args.depths.replace(",", " ").split()]
        out["quality"] = quality(lab, same_budget, lengths=lengths, depths=depths, n=args.n, kl_tokens=max(lengths)).to_dict(orient="records")
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
        print(f"No runs stored under {store.runs_dir()}.")
    for row in rows:
        print(f"{row['model']:<28} {row['record']:<15} {row['kind']:<16} {row['path']}")
    return 0


def cmd_app(args) -> int:
    from app.main import launch

    launch(host=args.host, port=args.port, lab=_load(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    import headlab as hl
    from headlab.ablation import METHODS
    from headlab.circuits.cli import add_channels_parser

    parser = argparse.ArgumentParser(prog="headlab", description="What does each attention head do, and which ones can we cut?")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", default="embedded", help="'embedded', a Hugging Face name or a local folder")
        p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")

    p = sub.add_parser("score", help="score every head for one behaviour")
    p.add_argument("kind", choices=hl.kinds())
    model_args(p)
    p.add_argument("--n", type=int, default=None, help="number of samples")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="any other scorer parameter, e.g. needle=fact, lengths=[256,512], domain=code (repeatable)")
    p.add_argument("--top", type=int, default=10, help="how many top heads to print")
    p.add_argument("--out", default=None, help="also write the result to this JSON path")
    p.add_argument("--recompute", action="store_true", help="ignore a stored run")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("ablate", help="ablate heads and measure a task (or a top-k vs random-k curve)")
    model_args(p)
    p.add_argument("--heads", default=None, help="heads as LAYER.HEAD, e.g. '18.6,17.3' (default: top-k of --kind)")
    p.add_argument("--kind", default="induction", choices=hl.kinds(), help="score kind for top-k")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="parameters of the --kind score (repeatable)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--task", default="repeated_tokens", choices=hl.task_names())
    p.add_argument("--method", default="mean", choices=sorted(METHODS))
    p.add_argument("--sink", type=int, default=4, help="streaming_window: first tokens every query keeps")
    p.add_argument("--recent", type=int, default=64, help="streaming_window: last tokens every query keeps")
    p.add_argument("--epsilon", type=float, default=1e-3, help="scaled_query: the factor the heads' queries are scaled by")
    p.add_argument("--n", type=int, default=None, help="task samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-param", action="append", metavar="KEY=VALUE",
                   help="task parameters, e.g. lengths=[256] haystack=prose (repeatable)")
    p.add_argument("--curve", action="store_true", help="top-k of --kind vs random-k for each of --ks")
    p.add_argument("--ks", default="1,2,4,8")
    p.add_argument("--n-random", type=int, default=5)
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ablate)

    add_channels_parser(sub, model_args)

    p = sub.add_parser("export-mask", help="a head mask (full-KV vs streaming KV heads) as JSON and/or a DuoAttention folder")
    model_args(p)
    p.add_argument("--source", default="score", choices=["score", "random", "all_streaming"])
    p.add_argument("--kind", default="retrieval", choices=hl.kinds(), help="score kind whose top KV heads stay full")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="parameters of the --kind score (repeatable)")
    p.add_argument("--full-fraction", type=float, default=0.5, help="share of KV heads that keep the full cache")
    p.add_argument("--threshold", type=float, default=None, help="instead: KV heads whose group score is above this stay full")
    p.add_argument("--sink", type=int, default=64, help="first tokens a streaming head keeps")
    p.add_argument("--recent", type=int, default=256, help="last tokens a streaming head keeps")
    p.add_argument("--seed", type=int, default=0, help="--source random: the seed")
    p.add_argument("--out", required=True, help="headlab.head_mask/v1 JSON path")
    p.add_argument("--duo", default=None, help="also write the DuoAttention folder (full_attention_heads.tsv + config.json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export_mask)

    p = sub.add_parser("bench-runtime", help="KV memory, speed and quality of a head mask in the compressed-KV runtime")
    model_args(p)
    p.add_argument("--mask", default=None, help="a head-mask JSON file or DuoAttention folder (default: build one)")
    p.add_argument("--source", default="score", choices=["score", "random", "all_streaming"])
    p.add_argument("--kind", default="retrieval", choices=hl.kinds())
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="parameters of the --kind score (repeatable)")
    p.add_argument("--full-fraction", type=float, default=0.5)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--contexts", default="512,1024", help="context lengths to measure, e.g. 8192,32768")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per context")
    p.add_argument("--caches", default="hf_full,compressed",
                   help="caches to measure, from hf_full, hf_static, kvpress_duo (needs kvpress), compressed")
    p.add_argument("--quality", action="store_true", help="also needle accuracy and KL vs the full cache, against a random "
                                                          "and an all-streaming mask at the same budget")
    p.add_argument("--lengths", default="1024", help="--quality: needle context lengths")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="--quality: needle depths")
    p.add_argument("--n", type=int, default=1, help="--quality: needles per (length, depth)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_runtime)

    p = sub.add_parser("runs", help="list stored runs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("app", help="launch the web app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    model_args(p)
    p.set_defaults(func=cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    from headlab.errors import EXPECTED_ERRORS, user_message

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as err:
        print(f"headlab: error: {user_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
