"""Memory and speed of the compressed-KV runtime vs Hugging Face's caches and kvpress, Llama-3.1-8B shape, on a GPU.

    python analyses/runtime_benchmark.py OUT.json --check --microbench --sweep --profile --peak --longest
    python analyses/runtime_benchmark.py OUT.json --kinds hf_full hf_static compressed   # the 50% mask vs baselines
    python analyses/runtime_benchmark.py KVPRESS.json --kinds kvpress_duo   # in an environment with kvpress
    python analyses/runtime_benchmark.py --readme-from OUT.json [KVPRESS.json] --command "..."
    python analyses/runtime_benchmark.py OUT.json --devices 2 --shape llama-3.1-70b --contexts 32768 --sharded-check
    python analyses/runtime_benchmark.py OUT.json --dry-run --devices 2 --shape tiny --contexts 64   # CPU, no numbers

Random bf16 weights built on the GPU (only memory and speed are measured). The HBM floor of a
decode step is (weight bytes + KV bytes held) / the measured device-to-device copy bandwidth.
- `--sweep`: the budget table (`headlab.runtime.benchmark.budget_sweep`): decode ms per step (CUDA
  graph) for every context x share of full KV heads (25/50/75/100%: 100% is the whole cache through
  the same kernels, the fair full-cache reference) x batch (1/4/16), tokens/s, and decode / floor;
  the cache is filled by `synthetic_prefill` (random keys and values where a prefill would put the
  model's: same bytes, same kernels). Targets: decode <= 1.15x the floor, never slower at a smaller budget.
- `--peak`: batch 1, a real chunked prefill per budget and context: the prefill peak above the
  weights (target <= KV + 2 GiB) and the decode step after it.
- `--profile`: torch.profiler's GPU time per kernel kind of one decode step (`profile_step`), at 8k and 128k
  for batch 1, at 8k for each larger batch of `--batches`, 25% and 100% full heads.
- `--longest`: the longest context that prefills and decodes at 25% full heads and with the full
  cache (`longest_context`: doubling, then bisection, out-of-memory caught).
- `--check`: the runtime's logits against float32 references, on a 4-layer model of the 8B shape
  (bf16 weights, computed in bf16 and in float32, batch 2, 2048 + 8 tokens): the all-full runtime against the
  plain transformers model, and a mixed mask (sink 16, recent 200: the ring wraps) against the
  runtime's eager path (the streaming-window reference). The bf16 noise floor is measured too: the
  error of the bf16 references themselves (transformers' SDPA and eager attention, the eager path)
  against float32. Any runtime error over `CHECK_TOLERANCE` x that floor fails the run (exit 1).
- `--microbench [attention] [gemv]` (both if none named): one layer's decode attention alone (the
  Triton kernel, in a CUDA graph) against the copy-bandwidth floor of its bytes, for a few kernel
  configurations; and each matrix product of the batch-1 step (`gemv_kernel` against cuBLAS, each
  shape of the 8B model, the gated down projection against `silu_mul` + cuBLAS), over enough copies
  of the weight that nothing is in L2.
- `--matmul auto|cublas`: the decode step's matrix products through `gemv_kernel` or `F.linear`
  (cuBLAS), overriding `fused.MATMUL`; `--attention-config '{"min_chunk": 256}'`: changes to the
  attention kernel's `decode_kernel.CONFIG`; both for same-card comparisons.
- `--kinds`: the old table, the `MaskConfig` mask (50%) against `hf_full` (DynamicCache), `hf_static`
  (StaticCache + CUDA graph), `kvpress_duo` (kvpress' DuoAttentionPress; needs transformers<5.3, so
  its own environment, merged at render time) and `compressed`, with a real prefill.
- `--devices N` (N > 1): the model (`--shape`, e.g. llama-3.1-70b, random bf16 weights drawn on each GPU) split
  evenly by layers over the first N GPUs of the host (`placement.balanced_device_map`, accelerate's dispatch), and
  the budget sweep's decode rows (`--fractions`, `--batches`) with the KV held per GPU against its ideal and the
  decode step against two HBM floors (`benchmark.hbm_floors`): every byte read (weights + KV) over the GPUs' summed
  copy bandwidth, and, since the layers run one after another, the sum of each GPU's bytes over its bandwidth.
  No CUDA graph (one graph cannot follow the hidden state from GPU to GPU): the steps are timed with perf_counter
  around a step synchronised on every GPU. `--sharded-check` first runs an 8-layer model of the 8B shape on one GPU and
  then sharded over the N GPUs (the same weights, moved): logits of chunked prefill + decode must agree within
  `SHARDED_TOLERANCE` and each GPU must hold exactly the ideal KV of its layers; and the embedded model as a Lab,
  loaded with a balanced device_map, must score induction as on one GPU. `--dry-run` builds everything on the CPU
  (N "cpu" devices, no bandwidth: floors blank) to check that the run constructs.
`--readme-from` renders JSON results into analyses/README.md (sections runtime_budgets, runtime_sharded, and
runtime_benchmark when the results hold `--kinds` rows).
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

from headlab import placement  # noqa: E402
from headlab.masks import HeadMask, MaskConfig  # noqa: E402
from headlab.runtime import fused  # noqa: E402
from headlab.runtime.benchmark import (  # noqa: E402
    BATCHES, FRACTIONS, KERNEL_KINDS, KINDS, SHAPES, budget_mask, budget_sweep, copy_bandwidth, hbm_floors, info_of,
    llama_8b_config, llama_config, longest_context, measure, measure_one, profile_step, random_llama, weight_bytes,
    weight_bytes_by_device)

GIB = 1 << 30
TARGET_KV, TARGET_FLOOR, TARGET_PEAK_SLACK = 1.05, 1.3, 2 * GIB  # the --kinds table's targets (128k, 50% mask)
TARGET_BUDGET_FLOOR = 1.15  # the budget table's: decode / HBM floor at every context, budget and batch
CHECK_TOLERANCE = 1.5  # --check fails when a runtime error exceeds this multiple of the measured bf16 noise floor
SHARDED_TOLERANCE = 5e-3  # --sharded-check: relative L2 error of the sharded run's logits against one GPU's (bf16)
MICROBENCH_CONFIGS = ({}, {"min_chunk": 256}, {"min_chunk": 1024}, {"programs": 132}, {"programs": 528},
                      {"num_stages": 2}, {"num_stages": 3}, {"num_warps": 8}, {"block_n": 32}, {"block_n": 128})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _runtime_logits(model, mask, tokens: torch.Tensor, n: int, held: dict | None = None) -> torch.Tensor:
    """Prefill `tokens[:, :n]` in chunks, then decode the rest one token at a time (CUDA graph on one GPU): float32
    logits. `held`, when given, receives the runtime's KV bytes per device."""
    from headlab.runtime import CompressedLM

    rt = CompressedLM(model, mask, chunk_size=512, max_length=tokens.shape[1])
    pre = rt.forward(tokens[:, :n])
    dec = [rt.forward(tokens[:, i:i + 1]) for i in range(n, tokens.shape[1])]
    if held is not None:
        held.update(rt.kv_bytes_by_device())
    return torch.cat([pre, *[d.to(pre.device) for d in dec]], dim=1).float()


