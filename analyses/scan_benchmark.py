"""Benchmark: a per-head ablation scan as a plain loop (one forward pass per head) vs the batched scan.

    .venv/bin/python analyses/scan_benchmark.py [--device cuda] [--model PATH] [--sizes 8x32,2x16]
        [--chunk N] [--no-readme]

Same inputs, same measure (KL of the next-token distribution at the last position, scaled-query
ablation, every head of the model), three ways:
- loop: one full `lab.model(...)` forward per head with `headlab.ablation`'s hooks for that head;
- batched, full passes: `ablation_scan(..., shared_prefix=False, positions="all")`, heads stacked
  along the batch, every pass the whole model (what the scan did before);
- batched: `ablation_scan` as it runs by default, the intact prefix shared (a chunk runs only from
  its lowest layer on) and only the last position unembedded.
Checks they agree, prints a table and (unless --no-readme) writes it into analyses/README.md under
"scan_benchmark_cpu" or "scan_benchmark_gpu". `--model` is anything `hl.load` takes (default the
embedded model; a local Hugging Face folder where the GGUF package is not installed).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

import headlab as hl
from headlab.ablation import ScaledQuery, ablation_hooks
from headlab.heads import all_heads, head_label
from headlab.scan import ablation_scan, heads_per_pass, last_token_kl, layer_chunks
from report import write_section  # analyses/report.py

TEXT = ("The committee met on Tuesday to discuss the budget for the new library, and after a long debate "
        "the members agreed to fund the children's reading room before anything else was built. ")
METHOD = ScaledQuery()  # the method's own default epsilon


def timed(lab, fn) -> tuple[float, torch.Tensor]:
    """Seconds `fn()` takes (CUDA synchronised) and its result."""
    sync = torch.cuda.synchronize if lab.device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


@torch.no_grad()
def plain_loop(lab, tokens: torch.Tensor, measure) -> torch.Tensor:
    """`[n_layers, n_heads]`: one ordinary full forward per head, that head scaled-query ablated."""
    out = torch.full((lab.info.n_layers, lab.info.n_heads), float("nan"))
    for layer, head in all_heads(lab.info):
        hooks = ablation_hooks(lab, [(layer, head)], METHOD)
        logits = lab.model.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)  # [batch, pos, V]
        out[layer, head] = float(measure(logits[None].float())[0])
    return out


def block_work(lab, tokens: torch.Tensor, chunk: int | None) -> tuple[int, float]:
    """Passes of the default scan and the fraction of the loop's block-rows it runs (prefix sharing)."""
    chunks = layer_chunks(all_heads(lab.info), heads_per_pass(lab, tokens, chunk, "last"))
    rows = sum(len(part) * (lab.info.n_layers - min(l for l, _ in part)) for part in chunks)
    return len(chunks), rows / (len(all_heads(lab.info)) * lab.info.n_layers)


def run(lab, n_prompts: int, n_tokens: int, chunk: int | None) -> dict:
    """Time the scan three ways on `n_prompts` prompts of `n_tokens` tokens; check they agree."""
    ids = lab.to_tokens(TEXT * (1 + (n_prompts * 7 + n_tokens) // 30))[0]
    tokens = torch.stack([ids[i * 7 : i * 7 + n_tokens] for i in range(n_prompts)]).to(lab.device)
    with torch.no_grad():
        measure = last_token_kl(lab.model(tokens, return_type="logits"))
    scan = dict(method=METHOD, chunk=chunk)
    for shared in (True, False):  # warm-up, both paths
        ablation_scan(lab, tokens, measure, heads=[(0, 0), (0, 1)], shared_prefix=shared, **scan)
    loop_s, looped = timed(lab, lambda: plain_loop(lab, tokens, measure))
    full_s, full = timed(lab, lambda: ablation_scan(lab, tokens, measure, shared_prefix=False, positions="all", **scan))
    batched_s, batched = timed(lab, lambda: ablation_scan(lab, tokens, measure, **scan))
    passes, work = block_work(lab, tokens, chunk)
    return {"prompts": n_prompts, "tokens": n_tokens, "loop_s": loop_s, "full_s": full_s, "batched_s": batched_s,
            "full_passes": len(layer_chunks(all_heads(lab.info), heads_per_pass(lab, tokens, chunk, "all"))),
            "passes": passes, "work": work, "scores": batched,
            "diff": max(float((looped - batched).abs().max()), float((looped - full).abs().max()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--model", default="embedded", help="what hl.load takes: 'embedded', a local folder, a hub name")
    parser.add_argument("--sizes", default="8x32,2x16", help="PROMPTSxTOKENS per run, comma-separated")
    parser.add_argument("--chunk", type=int, default=None, help="heads per batched pass (default: the scan's own)")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    lab = hl.load(args.model, device=args.device)
    runs = [run(lab, *(int(x) for x in size.split("x")), args.chunk) for size in args.sizes.split(",")]
    gpu = lab.device.startswith("cuda")
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads, {platform.machine()})"
    n_heads = lab.info.n_layers * lab.info.n_heads
    flags = "".join(f" {arg}" for arg in sys.argv[1:])
    lines = [
        f"## Batched ablation scan — {lab.info.name} on {device}\n",
        f"Every head ({n_heads}) ablated on its own (scaled-query, ε = {METHOD.epsilon:g}), KL of the next-token distribution "
        "at the last position, on the same inputs: **loop** = one ordinary full forward per head (`headlab.ablation` hooks); "
        "**full passes** = heads stacked along the batch, each pass the whole model (`shared_prefix=False`); "
        "**batched** = `ablation_scan` as it runs: the intact run's residual is reused, so a chunk runs only from its "
        "lowest layer on (*blocks run* = its block-rows as a fraction of the loop's), and only the last position is unembedded.\n",
        "| prompts × tokens | passes: loop / full / batched | blocks run | loop s | full passes s | batched s | "
        "speed-up: full / **batched** | max difference |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {r['prompts']} × {r['tokens']} | {n_heads} / {r['full_passes']} / {r['passes']} | {r['work']:.0%} | "
          f"{r['loop_s']:.1f} | {r['full_s']:.1f} | {r['batched_s']:.1f} | {r['loop_s'] / r['full_s']:.1f}× / "
          f"**{r['loop_s'] / r['batched_s']:.1f}×** | {r['diff']:.1e} |" for r in runs],
        "\nTop heads by KL (first run): "
        + ", ".join(f"{head_label(l, h)} {v:.3f}" for l, h, v in hl.HeadScores("scan", lab.info.name, {}, runs[0]["scores"]).top(5)),
        f"\n_Made by `.venv/bin/python analyses/scan_benchmark.py{flags}`._",
    ]
    print("\n".join(lines))
    if not args.no_readme:
        write_section(f"scan_benchmark_{'gpu' if gpu else 'cpu'}", "\n".join(lines))


if __name__ == "__main__":
    main()
