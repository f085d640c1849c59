"""Retrieval heads of the embedded model: scores, the model's accuracy, stability, and the causal gap.

    .venv/bin/python analyses/retrieval_heads.py [--recompute]

Scores retrieval heads for the fact needle in filler and in prose and for the pass key in filler
(runs stored in cached_runs/ via `hl.score`), compares the top-k sets across haystacks and lengths,
and ablates the top-k heads against random k-head sets on the `needle` task. Prints markdown.
"""
from __future__ import annotations


import headlab as hl
from headlab.heads import format_heads, head_label
from headlab.scorers import scorer_fields
from headlab.scorers.retrieval import RETRIEVAL_CURVE, RETRIEVAL_THRESHOLD, retrieval_curve, topk_jaccard
from report import recompute_args, write_section  # analyses/report.py

DEFAULTS = scorer_fields("retrieval")
RUNS = [("fact", "filler"), ("fact", "prose"), ("passkey", "filler")]
TOP_K = 10
PREV_TOKEN_HEAD = (16, 0)


def runs_table(runs: dict[tuple[str, str], hl.HeadScores]) -> list[str]:
    """One markdown row per (needle, haystack) run: prompts, accuracy, retrieval heads, stability, top heads."""
    lengths = " vs ".join(map(str, DEFAULTS["lengths"]))
    lines = [f"| needle | haystack | prompts | model accuracy | heads > {RETRIEVAL_THRESHOLD} | "
             f"top-{DEFAULTS['stability_k']} Jaccard {lengths} | top 5 heads |", "|---|---|---|---|---|---|---|"]
    for (needle, haystack), scores in runs.items():
        meta = scores.meta
        top = ", ".join(f"{head_label(l, h)} {v:.2f}" for l, h, v in scores.top(5))
        stability = ", ".join(str(v) for v in meta["stability_across_lengths"].values())
        lines.append(f"| {needle} | {haystack} | {meta['n_samples']} | {meta['accuracy']:.2f} | "
                     f"{meta['fraction_above_threshold']:.3f} | {stability} | {top} |")
    return lines


def curve_table(curve: hl.AblationCurve) -> list[str]:
    """The needle curve as markdown: per k the top-k accuracy, each random set's (marked when it holds L16H0)."""
    prompts = len(DEFAULTS["depths"]) * RETRIEVAL_CURVE.n
    lines = [f"### Needle accuracy, top-k retrieval heads vs random k heads {curve.method}-ablated "
             f"({prompts} prompts of {min(DEFAULTS['lengths'])} tokens)\n",
             f"| k | top-k | random-k (each set; * = the set holds the previous-token head {head_label(*PREV_TOKEN_HEAD)}) | top-k heads |",
             "|---|---|---|---|"]
    for k, top, rand, rand_heads, heads in zip(curve.ks, curve.top, curve.random, curve.random_heads, curve.top_heads):
        cells = ", ".join(f"{r:.2f}{'*' if PREV_TOKEN_HEAD in hs else ''}" for r, hs in zip(rand, rand_heads))
        lines.append(f"| {k} | {top:.2f} | {cells} | {format_heads(heads)} |")
    return lines + [f"\nintact accuracy: {curve.baseline:.2f}"]


def main() -> None:
    args = recompute_args(__doc__)
    lab = hl.load("embedded")
    runs = {(needle, haystack): hl.score(lab, "retrieval", needle=needle, haystack=haystack, recompute=args.recompute)
            for needle, haystack in RUNS}
    a, b, c = (runs[run].values for run in RUNS)
    # The Retrieval tab's curve at its defaults, so the tab reads this run from the store.
    curve = retrieval_curve(lab, runs[RUNS[0]], recompute=args.recompute)
    markdown = "\n".join([
        f"## Retrieval heads — {lab.info.name} (lengths {list(DEFAULTS['lengths'])}, depths {'/'.join(map(str, DEFAULTS['depths']))})\n",
        *runs_table(runs),
        f"\nTop-{TOP_K} Jaccard, fact needle, filler vs prose haystack: {topk_jaccard(a, b, TOP_K):.3f}",
        f"Top-{TOP_K} Jaccard, filler haystack, fact vs passkey needle: {topk_jaccard(a, c, TOP_K):.3f}\n",
        *curve_table(curve),
        "\n_Made by `.venv/bin/python analyses/retrieval_heads.py`._",
    ])
    print(markdown, flush=True)
    write_section("retrieval_heads", markdown)


if __name__ == "__main__":
    main()
