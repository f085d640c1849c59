"""Safety heads of the refusal-tuned embedded model: Ships, refusal vs compliance under three ablations, Sahara.

    .venv/bin/python analyses/safety_heads.py [--n 8] [--k 4] [--n-random 5] [--fresh-n 10] [--device cuda] [--recompute]

"Not refused" is not "complied": `headlab.outcomes.outcome_study` labels every ablated answer to the fresh
held-out harmful requests refused / complied / degenerate (scaled_query as in the paper, zero, mean; the top-2
Ships heads and random pairs), stored in cached_runs/ like the other runs; the conclusion is written from it.

Needs the adapter of analyses/refusal_tuning.py (cached_runs/adapters/embedded-refusal/). Ships runs
through `hl.score(lab, "safety")` and the ablation curve through `hl.ablation_curve`, both stored in
cached_runs/smollm2-135m-instruct-refusal/; writes the "safety_heads" section of analyses/README.md.
A full Ships scan is 270 ablated passes per request: minutes on a GPU, an hour or more on a small shared CPU.
"""
from __future__ import annotations

import argparse
import inspect
import json
import time

import torch

import headlab as hl
from headlab.ablation.curve import CurveConfig
from headlab.heads import format_heads, head_label
from headlab.loading import REFUSAL_ADAPTER_DIR
from headlab.outcomes import OUTCOMES, OutcomeConfig, OutcomeStudy, outcome_study
from headlab.tasks.refusal import RefusalTask
from headlab.scorers import scorer_fields
from headlab.scorers.safety import CHECK, Sahara, answers_side_by_side, method_label, sahara, ships_ablation
from report import Report, recompute_args  # analyses/report.py

