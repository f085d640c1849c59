"""Time and peak memory of every scorer at long contexts (issue 17): the linear passes of `headlab.longpass`.

    python analyses/scoring_scale.py cpu --out analyses/scoring_scale_cpu.json     # embedded model, CPU
    python analyses/scoring_scale.py gpu --out $OUT/scoring_scale_gpu.json --tokenizer .model_tok   # 8B shape, GPU
    python analyses/scoring_scale.py table analyses/scoring_scale_cpu.json [gpu.json]   # the Markdown table

The long-context scorers run at each context with one sample: `retrieval` (one fact needle at depth 0.5 of a
filler haystack), `sink` (one prose text, the prose domain only) and `attention_area` (one prose text; it is
what the head-mask sources call, with `retrieval`), and `duo` (the trained mask source: `DUO_STEPS` training steps on
prompts of the last 1024 tokens up to the context; its own memory check refuses a length whose activations do not
fit, and that refusal is the row). The short-prompt scorers (`induction`, `previous_token`,
`duplicate_token`, `successor`, `select_copy`, `safety`) run once at their defaults: their prompts do not grow
with the context.
- cpu: `hl.load("embedded")` at 2k, 4k and 8k tokens; every measurement in its own subprocess, whose peak
  resident memory is reset after the model is loaded (Linux `/proc/self/clear_refs`) and read back
  (`VmHWM`) after the score: "peak above" = what the scorer added to the process's peak, measured after a
  warm-up run of the same scorer at 256 tokens in that process (the one-time costs of a first score, ~0.5 GiB
  at any context, are reported apart as `warm_up_peak_bytes`).
- gpu: the Llama-3.1-8B shape with random bf16 weights (`LlamaForCausalLM(config)` on CUDA, wrapped by
  `hl.from_model`) and the embedded model's tokenizer (`--tokenizer`: a folder with its tokenizer files) at
  8k, 32k and 128k; "peak above" = `max_memory_allocated` during the score minus what was allocated before
  (the weights), against the target KV cache + 4 GiB.
Each result is written to the JSON file as soon as it is measured, so a run cut short keeps what it did.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import headlab as hl
from headlab import longpass
from headlab.lab import DoesNotFitError

GIB = 2**30
CPU_CONTEXTS = (2048, 4096, 8192)
GPU_CONTEXTS = (8192, 32768, 131072)
LONG = ("retrieval", "sink", "attention_area", "duo")
DUO_STEPS = 2  # enough to time a step and measure its peak; the mask's quality is not the point here
SHORT = ("induction", "previous_token", "duplicate_token", "successor", "select_copy", "safety")
TARGET_SLACK = 4 * GIB  # GPU target: peak above the weights <= KV cache + 4 GiB


def long_params(kind: str, context: int) -> dict:
    """The one-sample parameters of a long-context scorer at `context` tokens."""
    return {"retrieval": dict(needle="fact", haystack="filler", lengths=[context], depths=[0.5], n=1),
            "sink": dict(domains=["prose"], n=1, seq_len=context, batch_size=1),
            "attention_area": dict(n=1, seq_len=context, batch_size=1),
            "duo": dict(steps=DUO_STEPS, context_min=max(context - 1024, 640), context_max=context)}[kind]


def _run(lab, kind: str, params: dict):
    """The values `[n_layers, heads]` of scorer `kind` (or the gates of mask source `duo`), not stored."""
    if kind == "duo":
        from headlab.masks import make_mask

        mask = make_mask(lab, "duo", full_fraction=0.5, **params)
        return torch.tensor(mask.source["values"])
    return hl.score(lab, kind, save=False, recompute=True, **params).values


def _vm_hwm() -> int:
    """The process's peak resident memory in bytes (`VmHWM`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak() -> int:
    """Reset the peak resident memory to the current one (Linux), return it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vm_hwm()


def measure(lab, kind: str, params: dict) -> dict:
    """Score `kind` with `params` (no store), timing it and measuring the memory it adds to the peak."""
    cuda = str(lab.device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_peak()
    started = time.perf_counter()
    error = None
    try:
        values = _run(lab, kind, params)
    except (torch.OutOfMemoryError, DoesNotFitError, MemoryError) as err:
        error, values = f"{type(err).__name__}: {str(err).splitlines()[0]}", None
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if cuda else _vm_hwm()) - before
    context = max(params.get("lengths", [params.get("seq_len", params.get("context_max", 0))]))
    return {"kind": kind, "context": context or None, "params": params, "seconds": round(seconds, 2),
            "peak_above_bytes": peak, "kv_cache_bytes": longpass.kv_cache_bytes(lab, context) if context else 0,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "error": error,
            "host_peak_bytes": _vm_hwm() if cuda else None,  # the process's peak resident memory (duo keeps layer inputs there)
            "top_head": None if values is None else [int(i) for i in divmod(int(values.argmax()), values.shape[1])]}


def _append(out: Path, row: dict) -> None:
    rows = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(rows + [row], indent=1))
    print(_line(row), flush=True)


def _jobs(contexts, kinds) -> list[tuple[str, dict]]:
    long = [(kind, long_params(kind, n)) for n in contexts for kind in LONG if kind in kinds]
    return long + [(kind, {}) for kind in SHORT if kind in kinds]


def run_cpu(out: Path, contexts, kinds) -> None:
    """Every job in its own subprocess (`one`), so each peak is the scorer's alone."""
    for kind, params in _jobs(contexts, kinds):
        done = subprocess.run([sys.executable, __file__, "one", kind, json.dumps(params)], capture_output=True, text=True)
        if done.returncode != 0:
            row = {"kind": kind, "params": params, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        else:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        _append(out, row)


def run_one(kind: str, params: dict) -> None:
    """One measurement after a warm-up: the same long scorer at 256 tokens (a short scorer: attention_area at 256),
    which pays the process's one-time costs (imports, thread pools, allocator arenas: ~0.5 GiB whatever the context)."""
    lab = hl.load("embedded-refusal" if kind == "safety" else "embedded", device="cpu")  # Ships reads the refusal model
    warm = kind if kind in LONG[:3] else "attention_area"
    warm_up = measure(lab, warm, long_params(warm, 256) | ({"recent": 64} if warm == "attention_area" else {}))
    print(json.dumps(measure(lab, kind, params) | {"warm_up_peak_bytes": warm_up["peak_above_bytes"]}))


def gpu_lab(tokenizer: str):
    from transformers import AutoTokenizer

    from headlab.runtime.benchmark import llama_8b_config, random_llama

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    model = random_llama(llama_8b_config(attn_implementation="eager"), device="cuda", dtype=torch.bfloat16)
    return hl.from_model(model, tok, "llama-3.1-8b-shape-random")


def run_gpu(out: Path, contexts, kinds, tokenizer: str) -> None:
    started = time.perf_counter()
    lab = gpu_lab(tokenizer)
    weights = torch.cuda.memory_allocated()
    print(f"model ready in {time.perf_counter() - started:.1f} s, weights {weights / GIB:.2f} GiB", flush=True)
    for kind, params in _jobs(contexts, kinds):
        row = measure(lab, kind, params)
        row["weights_bytes"] = weights
        _append(out, row)
        torch.cuda.empty_cache()


def _line(row: dict) -> str:
    if row.get("seconds") is None:
        return f"{row['kind']} {row.get('params')}: {row.get('error')}"
    return (f"{row['kind']:<15} ctx {row['context'] or '-':>7}  {row['seconds']:>8.1f} s  peak above "
            f"{row['peak_above_bytes'] / GIB:6.2f} GiB  KV {row['kv_cache_bytes'] / GIB:5.2f} GiB  {row['error'] or ''}")


def table(paths: list[str]) -> str:
    """Markdown: one row per measurement of every JSON file given."""
    lines = ["| device | scorer | context | time s | peak above GiB | KV cache GiB | target | note |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for row in json.loads(Path(path).read_text()):
            if row.get("seconds") is None:
                lines.append(f"| | {row['kind']} | | | | | | {row.get('error')} |")
                continue
            peak, kv = row["peak_above_bytes"] / GIB, row["kv_cache_bytes"] / GIB
            cuda = row["device"] != "cpu"
            target = (peak <= kv + TARGET_SLACK / GIB) if cuda else (peak <= 0.5 if row["kind"] == "retrieval" and row["context"] == 4096 else None)
            mark = "refused" if row.get("error") else "" if target is None else ("met" if target else "MISSED")
            lines.append(f"| {row['device']} | {row['kind']} | {row['context'] or 'default'} | {row['seconds']:.1f} | "
                         f"{peak:.2f} | {kv:.2f} | {mark} | {row.get('error') or ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["cpu", "gpu", "table", "one"])
    parser.add_argument("rest", nargs="*", help="table: JSON files; one: KIND PARAMS_JSON (internal)")
    parser.add_argument("--out", type=Path, help="JSON file the results are appended to")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--kinds", nargs="+", default=[*LONG, *SHORT])
    parser.add_argument("--tokenizer", default=".model_tok", help="gpu: a folder with the embedded model's tokenizer files")
    args = parser.parse_args()
    if args.part == "one":
        return run_one(args.rest[0], json.loads(args.rest[1]))
    if args.part == "table":
        return print(table(args.rest))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.part == "cpu":
        run_cpu(args.out, args.contexts or CPU_CONTEXTS, args.kinds)
    else:
        run_gpu(args.out, args.contexts or GPU_CONTEXTS, args.kinds, args.tokenizer)
    print(table([str(args.out)]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