def check(n: int = 2048, steps: int = 8, batch: int = 2, layers: int = 4) -> dict:
    """Relative L2 errors of logits against float32 references, and the bf16 noise floor (see the module docstring).
    `passed` is False when an error exceeds `CHECK_TOLERANCE` x the floor of its comparison."""
    from headlab.runtime import CompressedLM

    config = llama_8b_config(num_hidden_layers=layers)
    model16 = random_llama(config, dtype=torch.float32).to(torch.bfloat16)
    model32 = random_llama(config, dtype=torch.float32).to(torch.bfloat16).float()  # the same (rounded) weights in float32
    tokens = torch.randint(0, config.vocab_size, (batch, n + steps), generator=torch.Generator().manual_seed(1)).cuda()
    info = info_of(model16)
    full = HeadMask.all_full(info)
    mixed = HeadMask.random(info, 0.5, seed=0, sink=16, recent=200)  # the ring wraps many times in 2k tokens
    parts = {"prefill": slice(0, n), "decode": slice(n, n + steps)}
    out = {}
    with torch.no_grad():
        truth = model32(tokens).logits.float()
        truth_mixed = CompressedLM(model32, mixed, chunk_size=512, attention="eager").logits(tokens).float()
        del model32
        torch.cuda.empty_cache()
        references = {"hf_sdpa": model16(tokens).logits.float()}
        model16.set_attn_implementation("eager")
        references["hf_eager"] = model16(tokens).logits.float()
        model16.set_attn_implementation("sdpa")
        eager_mixed = CompressedLM(model16, mixed, chunk_size=512, attention="eager").logits(tokens).float()
        runtime_full = _runtime_logits(model16, full, tokens, n)
        runtime_mixed = _runtime_logits(model16, mixed, tokens, n)
    for part, where in parts.items():
        floor = max(rel(ref[:, where], truth[:, where]) for ref in references.values())
        floor_mixed = rel(eager_mixed[:, where], truth_mixed[:, where])
        out[f"noise_floor_plain_{part}"] = floor
        out[f"noise_floor_mixed_{part}"] = floor_mixed
        out[f"all_full_{part}_error"] = rel(runtime_full[:, where], truth[:, where])
        out[f"mixed_{part}_error"] = rel(runtime_mixed[:, where], truth_mixed[:, where])
        out[f"all_full_{part}_ratio"] = out[f"all_full_{part}_error"] / floor
        out[f"mixed_{part}_ratio"] = out[f"mixed_{part}_error"] / floor_mixed
    out["mixed_vs_plain"] = rel(truth_mixed, truth)  # far from plain: the mixed comparison is not vacuous
    out["passed"] = all(v <= CHECK_TOLERANCE for k, v in out.items() if k.endswith("_ratio"))
    return out


def _gpus(n: int) -> list[str]:
    return [f"cuda:{i}" for i in range(n)]


