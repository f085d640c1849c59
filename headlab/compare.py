"""`compare_masks`: every way of choosing full KV heads, at exactly the same budget, on a RULER-style suite,
through the compressed-KV runtime.

    cmp = hl.compare_masks(lab, sources=["retrieval", "attention_area", "random"], budgets=[0.25, 0.5, 0.75],
                           lengths=[2048], n=10)
    cmp.to_frame(); cmp.summary(); cmp.winners(); cmp.figure(); cmp.best_mask(0.5).save("mask.json")

For each source (`headlab.masks.mask_sources()`) and budget, `make_mask(lab, source, full_fraction=budget)`
builds a `HeadMask`; every source must keep exactly `round(budget * n_layers * n_kv_heads)` KV heads full
(checked: a comparison at unequal budgets is refused). Seeded sources (`random`) give one mask per seed of
`seeds`, shown as a band. The full cache and all-streaming are the two reference points. Each mask runs
in `CompressedLM`: greedy answers to the suite (`headlab.datasets.ruler`, scored by RULER's
`string_match_all`), the KL of the next-token distribution from the full cache's on prose
(`runtime.quality.next_token_kl`), and the KV bytes the runtime really holds after prefilling `length`
tokens of prose (`CompressedLM.kv_bytes()`, measured, never computed from the mask).

Quality per cell is the mean of per-sample scores with its standard error and a 95% Wilson interval
(exact for 0/1 scores; for multi-answer tasks, whose scores are fractions, an approximation).

Stored like every other run (`headlab.store`): each mask's evaluation under a key of the mask's content,
window, suite and runtime (so the full cache and a mask shared by two comparisons are run once, and a
comparison cut short keeps what it finished), and the comparison under a key of every parameter.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from headlab import store, validate
from headlab.datasets import domains, ruler
from headlab.lab import Lab
from headlab.masks import HeadMask, MaskConfig, make_mask, mask_sources
from headlab.runtime.model import CompressedLM
from headlab.runtime.quality import next_token_kl

FORMAT = "headlab.compare_masks/v1"
EVAL_FORMAT = "headlab.mask_eval/v1"
KL_TASK = "prose_kl"  # the KL of the next-token distribution from the full cache's, on prose
FULL_CACHE = "full cache"
ALL_STREAMING = "all_streaming"
SEEDED_SOURCES = ("random",)  # one mask per seed of `seeds`: a band
NOT_BY_DEFAULT = ("score", "duo_file", ALL_STREAMING)  # generic, needs a file, or always there as a reference
Z95 = 1.959964
Progress = Callable[[float, str], None]


def default_sources() -> tuple[str, ...]:
    """Every registered mask source that needs no extra input (`duo_file` needs a file; `score` a kind)."""
    return tuple(s for s in mask_sources() if s not in NOT_BY_DEFAULT)


@dataclass(frozen=True)
class CompareConfig:
    """What `compare_masks` runs: the defaults the library, the CLI, the app and the analyses read.

    `sources`: mask sources (None = `default_sources()`); `budgets`: shares of KV heads kept full; `lengths`:
    context lengths in tokens (prompt + answer); `tasks`: suite tasks (`ruler.TASKS`) and/or `"prose_kl"`;
    `n`: samples per (task, length) cell; `seeds`: the masks of a seeded source (`random`); `seed`: the suite's
    samples; `haystack`: the needles' haystack (`needles.haystack_text`); `kl_samples`: prose windows for the KL;
    `sink`, `recent`: what a streaming head keeps (`MaskConfig`'s defaults).
    """

    sources: tuple[str, ...] | None = None
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)
    lengths: tuple[int, ...] = (2048,)
    tasks: tuple[str, ...] = (*ruler.TASKS, KL_TASK)
    n: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0
    haystack: str = "prose"
    kl_samples: int = 2
    sink: int = MaskConfig.sink
    recent: int = MaskConfig.recent

    def __post_init__(self) -> None:
        known = mask_sources()
        for name in self.sources or ():
            if name not in known:
                raise ValueError(f"Unknown mask source {name!r}: sources are {', '.join(known)}.")
        if self.sources is not None and not self.sources:
            raise ValueError("sources is empty: name at least one mask source, e.g. retrieval,random.")
        if not self.budgets or any(not 0.0 < float(b) < 1.0 for b in self.budgets):
            raise ValueError(f"budgets must be shares of KV heads strictly between 0 and 1, e.g. 0.25,0.5,0.75; got {list(self.budgets)}.")
        if not self.lengths:
            raise ValueError("lengths is empty: give context lengths, e.g. 1024,2048.")
        for length in self.lengths:
            validate.whole(length, "lengths (tokens)", minimum=64)
        unknown = [t for t in self.tasks if t not in (*ruler.TASKS, KL_TASK)]
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be from {', '.join((*ruler.TASKS, KL_TASK))}; got {list(self.tasks)}.")
        validate.count(self.n, "n (samples per task and length)")
        validate.count(self.kl_samples, "kl_samples")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed for the seeded sources (random).")
        validate.window(self.sink, self.recent)

    def resolved(self) -> "CompareConfig":
        """This config with `sources` filled in and every list a sorted tuple of plain numbers."""
        return dataclasses.replace(
            self, sources=tuple(self.sources or default_sources()), budgets=tuple(sorted(float(b) for b in self.budgets)),
            lengths=tuple(sorted(int(x) for x in self.lengths)), seeds=tuple(int(s) for s in self.seeds))

    def params(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def suite(self) -> dict:
        """What a mask's evaluation depends on besides the mask (its store key)."""
        return {k: self.params()[k] for k in ("lengths", "tasks", "n", "seed", "haystack", "kl_samples")}


DEFAULTS = CompareConfig()


# --- statistics ---------------------------------------------------------------------------------------

def wilson(mean: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `mean` over `n` samples."""
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def cell_stats(scores: list[float]) -> dict:
    """`accuracy` (mean), `stderr`, 95% Wilson `ci_low`/`ci_high` and `n` of per-sample scores in [0, 1]."""
    n = len(scores)
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    low, high = wilson(mean, n)
    return {"accuracy": mean, "stderr": math.sqrt(var / n), "ci_low": low, "ci_high": high, "n": n}


# --- one mask through the runtime ---------------------------------------------------------------------

def mask_key(mask: HeadMask) -> str:
    """A short hash of what the runtime does with `mask`: its full/streaming layout and window."""
    blob = f"{mask.n_layers}x{mask.n_kv_heads}:{mask.full.int().flatten().tolist()}:{mask.sink}:{mask.recent}"
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


@torch.no_grad()
def prefill_kv_bytes(rt: CompressedLM, tokens: torch.Tensor) -> int:
    """The bytes the runtime's cache holds right after prefilling `tokens` `[1, pos]` (then the cache is dropped)."""
    rt.reset()
    rt.forward(tokens, all_logits=False)
    held = rt.kv_bytes()
    rt.reset()
    return held


@torch.no_grad()
def suite_scores(lab: Lab, rt: CompressedLM, samples: list[ruler.RulerSample]) -> tuple[list[float], list[str]]:
    """Greedy answers of `rt` to `samples`: each sample's RULER score and the decoded prediction."""
    scores, predictions = [], []
    for sample in samples:
        new = rt.generate(sample.tokens, max_new_tokens=sample.max_new_tokens)
        text = lab.tokenizer.decode(new[0].tolist(), skip_special_tokens=True)
        scores.append(sample.score(text))
        predictions.append(text)
    return scores, predictions


@dataclass
class MaskEval:
    """One mask's results on a suite: per `"task@length"` the sample scores and predictions, per length the KL
    on prose and the KV bytes held after prefill."""

    mask_key: str
    scores: dict[str, list[float]]
    predictions: dict[str, list[str]]
    kl: dict[str, float]
    kv_bytes: dict[str, int]
    seconds: float

    def save(self, path: Path) -> Path:
        store.write_json(path, {"format": EVAL_FORMAT, "record": "mask_eval", "kind": "mask_eval",
                                "params": {"mask": self.mask_key}, "eval": dataclasses.asdict(self)})
        return path

    @classmethod
    def load(cls, path: Path) -> "MaskEval":
        return cls(**store.read_record(path, EVAL_FORMAT, "mask-evaluation")["eval"])


@dataclass
class Suite:
    """The prompts every mask answers: samples per `"task@length"`, prose `[kl_samples, length]` per length, and
    the full cache's logits on that prose (the KL's reference)."""

    samples: dict[str, list[ruler.RulerSample]]
    prose: dict[int, torch.Tensor]
    full_logits: dict[int, torch.Tensor] = field(default_factory=dict)


def build_suite(lab: Lab, config: CompareConfig, runtime: dict) -> Suite:
    samples = {f"{task}@{length}": ruler.make_samples(lab, task, length, config.n, config.seed, config.haystack)
               for task in config.tasks if task != KL_TASK for length in config.lengths}
    prose = {length: domains.domain_tokens(lab, "prose", config.kl_samples, length, config.seed).to(lab.device)
             for length in config.lengths}
    suite = Suite(samples, prose)
    if KL_TASK in config.tasks:
        full = CompressedLM(lab, HeadMask.all_full(lab.info, config.sink, config.recent), **runtime)
        suite.full_logits = {length: full.logits(tokens) for length, tokens in prose.items()}
        full.reset()
    return suite


def evaluate_mask(lab: Lab, mask: HeadMask, suite: Suite, runtime: dict, progress: Callable[[str], None] | None = None) -> MaskEval:
    """`mask` through `CompressedLM`: the suite's scores, the KL on prose and the KV bytes held after prefill."""
    started = time.perf_counter()
    rt = CompressedLM(lab, mask, **runtime)
    longest = max((s.tokens.shape[1] + s.max_new_tokens for cell in suite.samples.values() for s in cell), default=0)
    if longest:  # one cache, and one captured decode graph, for every answer
        rt.reserve(1, longest)
    scores, predictions = {}, {}
    for cell, samples in suite.samples.items():
        if progress:
            progress(cell)
        scores[cell], predictions[cell] = suite_scores(lab, rt, samples)
    kv_bytes = {str(length): prefill_kv_bytes(rt, tokens[:1]) for length, tokens in suite.prose.items()}
    kl = {str(length): 0.0 if mask.full.all() else next_token_kl(lab, mask, suite.prose[length], logits, **runtime)
          for length, logits in suite.full_logits.items()}
    return MaskEval(mask_key(mask), scores, predictions, kl, kv_bytes, round(time.perf_counter() - started, 2))


def evaluation_path(lab: Lab, mask: HeadMask, config: CompareConfig, where: dict) -> Path:
    """Where the evaluation of `mask` on `config`'s suite under the runtime key `where` (`runtime_key`) is stored."""
    return store.run_path(lab.info.slug, "mask-eval", {"mask": mask_key(mask), "suite": config.suite(), "runtime": where})


def stored_evaluation(lab: Lab, mask: HeadMask, config: CompareConfig, runtime: dict, suite: Callable[[], Suite],
                      progress: Callable[[str], None] | None = None, recompute: bool = False) -> MaskEval:
    """`evaluate_mask`, read from the store when this mask ran on this suite with this runtime before."""
    path = evaluation_path(lab, mask, config, runtime_key(lab, runtime))
    return store.cached_run(path, MaskEval.load, lambda: evaluate_mask(lab, mask, suite(), runtime, progress), recompute=recompute)


def runtime_key(lab: Lab, runtime: dict) -> dict:
    """Where and how the runtime ran (device type, dtype, attention path, chunking): part of every stored key."""
    device = next(lab.hf_model.parameters()).device.type
    return {"device": device, "dtype": str(lab.dtype).replace("torch.", ""), **{k: runtime[k] for k in sorted(runtime)}}


# --- the masks of a comparison --------------------------------------------------------------------------

@dataclass
class Entry:
    """One mask of a comparison: its source, seed (seeded sources only), budget, and the seconds its source
    spent scoring or training (`mask.source["seconds"]` when the source records it, else the wall time)."""

    source: str
    seed: int | None
    budget: float
    mask: HeadMask
    time_s: float


def n_full_at(budget: float, info) -> int:
    """The number of full KV heads a budget means: `round(budget * n_layers * n_kv_heads)`, for every source."""
    return int(round(budget * info.n_layers * info.n_kv_heads))


def _timed_mask(lab: Lab, source: str, **params) -> tuple[HeadMask, float]:
    started = time.perf_counter()
    mask = make_mask(lab, source, **params)
    seconds = mask.source.get("seconds")
    return mask, float(seconds) if seconds is not None else round(time.perf_counter() - started, 2)


def comparison_masks(lab: Lab, config: CompareConfig, source_params: dict | None = None) -> list[Entry]:
    """The full cache, all-streaming, then every source at every budget (each seed of a seeded source), each
    checked to keep exactly `n_full_at(budget)` KV heads full."""
    window = {"sink": config.sink, "recent": config.recent}
    streaming, seconds = _timed_mask(lab, ALL_STREAMING, **window)
    entries = [Entry(FULL_CACHE, None, 1.0, HeadMask.all_full(lab.info, **window), 0.0),
               Entry(ALL_STREAMING, None, 0.0, streaming, seconds)]
    for source in config.sources:
        for budget in config.budgets:
            for seed in config.seeds if source in SEEDED_SOURCES else (None,):
                extra = {"seed": seed} if seed is not None else {}
                mask, seconds = _timed_mask(lab, source, full_fraction=budget, **window, **extra,
                                            **(source_params or {}).get(source, {}))
                if mask.n_full != n_full_at(budget, lab.info):
                    raise AssertionError(f"Mask source {source!r} kept {mask.n_full} KV heads full at budget {budget}; "
                                         f"the comparison needs exactly {n_full_at(budget, lab.info)} for every source.")
                entries.append(Entry(source, seed, budget, mask, seconds))
    return entries


def entry_rows(entry: Entry, result: MaskEval, kl_samples: int) -> list[dict]:
    """The table rows of one mask: one per (task, length) cell, and one per length for the KL on prose."""
    base = {"source": entry.source, "seed": entry.seed, "budget": entry.budget, "n_full_kv_heads": entry.mask.n_full,
            "time_s": entry.time_s}
    rows = []
    for cell, scores in result.scores.items():
        task, length = cell.rsplit("@", 1)
        rows.append({**base, "kv_bytes": result.kv_bytes[length], "task": task, "length": int(length),
                     **cell_stats(scores), "kl_vs_full": None})
    for length, kl in result.kl.items():
        rows.append({**base, "kv_bytes": result.kv_bytes[length], "task": KL_TASK, "length": int(length), "accuracy": None,
                     "stderr": None, "ci_low": None, "ci_high": None, "n": kl_samples,
                     "kl_vs_full": kl})
    return rows


def compare_masks(
    lab: Lab, sources=None, budgets=DEFAULTS.budgets, lengths=DEFAULTS.lengths, tasks=DEFAULTS.tasks, n: int = DEFAULTS.n,
    seeds=DEFAULTS.seeds, *, seed: int = DEFAULTS.seed, haystack: str = DEFAULTS.haystack, kl_samples: int = DEFAULTS.kl_samples,
    sink: int = DEFAULTS.sink, recent: int = DEFAULTS.recent, source_params: dict | None = None, runtime: dict | None = None,
    recompute: bool = False, save: bool = True, progress: Progress | None = None,
):
    """Every mask source at every budget, on the same suite, through `CompressedLM`; a `MaskComparison`.

    `sources` default to `default_sources()`; `source_params` gives a source its own parameters
    (`{"duo_file": {"path": "mask_dir/"}}`); `runtime` goes to `CompressedLM` (e.g. `{"attention": "sdpa",
    "chunk_size": 1024}`). Read from the store when this exact comparison ran before.
    """
    from headlab.comparison import MaskComparison

    config = CompareConfig(sources=tuple(sources) if sources is not None else None, budgets=tuple(budgets),
                           lengths=tuple(lengths), tasks=tuple(tasks), n=n, seeds=tuple(seeds), seed=seed, haystack=haystack,
                           kl_samples=kl_samples, sink=sink, recent=recent).resolved()
    validate.contexts(config.lengths, lab.info, "lengths")
    runtime = dict(runtime or {})
    key = {"config": config.params(), "source_params": source_params or {}, "runtime": runtime_key(lab, runtime)}
    path = store.run_path(lab.info.slug, "compare-masks", key)
    return store.cached_run(path, MaskComparison.load,
                            lambda: _run(lab, config, source_params, runtime, recompute, progress), recompute=recompute, save=save)


def _run(lab: Lab, config: CompareConfig, source_params: dict | None, runtime: dict, recompute: bool, progress: Progress | None):
    report = progress or (lambda fraction, message: None)
    report(0.0, "building the masks")
    entries = comparison_masks(lab, config, source_params)
    built: list[Suite] = []

    def suite() -> Suite:  # built once, only when some mask's evaluation is not stored
        if not built:
            built.append(build_suite(lab, config, runtime))
        return built[0]

    results = []
    for i, entry in enumerate(entries):
        results.append(stored_evaluation(lab, entry.mask, config, runtime, suite, recompute=recompute,
                                         progress=lambda cell: report(i / len(entries), f"{entry_label(entry)}: {cell}")))
    report(1.0, "done")
    return _comparison(lab, config, source_params, entries, results, runtime_key(lab, runtime))


def entry_label(entry: Entry) -> str:
    return entry.source + (f" seed {entry.seed}" if entry.seed is not None else "") + f" at {entry.budget:.0%}"


def _comparison(lab: Lab, config: CompareConfig, source_params: dict | None, entries: list[Entry], results: list[MaskEval],
                where: dict):
    from headlab.comparison import MaskComparison

    rows = [row for entry, result in zip(entries, results) for row in entry_rows(entry, result, config.kl_samples)]
    masks = [{"source": e.source, "seed": e.seed, "budget": e.budget, "time_s": e.time_s, "mask": e.mask.to_record()}
             for e in entries]
    return MaskComparison(model=lab.info.name, config=config.params(), source_params=source_params or {}, rows=rows,
                          masks=masks, runtime=where)


def assemble_stored(lab: Lab, config: CompareConfig, where: dict, source_params: dict | None = None):
    """The comparison of `config` put together from mask evaluations stored earlier under the runtime key `where`
    (a `runtime_key` dict, e.g. `{"device": "cuda", "dtype": "float32", "attention": "sdpa", "chunk_size": 2048}`:
    a run on a GPU, cut short, whose runs folder was copied here), evaluating nothing. The masks are built here
    (stored sources, such as duo's trained gates, are read) and each evaluation is looked up by its key, so a mask
    that differs from the one evaluated is not found. Returns (the `MaskComparison` of the masks found, the labels
    of the masks with no stored evaluation)."""
    config = config.resolved()
    found, missing = [], []
    for entry in comparison_masks(lab, config, source_params):
        result = store.stored_run(evaluation_path(lab, entry.mask, config, where), MaskEval.load)
        if result is None:
            missing.append(entry_label(entry))
        else:
            found.append((entry, result))
    entries, results = [e for e, _ in found], [r for _, r in found]
    return _comparison(lab, config, source_params, entries, results, where), missing
