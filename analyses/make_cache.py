"""Compute the runs the app shows first for the embedded model and write them to cached_runs/.

    make cache        # or: .venv/bin/python analyses/make_cache.py [--recompute]

Every score kind with its default parameters, the top-k vs random-k ablation curve of the
induction score with the curve defaults (`CurveConfig()`: the Ablate tab's first view), and the
retrieval curve of the default retrieval run (`RETRIEVAL_CURVE`: the Retrieval tab's) and its accuracy grid
(top-`ABLATE_K` heads ablated, `headlab.needle_grid`: the tab's "Accuracy intact vs ablated" with the defaults).
"""
from __future__ import annotations

import time

import headlab as hl
from headlab.heads import head_label
from headlab.needle_grid import needle_grid  # the Retrieval tab's accuracy grid, stored
from headlab.ablation.methods import DEFAULT_METHOD
from headlab.scorers.retrieval import ABLATE_K, retrieval_curve
from report import recompute_args  # analyses/report.py

CURVE_KIND = "induction"  # the score kind the app opens on


def main() -> None:
    args = recompute_args(__doc__)
    lab = hl.load("embedded")
    for kind in hl.kinds():
        started = time.perf_counter()
        scores = hl.score(lab, kind, recompute=args.recompute)
        top = ", ".join(f"{head_label(l, h)}={v:.2f}" for l, h, v in scores.top(5))
        print(f"{kind:<16} {time.perf_counter() - started:6.1f}s  top: {top}")
    for name, make_curve in [
        ("ablation curve", lambda: hl.ablation_curve(lab, hl.score(lab, CURVE_KIND), recompute=args.recompute)),
        ("retrieval curve", lambda: retrieval_curve(lab, hl.score(lab, "retrieval"), recompute=args.recompute)),
        ("retrieval grid", lambda: needle_grid(lab, hl.score(lab, "retrieval"), ABLATE_K, DEFAULT_METHOD, args.recompute)[0]),
    ]:
        started = time.perf_counter()
        curve = make_curve()
        print(f"{name:<16} {time.perf_counter() - started:6.1f}s")
        print(curve.to_frame().to_string(index=False))


if __name__ == "__main__":
    main()