def sharded_check(devices: int, n: int = 2048, steps: int = 8, batch: int = 2, layers: int = 8) -> dict:
    """The same model on one GPU and sharded over `devices` GPUs (see the module's docstring): `passed` when the
    logits agree within `SHARDED_TOLERANCE`, every GPU holds the ideal KV of its layers, and the sharded Lab scores
    induction like the single-GPU one (max abs difference <= 1e-3, float32)."""
    import headlab as hl
    from accelerate import dispatch_model

    config = llama_8b_config(num_hidden_layers=layers)
    model = random_llama(config, device="cuda:0")
    mask = HeadMask.random(info_of(model), 0.5, seed=0, sink=16, recent=200)
    tokens = torch.randint(0, config.vocab_size, (batch, n + steps), generator=torch.Generator().manual_seed(1)).cuda()
    out, held = {}, {}
    with torch.no_grad():
        one = _runtime_logits(model, mask, tokens, n)
        model = dispatch_model(model, device_map=placement.balanced_device_map(model, _gpus(devices)))  # the same weights
        two = _runtime_logits(model, mask, tokens, n, held)
    ideal = placement.ideal_kv_bytes_by_device(mask, placement.layer_devices(model), n + steps, 2, config.head_dim, batch)
    out.update(logits_rel_error=rel(two.to(one.device), one), kv_bytes_by_device=held, ideal_kv_bytes_by_device=ideal)
    del model
    torch.cuda.empty_cache()
    try:  # reported, not raised: the runtime rows after it still run
        lab = hl.load("embedded", device="cuda:0")
        sharded = hl.load("embedded", device_map=placement.balanced_device_map(lab.hf_model, _gpus(devices)))
        scores = [hl.score(x, "induction", n=8, recompute=True, save=False).values for x in (lab, sharded)]
        out.update(lab_placement=sharded.placement, induction_max_abs_diff=float((scores[0] - scores[1]).abs().max()))
    except Exception as err:  # noqa: BLE001 - any failure of the sharded Lab is the finding
        out.update(lab_error=f"{type(err).__name__}: {err}", lab_placement=None, induction_max_abs_diff=math.inf)
    out["passed"] = (out["logits_rel_error"] <= SHARDED_TOLERANCE and held == ideal and out["induction_max_abs_diff"] <= 1e-3)
    return out


def build_model(args):
    """The benchmark's random Llama of `--shape`: on the GPU, or split by layers over `--devices` GPUs (or, with
    `--dry-run`, over that many "cpu" devices)."""
    config = llama_config(args.shape)
    if args.devices == 1 and not args.dry_run:
        return random_llama(config)
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        meta = LlamaForCausalLM(config)
    devices = ["cpu"] * args.devices if args.dry_run else _gpus(args.devices)
    return random_llama(config, device_map=placement.balanced_device_map(meta, devices))


def run_sharded(args, result: dict, save) -> None:
    """`--devices N` / `--dry-run`: the sharded check, then the decode rows of the budget sweep on the sharded model."""
    if args.sharded_check and not args.dry_run:
        result["sharded_check"] = sharded_check(args.devices)
        print("sharded check", json.dumps(result["sharded_check"]), flush=True)
        save()
        torch.cuda.empty_cache()
    model = build_model(args)
    result.update(weights_bytes=weight_bytes(model), weights_bytes_by_device=weight_bytes_by_device(model),
                  placement={d: f"layers {v[0]}-{v[-1]}" for d, v in placement.layers_by_device(placement.layer_devices(model)).items()})
    print("placement", result["placement"], "weights", result["weights_bytes_by_device"], flush=True)
    log = lambda row: print(json.dumps(_clean(row), default=str), flush=True)  # noqa: E731
    result["sweep"] = []
    for context in args.contexts:
        result["sweep"] += [_clean(r) for r in budget_sweep(model, [context], args.fractions, args.batches,
                                                            steps=args.new_tokens, warmup=args.warmup, log=log)]
        save()


