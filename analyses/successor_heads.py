"""Successor heads (Gould et al. 2023) on the embedded model: the succession score under every variant, and behaviour.

    .venv/bin/python analyses/successor_heads.py [--recompute]

Scores every head for succession (runs stored in cached_runs/ through `hl.score`) under each
effective-embedding variant, with and without the final norm and per-list centring; as a check
that the weight-reading pipeline sees real structure, it also counts how often each head's OV
circuit maps an item to *itself* (copying). Then the continuation task ("Monday, Tuesday,
Wednesday," -> " Thursday") intact, with the top succession heads ablated and with random heads
ablated (a stored `hl.ablation_curve`). Writes section "successor_heads" of analyses/README.md.
"""
from __future__ import annotations


import torch

import headlab as hl
import headlab.scorers.successor as succ
import headlab.tasks.successor  # noqa: F401  (registers the "successor" task)
from headlab.datasets import ordinals
from headlab.ablation import ablation_hooks
from headlab.heads import format_heads, head_label
from headlab.tasks import make_task
from report import Report, recompute_args  # analyses/report.py

TASK_N = 28  # 4 prompts per list: forward passes on a shared 2-core CPU are slow
KS = [1, 3, 8]
N_RANDOM = 3


def heads_text(top) -> str:
    return ", ".join(f"{head_label(l, h)} {v:.3f}" for l, h, v in top)