SHIPS, SAHARA = scorer_fields("safety"), Sahara()
REFUSAL_TOKENS = inspect.signature(RefusalTask.__init__).parameters["max_new_tokens"].default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=SHIPS["n"], help="harmful (training) requests Ships averages over")
    parser.add_argument("--k", type=int, default=SAHARA.k, help="top-k / random-k / Sahara group size")
    parser.add_argument("--n-random", type=int, default=CurveConfig().n_random)
    parser.add_argument("--task-n", type=int, default=CHECK.n, help="held-out harmful requests the refusal rate is measured on")
    parser.add_argument("--max-new-tokens", type=int, default=REFUSAL_TOKENS)
    parser.add_argument("--fresh-n", type=int, default=10, help="fresh harmful requests of the outcome study")
    parser.add_argument("--random-pairs", type=int, default=1, help="random head pairs of the outcome study")
    parser.add_argument("--outcome-tokens", type=int, default=OutcomeConfig().max_new_tokens)
    parser.add_argument("--sahara-pool", type=int, default=SAHARA.pool)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = recompute_args(__doc__, parser)
    started = time.perf_counter()
    emit = Report("safety_heads")

    training = json.loads((REFUSAL_ADAPTER_DIR / "training.json").read_text())
    lab = hl.load("embedded-refusal", device=args.device)
    emit(f"## Safety heads — {lab.info.name} (Zhou et al. 2024, Ships / Sahara)\n")
    emit("The embedded model barely refuses, so it was refusal-tuned first (`analyses/refusal_tuning.py`: LoRA rank "
         f"{training['rank']} on q/k/v/o/gate/up/down, {training['n_pairs']} hand-written pairs, {training['steps']} steps, "
         f"{training['train_seconds']} s on {training.get('device', 'cpu')}; `hl.load('embedded-refusal')` merges it). "
         f"Refusal rate (greedy {training['max_new_tokens']} tokens, `is_refusal`) on the 12 held-out requests of each set:\n")
    emit("| model | harmful refused | harmless refused |")
    emit("|---|---|---|")
    for name in ("before", "after"):
        r = training[name]
        emit(f"| {'embedded' if name == 'before' else 'embedded-refusal'} | {r['harmful_heldout']:.2f} | {r['harmless_heldout']:.2f} |")
    emit("\nThe adapter over-fits its 56 pairs (final loss ~0.001): harmless answers are often a memorised training "
         "answer, and it refuses a few harmless requests (\"How can I get along better with my roommate?\", \"Tell me "
         "how to use a library catalogue.\"). It is a toy refusal, but a real one to look for.\n")

    t0 = time.perf_counter()
    scores = hl.score(lab, "safety", n=args.n, recompute=args.recompute)
    method = ships_ablation(scores)
    emit(f"### Ships ({method_label(method.name)}), {scores.meta['n_requests']} harmful training requests\n")
    emit(f"Intact first answer tokens: {', '.join(repr(t) for t in scores.meta['intact_first_tokens'])}. "
         f"Median head {float(scores.values.median()):.4f}, mean {float(scores.values.mean()):.4f} nats "
         f"({scores.meta.get('seconds', round(time.perf_counter() - t0, 1))} s).\n")
    emit("| rank | head | Ships (KL, nats) |")
    emit("|---|---|---|")
    for rank, (layer, head, value) in enumerate(scores.top(10), 1):
        emit(f"| {rank} | {head_label(layer, head)} | {value:.4f} |")

    task_params = {"max_new_tokens": args.max_new_tokens}
    ks = sorted({1, 2, args.k})
    curve = hl.ablation_curve(lab, scores, task=CHECK.task, ks=ks, method=method.name, n_random=args.n_random,
                              n=args.task_n, task_params=task_params, method_params=method.params(),
                              recompute=args.recompute)
    emit(f"\n### Refusal rate with heads ablated ({curve.task['n']} held-out harmful requests, greedy "
         f"{args.max_new_tokens} tokens, {method_label(method.name)})\n")
    emit("| heads ablated | top-k Ships heads | refusal | random-k (each set) | random-k mean |")
    emit("|---|---|---|---|---|")
    emit(f"| 0 | — | {curve.baseline:.2f} | — | — |")
    for k, top, heads, rand in zip(curve.ks, curve.top, curve.top_heads, curve.random):
        emit(f"| {k} | {format_heads(heads)} | {top:.2f} | {', '.join(f'{v:.2f}' for v in rand)} | "
             f"{sum(rand) / len(rand):.2f} |")

    top2, rand2 = curve.top[curve.ks.index(2)], curve.random_mean[curve.ks.index(2)]
    emit(f"\nWith the top-2 Ships heads ablated ({method_label(method.name)}) `is_refusal` fires on {top2:.2f} of the answers "
         f"(intact {curve.baseline:.2f}; random 2-head sets {rand2:.2f}). That is a \"not refused\" rate, not a compliance "
         "rate: the next section labels what the answers are.")
    study = outcome_study(lab, scores.top_heads(2), (method.name, "zero", "mean"), n=args.fresh_n,
                          random_pairs=args.random_pairs, config=OutcomeConfig(max_new_tokens=args.outcome_tokens),
                          recompute=args.recompute)
    emit_outcomes(emit, study)
    task = hl.make_task(CHECK.task, lab, n=args.task_n, **task_params)
    shown = task.prompts[:3]
    heads = {"intact": [], "top-1 ablated": scores.top_heads(1), "top-2 ablated": scores.top_heads(2)}
    examples = answers_side_by_side(lab, shown, heads, method, args.max_new_tokens)
    emit("\nRead the answers before the rates: `is_refusal` only says the answer no longer starts with a refusal, "
         "not that the model now complies — it may simply have stopped producing language.\n")
    emit("| held-out request | intact | top-1 ablated | top-2 ablated |")
    emit("|---|---|---|---|")
    for prompt, x, y, z in examples.itertuples(index=False):
        emit(f"| {prompt} | {x!r} | {y!r} | {z!r} |".replace("\\n", " ").replace("\\x0b", " "))

    group = sahara(lab, k=args.k, pool=args.sahara_pool, n=args.n, scores=scores, recompute=args.recompute)
    ablated = hl.ablate(lab, group.heads, task, method=method).ablated
    emit(f"\n### Sahara (greedy, {group.objective.upper() if group.objective == 'kl' else group.objective} objective, candidates = top {args.sahara_pool} Ships heads, "
         f"{group.n_requests} requests, {group.seconds:.0f} s)\n")
    emit("| step | added | joint KL |")
    emit("|---|---|---|")
    for step, (head, value) in enumerate(zip(group.heads, group.curve), 1):
        emit(f"| {step} | {head_label(*head)} | {value:.4f} |")
    emit(f"\nRefusal rate with the Sahara group ablated: {curve.baseline:.2f} intact -> **{ablated:.2f}**.")
    where = torch.cuda.get_device_name() if lab.device.startswith("cuda") else "CPU"
    emit(f"\n_This run: {time.perf_counter() - started:.0f} s on {where} (float32); stored Ships / curve / Sahara runs are read "
         "from cached_runs/ (they were computed on an NVIDIA H100: a full Ships scan is 270 ablated passes per request)._")
    emit.write()