def render_sharded(result: dict) -> str:
    """The sharded decode rows: KV held per GPU against its ideal, decode ms/step against both HBM floors."""
    bandwidth, weights = result.get("bandwidth_by_device", {}), result["weights_bytes_by_device"]
    lines = [f"Device: {result['device']} (torch {result['torch']}, transformers {result['transformers']}), {result['date']}. "
             f"{result['args']['shape']} shape, random bf16 weights ({result['weights_bytes'] / GIB:.2f} GiB), split by layers: "
             + ", ".join(f"{d} {where} ({weights[d] / GIB:.2f} GiB)" for d, where in result["placement"].items())
             + ". Copy bandwidth per GPU (read + write): "
             + (", ".join(f"{d} {b / 1e12:.2f} TB/s" for d, b in bandwidth.items()) or "not measured (dry run)")
             + ". Masks `HeadMask.random` (seed 0) / `all_full`, sink 64 + recent 256; cache filled by `synthetic_prefill`; "
             f"{result['args']['new_tokens']} timed steps after {result['args']['warmup']} warm-up, median, perf_counter "
             "around a step synchronised on every GPU (no CUDA graph). Floor together = all bytes read (weights + KV held) / "
             "the GPUs' summed bandwidth; sequential floor = each GPU's bytes / its bandwidth, summed (the layers run in turn).",
             "", "| ctx | full KV heads | batch | KV held per GPU GiB | held = ideal | decode ms/step | floor together ms "
             "| decode / floor together | sequential floor ms | decode / sequential floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("sweep", []):
        ctx, share, batch = f"{r['context'] // 1024}k", f"{r['full_fraction']:.0%}", r["batch"]
        if r.get("oom"):
            ideal = ", ".join(f"{b / GIB:.2f}" for b in r["ideal_kv_bytes_by_device"].values())
            lines.append(f"| {ctx} | {share} | {batch} | ({ideal}) | does not fit | | | | | |")
            continue
        held = r["kv_bytes_by_device"]
        cells = [", ".join(f"{d} {b / GIB:.2f}" for d, b in held.items()), "yes" if held == r["ideal_kv_bytes_by_device"] else "NO",
                 f"{r['decode_ms']:.2f}"]
        if bandwidth:
            together, sequential = hbm_floors({d: weights[d] + held.get(d, 0) for d in weights}, bandwidth)
            cells += [f"{together:.2f}", f"{r['decode_ms'] / together:.2f}", f"{sequential:.2f}", f"{r['decode_ms'] / sequential:.2f}"]
        else:
            cells += ["", "", "", ""]
        lines.append(f"| {ctx} | {share} | {batch} | " + " | ".join(cells) + " |")
    check = result.get("sharded_check")
    if check:
        lines += ["", f"Sharded check ({'PASSED' if check['passed'] else 'FAILED'}): 8-layer 8B-shape model, one GPU vs sharded, "
                  f"logits relative L2 error {check['logits_rel_error']:.2e} (tolerance {SHARDED_TOLERANCE}); KV per GPU "
                  f"{check['kv_bytes_by_device']} (ideal {check['ideal_kv_bytes_by_device']}); the embedded Lab over "
                  f"{len(check['lab_placement'] or {})} GPUs: induction scores within "
                  f"{check['induction_max_abs_diff']:.1e} of one GPU's" + (f" (FAILED: {check['lab_error']})" if check.get('lab_error') else "") + "."]
    return "\n".join(lines)


def _graph_ms(fn, calls: int = 16, repeats: int = 10) -> float:
    """Median ms per call of `fn` (called `calls` times in one CUDA graph), over `repeats` replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    times = []
    for _ in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times[2:])[len(times[2:]) // 2]


def microbench(bw: float, cases=((2, 6, 8192, 1), (8, 0, 8192, 1), (2, 6, 32768, 1), (2, 6, 131072, 1), (8, 0, 131072, 1),
                                 (2, 6, 8192, 4), (8, 0, 8192, 4), (2, 6, 32768, 4), (2, 6, 32768, 16)),
               group: int = 4, d: int = 128, window: int = 320, layers: int = 4) -> list[dict]:
    """One layer's decode attention alone (`decode_layer`: append + attend + combine) for `(n_full, n_stream,
    length, batch)` cases and each of `MICROBENCH_CONFIGS`, in a CUDA graph cycling over `layers` layers' buffers (so
    nothing is served from L2), against the copy-bandwidth floor of the bytes held."""
    from headlab.runtime.decode_kernel import decode_layer

    results = []
    for n_full, n_stream, length, batch in cases:
        n_kv = n_full + n_stream
        bufs = [(torch.randn(2, batch, n_full, length, d, dtype=torch.bfloat16, device="cuda"),
                 torch.randn(2, batch, n_stream, window, d, dtype=torch.bfloat16, device="cuda")) for _ in range(layers)]
        q = torch.randn(batch, n_kv, group, d, dtype=torch.bfloat16, device="cuda")
        k, v = torch.randn(2, batch, n_kv, d, dtype=torch.bfloat16, device="cuda").unbind(0)
        order = torch.arange(n_kv, dtype=torch.int32, device="cuda")
        pos = torch.tensor([length - 1], device="cuda")
        nbytes = bufs[0][0].numel() * 2 + bufs[0][1].numel() * 2
        row = {"n_full": n_full, "n_stream": n_stream, "length": length, "batch": batch, "floor_ms": nbytes / bw * 1e3}
        for config in MICROBENCH_CONFIGS:
            def call(i: int = 0, config=config):
                full_kv, stream_kv = bufs[i % layers]
                decode_layer(q, k, v, full_kv, stream_kv, order, pos, 64, 256, d ** -0.5, **config)
            row[json.dumps(config)] = _graph_ms(call)
        results.append(row)
        print("microbench", row, flush=True)
        del bufs
        torch.cuda.empty_cache()
    return results


GEMV_SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
               "lm_head": (128256, 4096)}  # Llama-3.1-8B, packed as the fused step runs them: [out, in]
GEMV_CONFIGS = ({}, {"block_n": 4}, {"block_n": 16}, {"block_k": 256}, {"block_k": 1024}, {"num_stages": 2},
                {"num_stages": 4}, {"num_warps": 8})  # changes to gemv_kernel.CONFIG


def gemv_microbench(bw: float, batches=(1,), copies_bytes: int = 3 << 30) -> list[dict]:
    """Each matrix product of the 8B decode step: `gemv_kernel.linear` (each of `GEMV_CONFIGS`) against cuBLAS
    (`torch.matmul`), ms per product in a CUDA graph over copies of the weight (3 GiB of them: none in L2), and the
    gated down projection (`[gate | up]` in, SiLU * up inside) against the compiled `silu_mul` + cuBLAS."""
    import torch.nn.functional as F

    from headlab.runtime import fused, gemv_kernel

    results = []
    for name, (n, k) in GEMV_SHAPES.items():
        copies = max(2, -(-copies_bytes // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5 for _ in range(copies)]
        for batch in batches:
            x = torch.randn(batch, k, dtype=torch.bfloat16, device="cuda")
            row = {"name": name, "n": n, "k": k, "batch": batch, "floor_ms": n * k * 2 / bw * 1e3,
                   "cublas": _graph_ms(lambda i=0: torch.matmul(x, weights[i].t()), calls=copies)}
            expected = F.linear(x.float(), weights[0].float())
            row["error"] = rel(gemv_kernel.linear(x, weights[0]), expected)
            for config in GEMV_CONFIGS:
                row[json.dumps(config)] = _graph_ms(lambda i=0, c=config: gemv_kernel.linear(x, weights[i], **c), calls=copies)
            if name == "down":
                gate_up = torch.randn(batch, 2 * k, dtype=torch.bfloat16, device="cuda")
                silu_mul = fused.compiled("silu_mul")
                row["gated_cublas"] = _graph_ms(lambda i=0: torch.matmul(silu_mul(*gate_up.chunk(2, -1)), weights[i].t()),
                                                calls=copies)
                row["gated"] = _graph_ms(lambda i=0: gemv_kernel.linear(gate_up, weights[i], gated=True), calls=copies)
            results.append(row)
            print("gemv", json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
        del weights
        torch.cuda.empty_cache()
    return results


def budget_table(result: dict) -> tuple[str, list[str]]:
    """The budget sweep as markdown, and the verdicts against the targets (floor, monotone in the budget, peak)."""
    weights, bw = result["weights_bytes"], result["copy_bandwidth_Bps"]
    peaks = {(r["context"], round(r["full_fraction"], 3)): r for r in result.get("peak", []) if not r.get("oom")}
    lines = ["| ctx | full KV heads | batch | KV held GiB | decode ms/step | tokens/s | HBM floor ms | decode/floor "
             "| prefill peak above weights - KV GiB (batch 1) |", "|---|---|---|---|---|---|---|---|---|"]
    notes, by = [], {}
    for r in result.get("sweep", []):
        ctx, share, batch = f"{r['context'] // 1024}k", f"{r['full_fraction']:.0%}", r["batch"]
        peak = peaks.get((r["context"], round(r["full_fraction"], 3)))
        slack = f"{(peak['peak_above_weights'] - peak['kv_bytes']) / GIB:.2f}" if peak and batch == 1 else ""
        if r.get("oom"):
            lines.append(f"| {ctx} | {share} | {batch} | ({r['ideal_kv_bytes'] / GIB:.2f}) | OOM | | | | {slack} |")
            continue
        floor = (weights + r["kv_bytes"]) / bw * 1e3
        ratio = r["decode_ms"] / floor
        by[(r["context"], batch, r["full_fraction"])] = r["decode_ms"]
        lines.append(f"| {ctx} | {share} | {batch} | {r['kv_bytes'] / GIB:.2f} | {r['decode_ms']:.2f} | "
                     f"{batch * 1e3 / r['decode_ms']:.0f} | {floor:.2f} | {ratio:.2f} | {slack} |")
        if ratio > TARGET_BUDGET_FLOOR:
            notes.append(f"- {ctx}, {share}, batch {batch}: decode {ratio:.2f}x the floor, MISSED (target <= "
                         f"{TARGET_BUDGET_FLOOR}x) by {(ratio / TARGET_BUDGET_FLOOR - 1) * 100:.0f}%.")
    for (context, batch, share), ms in sorted(by.items()):
        larger = [(s, by[(context, batch, s)]) for (c, b, s) in by if c == context and b == batch and s > share]
        for s, other in larger:
            if ms > other:
                notes.append(f"- {context // 1024}k, batch {batch}: {share:.0%} full ({ms:.2f} ms) is SLOWER than "
                             f"{s:.0%} full ({other:.2f} ms), by {(ms / other - 1) * 100:.1f}%.")
    for (context, share), peak in sorted(peaks.items()):
        slack = (peak["peak_above_weights"] - peak["kv_bytes"]) / GIB
        if slack > TARGET_PEAK_SLACK / GIB:
            notes.append(f"- {context // 1024}k, {share:.0%}: prefill peak KV + {slack:.2f} GiB, MISSED (target <= KV + 2 GiB).")
    return "\n".join(lines), notes or [f"- every row met: decode <= {TARGET_BUDGET_FLOOR}x the floor, never slower at a "
                                        "smaller budget, prefill peak <= KV + 2 GiB above the weights."]


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


def render_kinds(result: dict) -> str:
    """The `--kinds` rows as markdown: a header stating the setup, the table, and the targets met or missed."""
    a = result["args"]
    md, rows = table(result["rows"], result["weights_bytes"], result["copy_bandwidth_Bps"])
    header = (f"Device: {result['device']} (torch {result['torch']}), {result['date']}. Llama-3.1-8B shape, random bf16 "
              f"weights ({result['weights_bytes'] / GIB:.2f} GiB), batch 1, {result['mask']}, prefill chunk "
              f"{a['chunk_size']}, {a['new_tokens']} timed decode steps after {a['warmup']} warm-up (median, CUDA events). "
              f"Copy bandwidth {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write). KV held is measured at the end "
              f"(context + warm-up + timed tokens); ideal = `HeadMask.ideal_kv_bytes` of the 50% mask at that length.")
    extra = ""
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
           "decode step captured in a CUDA graph with one Triton split-KV launch per layer for all KV heads (append + "
           "attend), torch.compile'd fused norm / RoPE / SiLU pieces, each layer's q/k/v and gate/up weights packed into one "
           "matrix each (one matrix-vector product instead of three and two), keys and values stored with one write. The HBM floor counts every weight byte (the embedding table "
           "included) once per step.")
    envs = sorted({r["environment"] for r in rows if "environment" in r})
    if envs:
        how += " Environments: " + ", ".join(f"{kind} under {env}" for env in envs
                                            for kind in sorted({r['cache'] for r in rows if r.get('environment') == env},
                                                               key=KINDS.index)) + "."
    return (f"{header}{extra}\n\n{how}\n\n{md}\n\nTargets (compressed runtime):\n" + "\n".join(verdicts(rows))
            + "\n\nAgainst the baselines:\n" + "\n".join(comparisons(rows)))


def _check_md(check: dict) -> str:
    verdict = "PASSED" if check["passed"] else "FAILED"
    lines = [f"GPU check ({verdict}; relative L2 error of bf16 logits against float32 references, a run fails over "
             f"{CHECK_TOLERANCE}x the bf16 noise floor):", "", "| comparison | part | error | bf16 noise floor | error / floor |",
             "|---|---|---|---|---|"]
    for kind, floor in (("all_full", "plain"), ("mixed", "mixed")):
        for part in ("prefill", "decode"):
            lines.append(f"| {kind} | {part} | {check[f'{kind}_{part}_error']:.2e} | {check[f'noise_floor_{floor}_{part}']:.2e} "
                         f"| {check[f'{kind}_{part}_ratio']:.2f} |")
    lines.append(f"\n(The mixed mask's reference differs from the plain model's by {check['mixed_vs_plain']:.2f}: the "
                 "mixed comparison is not vacuous.)")
    return "\n".join(lines)


def _profile_md(profiles: list[dict], steps: dict) -> str:
    lines = ["Where a decode step's GPU time goes (torch.profiler, uncaptured steps, ms per step / kernel launches per step; "
             "`gaps` = the CUDA graph's step time minus the kernels' time):", "",
             "| ctx | full | batch | graph step ms | kernels ms | gaps ms | " + " | ".join(k for k, _ in KERNEL_KINDS)
             + " | other |", "|---|---|---|---|---|---|" + "---|" * (len(KERNEL_KINDS) + 1)]
    for p in profiles:
        step = steps.get((p["context"], round(p["full_fraction"], 3), p["batch"]))
        kinds = [k for k, _ in KERNEL_KINDS] + ["other (copies, indexing, sampling)"]
        cells = [f"{p['by_kind'][k]['ms']:.3f} / {p['by_kind'][k]['launches']:.0f}" if k in p["by_kind"] else "-" for k in kinds]
        gap = f"{step - p['kernel_ms']:.2f}" if step else "-"
        lines.append(f"| {p['context'] // 1024}k | {p['full_fraction']:.0%} | {p['batch']} | {step or float('nan'):.2f} | "
                     f"{p['kernel_ms']:.2f} | {gap} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _microbench_md(rows: list[dict]) -> str:
    lines = ["Decode attention of one layer alone (`decode_layer`: append + attend + combine, in a CUDA graph over 4 "
             "layers' buffers), ms against the copy-bandwidth floor of the bytes held:", "",
             "| full + streaming KV heads | tokens | batch | floor ms | default ms | best ms (config) |", "|---|---|---|---|---|---|"]
    for r in rows:
        configs = {k: v for k, v in r.items() if k.startswith("{")}
        best = min(configs, key=configs.get)
        lines.append(f"| {r['n_full']} + {r['n_stream']} | {r['length']} | {r['batch']} | {r['floor_ms']:.4f} | "
                     f"{configs['{}']:.4f} ({configs['{}'] / r['floor_ms']:.2f}x) | {configs[best]:.4f} "
                     f"({configs[best] / r['floor_ms']:.2f}x) `{best}` |")
    return "\n".join(lines)


def _gemv_md(rows: list[dict]) -> str:
    lines = ["Each matrix product of the decode step alone (8B shapes, bf16, in a CUDA graph over 3 GiB of weight copies), "
             "ms against the copy-bandwidth floor of the weight's bytes; `gemv_kernel` with the shipped configuration "
             "and the best of `GEMV_CONFIGS`; the down projection also gated (`[gate | up]` in) against `silu_mul` + cuBLAS:", "",
             "| product [out, in] | batch | floor ms | cuBLAS ms | gemv_kernel ms | best ms (config) | gated: silu_mul + cuBLAS / gemv_kernel ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        configs = {k: v for k, v in r.items() if k.startswith("{")}
        best = min(configs, key=configs.get)
        gated = f"{r['gated_cublas']:.4f} / {r['gated']:.4f}" if "gated" in r else ""
        lines.append(f"| {r['name']} [{r['n']}, {r['k']}] | {r['batch']} | {r['floor_ms']:.4f} | {r['cublas']:.4f} "
                     f"({r['cublas'] / r['floor_ms']:.2f}x) | {configs['{}']:.4f} ({configs['{}'] / r['floor_ms']:.2f}x) | "
                     f"{configs[best]:.4f} `{best}` | {gated} |")
    return "\n".join(lines)


def _longest_md(found: list[dict], result: dict) -> str:
    lines = [f"Longest context on this GPU ({result['device']}, {result.get('total_memory', 0) / GIB:.0f} GiB), batch 1, "
             "chunked prefill (chunk 4096) + a decode step, found by doubling from 128k then bisection (16k steps), "
             "out-of-memory caught:", ""]
    for f in found:
        lines.append(f"- {f['full_fraction']:.0%} full KV heads: {f['longest']:,} tokens fit ({f['longest'] / 1024:.0f}k), "
                     f"{f['first_failure']:,} do not.")
    return "\n".join(lines)


def render_budgets(result: dict) -> str:
    """The budget sweep, its verdicts, the check, the profile, the kernel microbenchmark and the longest context."""
    a = result["args"]
    md, notes = budget_table(result)
    parts = [f"Device: {result['device']} (torch {result['torch']}, transformers {result['transformers']}), {result['date']}. "
             f"Llama-3.1-8B shape, random bf16 weights ({result['weights_bytes'] / GIB:.2f} GiB); masks: `HeadMask.random` "
             f"(seed 0) at each share of full KV heads, `HeadMask.all_full` at 100%, sink 64 + recent 256. Decode: "
             f"{a['new_tokens']} timed steps after {a['warmup']} warm-up (median, CUDA events, CUDA graph), the cache filled by "
             f"`synthetic_prefill` (random keys/values: same bytes, same kernels as after a real prefill); the prefill "
             f"peak column comes from a real chunked prefill (chunk {a['chunk_size']}) at batch 1. HBM floor = (weights + KV "
             f"held) / copy bandwidth {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write).", md,
             "Targets (decode <= 1.15x floor at every row, never slower at a smaller budget, prefill peak <= KV + 2 GiB):\n"
             + "\n".join(notes)]
    if "check" in result:
        parts.insert(1, _check_md(result["check"]))
    if result.get("note"):  # where the result merges runs (see --readme-from)
        parts.insert(1, result["note"])
    if result.get("profile"):
        steps = {(r["context"], round(r["full_fraction"], 3), r["batch"]): r["decode_ms"]
                 for r in result.get("sweep", []) if not r.get("oom")}
        parts.append(_profile_md(result["profile"], steps))
    if result.get("microbench"):
        parts.append(_microbench_md(result["microbench"]))
    if result.get("gemv"):
        parts.append(_gemv_md(result["gemv"]))
    if result.get("longest"):
        parts.append(_longest_md(result["longest"], result))
    return "\n\n".join(parts)


def _clean(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def write_readme(results: list[dict], command: str | None) -> str:
    """Render results (several JSON files of one device, merged) into their analyses/README.md sections."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import write_section

    texts = []
    sharded = [r for r in results if "weights_bytes_by_device" in r]
    if sharded:
        text = render_sharded(sharded[0])
        write_section("runtime_sharded", f"## Runtime on a model larger than one GPU\n\nCommand: `{command or sharded[0]['command']}`"
                      f"\n\n{text}")
        texts.append(text)
    budgets = [r for r in results if "sweep" in r and "weights_bytes_by_device" not in r]
    if budgets:
        text = render_budgets(budgets[0])
        write_section("runtime_budgets", f"## Runtime at every budget\n\nCommand: `{command or budgets[0]['command']}`\n\n{text}")
        texts.append(text)
    kinds = [r for r in results if r.get("rows")]
    if kinds:
        result = merged(kinds)
        text = render_kinds(result)
        write_section("runtime_benchmark", f"## Runtime benchmark\n\nCommand: `{command or result.get('command', '')}`\n\n{text}")
        texts.append(text)
    return "\n\n".join(texts)


def run_stages(args, result: dict, save) -> None:
    """Every stage the flags ask for, most wanted first, the JSON saved after each (a run cut short keeps what it
    measured): sweep, profile, check, peak, kinds, microbench, longest."""
    model = random_llama(llama_8b_config())
    result.update(weights_bytes=weight_bytes(model), total_memory=torch.cuda.get_device_properties(0).total_memory)
    log = lambda row: print(json.dumps(_clean(row), default=str), flush=True)  # noqa: E731
    if args.sweep:
        result["sweep"] = []
        for context in args.contexts:
            result["sweep"] += [_clean(r) for r in budget_sweep(model, [context], args.fractions, args.batches,
                                                                steps=args.new_tokens, warmup=args.warmup, log=log)]
            save()
    if args.profile:
        result["profile"] = [profile_step(model, budget_mask(model, f), c, batch=batch) for batch in args.batches
                             for c in ((8192, 131072) if batch == 1 else (8192,)) for f in (0.25, 1.0)]
        for p in result["profile"]:
            log(p)
        save()
    if args.check:
        result["check"] = check()
        print("check", json.dumps(result["check"]), flush=True)
        save()
        torch.cuda.empty_cache()
    if args.peak:
        result["peak"] = []
        for context in args.contexts:
            for fraction in args.fractions:
                row = measure_one(model, budget_mask(model, fraction), "compressed", context, new_tokens=args.new_tokens,
                                  warmup=args.warmup, chunk_size=args.chunk_size)
                result["peak"].append(_clean(dict(row, full_fraction=fraction)))
                log(result["peak"][-1])
                save()
    if args.kinds:
        config = MaskConfig()
        mask = HeadMask.random(info_of(model), config.full_fraction, seed=config.seed, sink=config.sink, recent=config.recent)
        result.update(mask=repr(mask), rows=[])
        for context in args.contexts:
            df = measure(model, mask, contexts=[context], new_tokens=args.new_tokens, kinds=args.kinds, warmup=args.warmup,
                         chunk_size=args.chunk_size)
            result["rows"] += [_clean(r) for r in df.to_dict("records")]
            print(df.to_string(index=False), flush=True)
            save()
    if args.microbench is not None:
        if "attention" in args.microbench or not args.microbench:
            result["microbench"] = microbench(result["copy_bandwidth_Bps"])
            save()
        if "gemv" in args.microbench or not args.microbench:
            result["gemv"] = gemv_microbench(result["copy_bandwidth_Bps"])
            save()
    if args.longest:
        result["longest"] = []
        for fraction in args.longest:
            result["longest"].append(longest_context(model, budget_mask(model, fraction), chunk_size=args.chunk_size, log=log))
            save()


def decode_kernel_config(changes: dict) -> None:
    """Apply `--attention-config` to the Triton decode kernel's `CONFIG` (a same-card comparison of its settings)."""
    from headlab.runtime import decode_kernel

    unknown = set(changes) - set(decode_kernel.CONFIG)
    if unknown:
        raise SystemExit(f"--attention-config: unknown keys {sorted(unknown)}; decode_kernel.CONFIG has {sorted(decode_kernel.CONFIG)}.")
    decode_kernel.CONFIG.update(changes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="JSON output path")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--kinds", nargs="+", default=[], choices=KINDS, help="the --kinds table (50%% mask vs baselines)")
    parser.add_argument("--sweep", action="store_true", help="the budget table")
    parser.add_argument("--peak", action="store_true", help="a real prefill per context and budget at batch 1")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of a decode step")
    parser.add_argument("--longest", type=float, nargs="*", default=None,
                        help="longest context at these shares of full heads (no value: 0.25 and 1.0)")
    parser.add_argument("--check", action="store_true", help="logits vs float32 references; exit 1 over the bf16 noise floor")
    parser.add_argument("--microbench", nargs="*", default=None, choices=["attention", "gemv"],
                        help="kernel microbenchmarks: decode attention of one layer, each matrix product (both if none named)")
    parser.add_argument("--matmul", default=None, choices=["auto", "cublas"],
                        help="the decode step's matrix products: gemv_kernel (auto) or cuBLAS; default: fused.MATMUL")
    parser.add_argument("--attention-config", type=json.loads, default={},
                        help='changes to decode_kernel.CONFIG for this run, JSON, e.g. \'{"min_chunk": 256}\'')
    parser.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES), help="the random model's shape (--devices)")
    parser.add_argument("--devices", type=int, default=1, help="split the model by layers over this many GPUs of the host")
    parser.add_argument("--sharded-check", action="store_true", help="with --devices: one GPU vs sharded, logits and KV")
    parser.add_argument("--dry-run", action="store_true", help="with --devices: build and run on the CPU, no numbers")
    parser.add_argument("--readme-from", type=Path, nargs="+", default=None,
                        help="no run: render the JSON of earlier runs into analyses/README.md")
    parser.add_argument("--command", default=None, help="the command line to state in the README section")
    args = parser.parse_args(argv)
    if args.readme_from is not None:
        print(write_readme([json.loads(path.read_text()) for path in args.readme_from], args.command))
        return 0
    if args.out is None:
        parser.error("give the JSON output path (or --readme-from).")
    if args.longest is not None and not args.longest:
        args.longest = [0.25, 1.0]
    if args.devices > 1 or args.dry_run:
        return main_sharded(args, argv)
    if args.shape != "llama-3.1-8b":
        parser.error("--shape needs --devices (the one-GPU stages are the 8B shape's).")
    torch.backends.cuda.matmul.allow_tf32 = False
    fused.MATMUL = args.matmul or fused.MATMUL
    decode_kernel_config(args.attention_config)
    device_name = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device: {device_name}; torch {torch.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    result = {"command": "python analyses/runtime_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
              "date": datetime.date.today().isoformat(), "copy_bandwidth_Bps": bw, "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2, default=str))

    run_stages(args, result, save)
    save()
    if "sweep" in result:
        print(render_budgets(result))
    if result.get("rows"):
        print(render_kinds(result))
    if "check" in result and not result["check"]["passed"]:
        print("CHECK FAILED: a runtime error exceeds the bf16 noise floor (see the check table).", flush=True)
        return 1
    return 0


def main_sharded(args, argv) -> int:
    """`--devices N` / `--dry-run`: `run_sharded`, its JSON and its table."""
    if args.kinds or args.peak or args.profile or args.longest or args.check or args.microbench is not None:
        raise SystemExit("With --devices > 1 only the decode rows (--contexts, --fractions, --batches) and --sharded-check run.")
    if not args.dry_run and torch.cuda.device_count() < args.devices:
        raise SystemExit(f"--devices {args.devices}: this host has {torch.cuda.device_count()} CUDA device(s).")
    torch.backends.cuda.matmul.allow_tf32 = False
    bandwidth = {} if args.dry_run else {d: copy_bandwidth(device=d) for d in _gpus(args.devices)}
    names = sorted({torch.cuda.get_device_name(i) for i in range(args.devices)}) if not args.dry_run else ["cpu (dry run)"]
    result = {"command": "python analyses/runtime_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": f"{args.devices} x {' / '.join(names)}", "torch": torch.__version__,
              "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
              "bandwidth_by_device": bandwidth, "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=2, default=str))

    run_sharded(args, result, save)
    save()
    print(render_sharded(result))
    return 0 if result.get("sharded_check", {}).get("passed", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
