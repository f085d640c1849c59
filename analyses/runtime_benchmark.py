"""Memory and speed of the compressed-KV runtime vs Hugging Face's caches and kvpress, Llama-3.1-8B shape, on a GPU.

    python analyses/runtime_benchmark.py OUT.json [--contexts 8192 32768 131072] [--new-tokens 32]
        [--kinds hf_full hf_static compressed] [--check] [--microbench]
    python analyses/runtime_benchmark.py KVPRESS.json --kinds kvpress_duo   # in an environment with kvpress
    python analyses/runtime_benchmark.py --readme-from OUT.json KVPRESS.json --command "..."

Random bf16 weights built on the GPU (only memory and speed are measured), batch 1, a random
HeadMask with `MaskConfig`'s budget and window (half the KV heads full, sink 64, recent 256). Rows (`headlab.runtime.benchmark`):
`hf_full` (DynamicCache, plain `model(...)` decode loop), `hf_static` (StaticCache, decode step in
a CUDA graph: the fair fast full-cache baseline), `kvpress_duo` (kvpress' DuoAttentionPress with
the same mask; kvpress needs transformers<5.3, so it runs in its own environment and its JSON is
merged at render time) and `compressed` (`headlab.runtime.CompressedLM`, "sdpa" path, decode
step in a CUDA graph). The HBM floor of a decode step is (weight bytes + KV bytes held) / the
measured device-to-device copy bandwidth. `--check` first compares the runtime's logits with the
plain model's on the GPU (all-full mask) and the "sdpa" path with the "eager" one (mixed mask).
`--microbench` times the decode attention over a 128k full-head buffer alone. `--readme-from`
renders one or more JSON results into analyses/README.md (section runtime_benchmark).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from headlab.masks import HeadMask, MaskConfig  # noqa: E402
from headlab.runtime.benchmark import KINDS, copy_bandwidth, info_of, llama_8b_config, measure, random_llama, weight_bytes  # noqa: E402

GIB = 1 << 30
TARGET_KV, TARGET_FLOOR, TARGET_PEAK_SLACK = 1.05, 1.3, 2 * GIB


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def check(model, mask, n: int = 2048, steps: int = 8) -> dict:
    """Relative errors on the GPU (bf16): runtime vs plain model (all-full), sdpa vs eager path (mixed mask)."""
    from headlab.runtime import CompressedLM

    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (1, n + steps), generator=torch.Generator().manual_seed(1)).cuda()
    out = {}
    with torch.no_grad():
        plain = model(tokens).logits.float()
        full = HeadMask.all_full(info_of(model), sink=mask.sink, recent=mask.recent)
        rt = CompressedLM(model, full, chunk_size=512, max_length=n + steps)
        pre = rt.forward(tokens[:, :n]).float()
        dec = torch.cat([rt.forward(tokens[:, i:i + 1]) for i in range(n, n + steps)], dim=1).float()  # CUDA graph
        out["all_full_prefill_vs_plain"] = rel(pre, plain[:, :n])
        out["all_full_decode_vs_plain"] = rel(dec, plain[:, n:])
        out["all_full_decode_argmax_agree"] = float((dec.argmax(-1) == plain[:, n:].argmax(-1)).float().mean())
        small = HeadMask(model=mask.model, n_layers=mask.n_layers, n_heads=mask.n_heads, n_kv_heads=mask.n_kv_heads,
                         full=mask.full, sink=16, recent=200)  # the ring wraps many times in 2k tokens
        eager = CompressedLM(model, small, chunk_size=512, attention="eager", page_size=256).logits(tokens).float()
        rt = CompressedLM(model, small, chunk_size=512, max_length=n + steps)
        pre = rt.forward(tokens[:, :n]).float()
        dec = torch.cat([rt.forward(tokens[:, i:i + 1]) for i in range(n, n + steps)], dim=1).float()
        out["mixed_sdpa_prefill_vs_eager"] = rel(pre, eager[:, :n])
        out["mixed_sdpa_decode_vs_eager"] = rel(dec, eager[:, n:])
        out["mixed_vs_plain_prefill"] = rel(eager[:, :n], plain[:, :n])  # far from plain: the check is not vacuous
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:  # the bf16 noise floor: the same plain model through HF's eager attention instead of SDPA
            out["noise_floor_hf_eager_vs_sdpa"] = rel(model(tokens[:, :n]).logits.float(), plain[:, :n])
        finally:
            model.set_attn_implementation(previous)
    return out


def microbench(bw: float, length: int = 131072, n_kv: int = 4, group: int = 4, d: int = 128) -> dict:
    """Decode attention over one layer's full heads at `length` tokens, alone: the eager `grouped_attention` and the
    Triton split-KV kernel (`decode_attention` on CUDA); CUDA events around 8 back-to-back calls, median of 20."""
    from headlab.runtime.static import decode_attention, grouped_attention

    q = torch.randn(1, n_kv, group, d, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, n_kv, length, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    allowed = torch.ones(length, dtype=torch.bool, device="cuda")
    result = {"length": length, "floor_ms": 2 * k.numel() * 2 / bw * 1e3}
    for name, fn in (("eager_ms", grouped_attention), ("triton_ms", decode_attention)):
        times = []
        for i in range(25):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(8):
                fn(q, k, v, allowed, d ** -0.5)
            e.record()
            e.synchronize()
            if i >= 5:
                times.append(s.elapsed_time(e) / 8)
        times.sort()
        result[name] = times[len(times) // 2]
    return result


def table(rows: list[dict], weights: int, bw: float) -> tuple[str, list[dict]]:
    lines = ["| ctx | cache | KV held GiB | ideal GiB | held/ideal | prefill peak above weights GiB | peak - KV GiB "
             "| prefill s | decode ms/step | HBM floor ms | decode/floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['context'] // 1024}k | {r['cache']} | OOM | {r['ideal_kv_bytes'] / GIB:.2f} | - | OOM | - | - | - | - | - |")
            continue
        r["floor_ms"] = (weights + r["kv_bytes"]) / bw * 1e3
        r["decode_over_floor"] = r["decode_ms"] / r["floor_ms"]
        r["peak_minus_kv"] = r["peak_above_weights"] - r["kv_bytes"]
        lines.append(
            f"| {r['context'] // 1024}k | {r['cache']} | {r['kv_bytes'] / GIB:.2f} | {r['ideal_kv_bytes'] / GIB:.2f} "
            f"| {r['kv_ratio']:.3f} | {r['peak_above_weights'] / GIB:.2f} | {r['peak_minus_kv'] / GIB:.2f} "
            f"| {r['prefill_s']:.2f} | {r['decode_ms']:.2f} | {r['floor_ms']:.2f} | {r['decode_over_floor']:.2f} |")
    return "\n".join(lines), rows


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["cache"] != "compressed" or r.get("oom"):
            continue
        ctx = f"{r['context'] // 1024}k"
        kv = r["kv_ratio"]
        out.append(f"- {ctx}: KV held/ideal {kv:.3f} (target <= {TARGET_KV}): {'met' if kv <= TARGET_KV else 'MISSED'}.")
        slack = r["peak_minus_kv"] / GIB
        out.append(f"- {ctx}: prefill peak = KV + {slack:.2f} GiB above the weights (target <= KV + 2 GiB): "
                   f"{'met' if slack <= 2 else f'MISSED by {slack - 2:.2f} GiB'}.")
        if r["context"] >= 131072:
            f = r["decode_over_floor"]
            out.append(f"- {ctx}: decode {r['decode_ms']:.2f} ms/step = {f:.2f}x the HBM floor (target <= {TARGET_FLOOR}x): "
                       f"{'met' if f <= TARGET_FLOOR else f'MISSED by {(f / TARGET_FLOOR - 1) * 100:.0f}%'}.")
    return out


def comparisons(rows: list[dict]) -> list[str]:
    """Per context: the compressed runtime against each baseline that ran (decode speed-up, KV held)."""
    out = []
    by = {(r["context"], r["cache"]): r for r in rows if not r.get("oom")}
    for context in sorted({r["context"] for r in rows}):
        ours = by.get((context, "compressed"))
        if ours is None:
            continue
        parts = [f"{base}: decode {by[(context, base)]['decode_ms'] / ours['decode_ms']:.1f}x faster, "
                 f"{by[(context, base)]['kv_bytes'] / ours['kv_bytes']:.2f}x less KV held"
                 for base in ("hf_full", "hf_static", "kvpress_duo") if (context, base) in by]
        if parts:
            out.append(f"- {context // 1024}k, compressed vs " + "; vs ".join(parts) + ".")
    return out


def merged(results: list[dict]) -> dict:
    """One result from several runs on the same device (e.g. the kvpress rows from their own environment)."""
    first = dict(results[0])
    order = {kind: i for i, kind in enumerate(KINDS)}
    rows = [dict(r, environment=f"transformers {res.get('transformers', '?')}") for res in results for r in res["rows"]]
    first["rows"] = sorted(rows, key=lambda r: (r["context"], order.get(r["cache"], 99)))
    devices = {res["device"] for res in results}
    if len(devices) > 1:
        raise ValueError(f"Results from different devices cannot share one table: {sorted(devices)}.")
    return first


def render(result: dict) -> str:
    """The markdown: a header stating the setup, the table, and the targets met or missed."""
    a = result["args"]
    md, rows = table(result["rows"], result["weights_bytes"], result["copy_bandwidth_Bps"])
    header = (f"Device: {result['device']} (torch {result['torch']}), {result['date']}. Llama-3.1-8B shape, random bf16 "
              f"weights ({result['weights_bytes'] / GIB:.2f} GiB), batch 1, {result['mask']}, prefill chunk "
              f"{a['chunk_size']}, {a['new_tokens']} timed decode steps after {a['warmup']} warm-up (median, CUDA events). "
              f"Copy bandwidth {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write). KV held is measured at the end "
              f"(context + warm-up + timed tokens); ideal = `HeadMask.ideal_kv_bytes` of the 50% mask at that length.")
    extra = ""
    if "check" in result:
        extra += "\n\nGPU check (relative L2 error of logits, bf16): " + ", ".join(
            f"{k} {v:.2e}" if k != "all_full_decode_argmax_agree" else f"{k} {v:.2f}" for k, v in result["check"].items())
    if "microbench" in result:
        mb = result["microbench"]
        extra += (f"\n\nDecode attention alone, one layer's 4 full KV heads at {mb['length']} tokens: Triton split-KV kernel "
                  f"{mb['triton_ms']:.3f} ms, eager `grouped_attention` {mb['eager_ms']:.3f} ms (copy-bandwidth floor "
                  f"{mb['floor_ms']:.3f} ms).")
    how = ("`hf_full` = transformers `DynamicCache`, `model(...)` per token (its decode is bound by Python and launches, not "
           "memory). `hf_static` = transformers `StaticCache` preallocated for the whole length, prefill in chunks, the decode "
           "step (mask update, forward, greedy pick, position advance) captured in one CUDA graph: the fair fast full-cache "
           "baseline; at long contexts it is slow because a static cache needs an attention mask (its unused slots) and "
           "transformers' SDPA integration expands the KV heads to the query heads (`repeat_kv`, a copy of the whole "
           "cache, every layer, every step) whenever a mask is passed. `kvpress_duo` = kvpress' `DuoAttentionPress` "
           "given the same mask, sink and window, its own way (DynamicCache, prefill inside the press, `model(...)` per "
           "token), in its own environment (kvpress needs transformers<5.3): it simulates the mask at decode by swapping "
           "masked keys for a fake key, so it holds the full cache (and its prefill attends to everything). "
           "`compressed` = `CompressedLM(model, mask, chunk_size, max_length)` on its \"sdpa\" path: K/V buffers allocated "
           "once for max_length (full heads: slot = position; streaming heads: sink + ring), prefill in chunks (flash SDPA "
           "with a bottom-right causal bias for full heads, a small explicit mask over ring + chunk for streaming heads), "
           "decode step captured in a CUDA graph with the Triton split-KV decode kernel, torch.compile'd fused "
           "norm / RoPE / head-split / merge / SiLU pieces, each layer's q/k/v and gate/up weights packed into one "
           "matrix each (one matrix-vector product instead of three and two), keys and values stored with one write. The HBM floor counts every weight byte (the embedding table "
           "included) once per step.")
    envs = sorted({r["environment"] for r in rows if "environment" in r})
    if envs:
        how += " Environments: " + ", ".join(f"{kind} under {env}" for env in envs
                                            for kind in sorted({r['cache'] for r in rows if r.get('environment') == env},
                                                               key=KINDS.index)) + "."
    return (f"{header}{extra}\n\n{how}\n\n{md}\n\nTargets (compressed runtime):\n" + "\n".join(verdicts(rows))
            + "\n\nAgainst the baselines:\n" + "\n".join(comparisons(rows)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="JSON output path")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--kinds", nargs="+", default=["hf_full", "hf_static", "compressed"], choices=KINDS)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--microbench", action="store_true")
    parser.add_argument("--readme-from", type=Path, nargs="+", default=None,
                        help="no run: render the JSON of earlier runs (merged) into analyses/README.md")
    parser.add_argument("--command", default=None, help="the command line to state in the README section")
    args = parser.parse_args(argv)
    if args.readme_from is not None:
        result = merged([json.loads(path.read_text()) for path in args.readme_from])
        text = render(result)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import write_section

        command = args.command or result.get("command", "")
        write_section("runtime_benchmark", f"## Runtime benchmark\n\nCommand: `{command}`\n\n{text}")
        print(text)
        return 0

    torch.backends.cuda.matmul.allow_tf32 = False
    device_name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device: {device_name}; torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    result = {"command": "python analyses/runtime_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": device_name, "torch": torch.__version__, "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
              "copy_bandwidth_Bps": bw, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.microbench:
        result["microbench"] = microbench(bw)
        print("microbench", result["microbench"], flush=True)
    model = random_llama(llama_8b_config())
    weights = weight_bytes(model)
    config = MaskConfig()
    mask = HeadMask.random(info_of(model), config.full_fraction, seed=config.seed, sink=config.sink, recent=config.recent)
    result.update(weights_bytes=weights, mask=repr(mask))
    if args.check:
        result["check"] = check(model, mask)
        print("check", json.dumps(result["check"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["rows"] = []
    for context in args.contexts:  # the JSON is rewritten after each context, so a run cut short keeps what it measured
        df = measure(model, mask, contexts=[context], new_tokens=args.new_tokens, kinds=args.kinds, warmup=args.warmup,
                     chunk_size=args.chunk_size)
        result["rows"] += [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                           for r in df.to_dict("records")]
        print(df.to_string(index=False), flush=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