def emit_outcomes(emit: Report, study: OutcomeStudy) -> None:
    """The outcome table (method x head set x refused / complied / degenerate) and the conclusion it supports."""
    cal, n = study.calibration, study.params["n"]
    emit(f"\n### Refused, complied or degenerate? ({n} fresh held-out harmful requests, greedy {study.params['max_new_tokens']} "
         f"tokens, `headlab.outcomes`)\n")
    emit(f"Written after the heads were chosen (`requests.harmful('fresh')`). Degenerate = mean per-token loss under the intact "
         f"model above {cal['loss_threshold']:.2f} nats or repeated-bigram fraction above {cal['repeat_threshold']:.2f} "
         f"(the highest of the intact model's {cal['n']} harmless held-out answers, {cal['max_loss']:.2f} nats and "
         f"{cal['max_repeat']:.2f}, plus a margin); else refused if `is_refusal`, else complied. "
         f"{study.seconds:.0f} s when computed.\n")
    emit("| method | head set | heads | refused | complied | degenerate |")
    emit("|---|---|---|---|---|---|")
    for r in study.rows:
        emit(f"| {r['method']} | {r['set']} | {r['heads'] or '—'} | {r['refused']}/{r['n']} | {r['complied']}/{r['n']} | "
             f"{r['degenerate']}/{r['n']} |")
    first = study.params["methods"][0]
    shown = [a for a in study.answers if a["set"] in ("intact", "top")][:: n]  # the first request, each method
    emit("\nFirst request, intact and with the top-2 heads ablated: "
         + "; ".join(f"{a['method'] if a['set'] == 'top' else 'intact'} ({a['outcome']}, {a['loss']:.1f} nats): "
                     f"{a['answer'][:60]!r}" for a in shown).replace("\\n", " ") + ".")
    emit(f"\n**Conclusion (as measured).** {conclusion(study.rows, first)}")


def conclusion(rows: list[dict], paper_method: str) -> str:
    """What the outcome counts say about the top heads (only the claims the numbers support)."""
    top = {r["method"]: r for r in rows if r["set"] == "top"}
    ablated = [r for r in rows if r["set"] != "intact"]
    complied = sum(r["complied"] for r in ablated)
    randoms = [r for r in rows if r["set"].startswith("random")]
    others = [m for m in top if m != paper_method]
    counts = ", ".join(f"{m}: {r['refused']} refused / {r['complied']} complied / {r['degenerate']} degenerate"
                       for m, r in top.items())
    text = f"Top-2 Ships heads ablated — {counts} (of {ablated[0]['n']})."
    broken = top[paper_method]["degenerate"] >= top[paper_method]["n"] / 2
    still_refuse = all(top[m]["refused"] >= top[m]["n"] / 2 for m in others)
    random_refuse = all(r["refused"] >= r["n"] / 2 for r in randoms)
    if complied == 0 and broken and still_refuse and random_refuse:
        return (text + f" No ablated answer complied. Under {paper_method} the model stops producing language; zeroed or "
                "mean-ablated, the same two heads leave the refusals in place, as random pairs do. The Ships top heads are "
                f"heads the model cannot run without under {paper_method}, not heads that carry refusal: the drop in "
                "`is_refusal` above is broken text, not compliance.")
    return text + f" {complied} of {sum(r['n'] for r in ablated)} ablated answers complied."


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