def main() -> None:
    args = recompute_args(__doc__)
    lab = hl.load("embedded")
    emit = Report("successor_heads")

    tasks, dropped = ordinals.ordinal_tasks(lab.tokenizer)
    chance = succ.chance_level(tasks)
    n_items = sum(t.n_scored for t in tasks)
    emit(f"## Successor heads — {lab.info.name}\n")
    emit("Succession score (Gould et al. 2023): item token → effective embedding → the head's OV circuit (its layer's "
         "ln1, its KV head's W_V, its own W_O) → final norm → W_U, argmax among the item's own list; a hit when it is "
         f"the successor. {n_items} scored items in {len(tasks)} lists; chance {chance:.3f}. Lists as the tokenizer "
         "keeps them (single tokens with a leading space):\n")
    emit("```\n" + ordinals.dropped_summary(dropped, tasks) + "\n```\n")

    emit("### Every variant: best heads\n")
    emit("With 270 heads at chance, the best one reaches about twice chance by luck alone "
         f"(binomial maximum over 270 heads of {n_items} items at p={chance:.3f}: ≈{chance + 3 * (chance * (1 - chance) / n_items) ** 0.5:.2f}).\n")
    emit("| effective embedding | final norm | centred | argmax over | top 3 heads | mean over heads | heads ≥ 0.5 |")
    emit("|---|---|---|---|---|---|---|")
    default = excluding = None
    variants = [(e, f, c, False) for e in succ.EMBEDDINGS for f in (True, False) for c in (False, True)]
    variants += [(e, True, False, True) for e in ("mlp0", "block0")]  # not the paper's: the item itself excluded
    for embedding, final_norm, center, exclude_self in variants:
        scores = hl.score(lab, "successor", embedding=embedding, final_norm=final_norm, center=center,
                          exclude_self=exclude_self, recompute=args.recompute)
        if scores.meta["variant"]["paper"]:
            default = scores
        if exclude_self and embedding == succ.PAPER_EMBEDDING:
            excluding = scores
        mark = " (paper, default)" if scores.meta["variant"]["paper"] else ""
        emit(f"| {embedding}{mark} | {'yes' if final_norm else 'no'} | {'yes' if center else 'no'} | "
             f"{'other items' if exclude_self else 'all items'} | {heads_text(scores.top(3))} | "
             f"{float(scores.values.mean()):.3f} | {int((scores.values >= 0.5).sum())} |")

    # The same pipeline, asked whether the head maps an item to itself: copying heads are common, so a
    # pipeline that reads the weights correctly must find them.
    parts = succ.model_parts(lab)
    copy_hits, total = 0.0, 0
    for task, logits in zip(tasks, succ.succession_logits(parts, tasks)):
        copy_hits = copy_hits + (logits.argmax(-1) == torch.arange(len(task.items))).float().sum(-1)
        total += len(task.items)
    copy = copy_hits / total
    top_copy = hl.HeadScores(kind="copy", model=lab.info.name, params={}, values=copy).top(5)
    n_copying = int((copy >= 0.5).sum())
    verdict = ("The same weight path finds strong copying heads, so the absence of successor heads is not a broken pipeline."
               if n_copying else "The weight path finds no strong copying head either: read the succession scores with that in mind.")
    emit(f"\nSanity check of the pipeline (paper variant): the fraction of items a head's OV circuit maps to **itself** "
         f"(copying) — best heads {heads_text(top_copy)}; {n_copying} heads copy at least half the items. {verdict}\n")

    emit(f"Excluding the item itself (not the paper's score; chance {excluding.meta['chance']:.3f}), the best heads rank the "
         f"successor first among the *other* items more often than the paper's score finds anywhere: {heads_text(excluding.top(3))}. "
         "How often these heads map an item to itself (copy rate, all items): "
         + ", ".join(f"{head_label(l, h)} {float(copy[l, h]):.3f}" for l, h, _ in excluding.top(3)) + ".\n")
    for label, scores in (("the paper's variant", default), ("the paper's variant, item itself excluded", excluding)):
        layer, head, best = scores.top(1)[0]
        emit(f"### Per-list accuracy of the best head of {label}, {head_label(layer, head)} ({best:.3f}), and each list's best head\n")
        emit(f"| list | items | chance | {head_label(layer, head)} | best head on this list |")
        emit("|---|---|---|---|---|")
        per_task = scores.raw["per_task"]
        for t, name in enumerate(scores.meta["tasks"]):
            grid = per_task[t].flatten()
            i = int(grid.argmax())
            emit(f"| {name} | {len(scores.meta['items'][name])} | {float(scores.raw['chance'][t]):.3f} | "
                 f"{float(per_task[t, layer, head]):.3f} | {head_label(*divmod(i, lab.info.n_heads))} {float(grid[i]):.3f} |")
        emit("")

    task = make_task("successor", lab, n=TASK_N)
    details = task.details()
    emit(f"\n### Behaviour: continuing an ordinal list (n={TASK_N} prompts like `{task.prompts[3]}`)\n")
    emit(f"Intact: accuracy among the list's items **{details['value']:.3f}** (chance {details['chance']:.3f}); "
         f"greedy top-1 over the whole vocabulary {details['top1_accuracy']:.3f}. Per list: "
         + ", ".join(f"{name} {acc:.2f}" for name, acc in details["per_task"].items()) + ".\n")
    for label, scores, ks in (("paper variant", default, KS), ("item itself excluded", excluding, KS[:2])):
        curve = hl.ablation_curve(lab, scores, task=task, ks=ks, method="mean", n_random=N_RANDOM, recompute=args.recompute)
        emit(f"Mean ablation of the top-k succession heads ({label}) vs {N_RANDOM} random k-head sets (intact {curve.baseline:.3f}):\n")
        emit("| k | top-k heads | top-k ablated | random-k (mean; min–max) |")
        emit("|---|---|---|---|")
        for i, k in enumerate(curve.ks):
            rand = curve.random[i]
            emit(f"| {k} | {format_heads(curve.top_heads[i])} | {curve.top[i]:.3f} | "
                 f"{sum(rand) / len(rand):.3f}; {min(rand):.3f}–{max(rand):.3f} |")
        emit("")
        if scores is default:  # which of the top heads carries the drop
            singles = [(l, h, task.evaluate(ablation_hooks(lab, [(l, h)], "mean", task))) for l, h in curve.top_heads[1]]
            emit("Each of the top-3 heads alone, mean-ablated: " + ", ".join(f"{head_label(l, h)} → {v:.3f}" for l, h, v in singles) + ".\n")
            l, h, v = min(singles, key=lambda item: item[2])
            emit(f"**Reading.** The drop at k=3 is one head's: {head_label(l, h)} alone takes accuracy from {curve.baseline:.3f} to {v:.3f}, "
                 f"while its succession score is {float(default.values[l, h]):.3f} (chance {default.meta['chance']:.3f}) and its "
                 f"OV circuit maps {float(copy[l, h]):.3f} of the items to themselves. It reaches the top of the succession ranking "
                 "by a tie at near-chance level, a coincidence rather than a finding of the score: the model needs {} to "
                 "continue ordinal lists, but not as a successor map from the token's effective embedding (whether it is "
                 "needed for text in general was not measured here). "
                 "No head of the embedded model is a successor head in the paper's sense under any variant tried.\n".format(head_label(l, h)))
    emit("_Made by `.venv/bin/python analyses/successor_heads.py`._")
    emit.write()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is several times faster
    main()
