"""Safety heads (Zhou et al. 2024, "On the Role of Attention Heads in LLM Safety"): Ships and Sahara.

Ships of head h on a harmful request q is KL(p_intact || p_ablated) of the next-token
distribution at the start of the assistant's turn (the chat template with the generation prompt,
i.e. right where a refusal would begin), with h ablated. The default ablation is the paper's:
`scaled_query` with epsilon 1e-3 (the head's query scaled by epsilon, so its attention becomes
nearly uniform — "undifferentiated"); `zero` ablation of the head's output is the other option.
The score is the mean over requests; `raw["per_request"]` keeps every request's values. Requests
of different token lengths are scanned in same-length groups (`headlab.scan.ablation_scan` takes
no padding) and the per-request values are pooled.

Sahara (`sahara()`) grows a group of heads greedily: each step adds the candidate whose joint
ablation with the group moves the model furthest, measured by `objective`:
- "kl": mean KL(intact || group ablated) of the next-token distribution (as Ships), or
- "refusal_prob": mean drop of the probability of the intact model's own first answer token (on a
  refusal-tuned model, the first token of its refusal, e.g. "I").
Candidates are the `pool` best Ships heads (default 27, a tenth of the embedded model's heads), so a
step costs `pool` ablated passes, batched as in the scan.

Needs a model that refuses: the embedded model does not; load "embedded-refusal".
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from headlab import scan, store
from headlab.ablation.curve import AblationCurve, CurveConfig, ablation_curve
from headlab.ablation.engine import ablation_hooks, method_state
from headlab.ablation.methods import AblationMethod, ScaledQuery, by_layer, make_method, method_fields
from headlab.activations import kl_divergence
from headlab.datasets import requests
from headlab.heads import Head, all_heads, format_heads, head_label
from headlab.lab import Lab
from headlab.longpass import eager_pass_bytes
from headlab.scorers import Scorer, make_scorer
from headlab.scores import HeadScores

SAHARA_OBJECTIVES = ("kl", "refusal_prob")
SHIPS_METHODS = ("scaled_query", "zero")  # the paper's ablation, and zeroing the head's output


def chat_ids(lab: Lab, request: str) -> list[int]:
    """Token ids of `request` in the chat template, ending with the assistant-turn start (BOS once)."""
    ids = list(lab.tokenizer(lab.chat(request), add_special_tokens=False)["input_ids"])
    bos = lab.bos_token_id
    if bos is not None and not (ids and ids[0] == bos):
        ids = [bos] + ids
    lab.check_length(len(ids), "request")
    return ids


def length_groups(lab: Lab, prompts: list[str]) -> list[tuple[list[int], torch.Tensor]]:
    """The requests grouped by token length: `[(indices into prompts, tokens [group, pos])]`."""
    groups: dict[int, list[tuple[int, list[int]]]] = {}
    for i, prompt in enumerate(prompts):
        ids = chat_ids(lab, prompt)
        groups.setdefault(len(ids), []).append((i, ids))
    return [([i for i, _ in rows], torch.tensor([ids for _, ids in rows])) for _, rows in sorted(groups.items())]


def choose_requests(prompts, n: int | None, seed: int, split: str) -> list[str]:
    """The harmful requests to score: `prompts` (list or file) or the built-in `split`; `n` of them, seeded."""
    pool = requests.resolve_prompts(prompts, requests.harmful(split), label="harmful")
    if n is not None and n < len(pool):
        if n < 1:
            raise ValueError(f"n must be at least 1 request; got {n}.")
        pool = random.Random(seed).sample(pool, n)
    return pool


@torch.no_grad()
def intact_last_logits(lab: Lab, tokens: torch.Tensor) -> torch.Tensor:
    """`[batch, d_vocab]` next-token logits at the last position, no hooks."""
    return lab.model(tokens.to(lab.device), return_type="logits")[:, -1].float()


@torch.no_grad()
def ships_per_request(
    lab: Lab, prompts: list[str], method: AblationMethod, *, heads: list[Head] | None = None, chunk: int | None = None,
    progress=None,
) -> torch.Tensor:
    """`[n_requests, n_layers, n_heads]`: Ships of each head on each request with `method` (NaN for heads not scanned)."""
    info = lab.info
    heads = heads if heads is not None else all_heads(info)
    out = torch.full((len(prompts), info.n_layers, info.n_heads), float("nan"))
    groups = length_groups(lab, prompts)
    for g, (index, tokens) in enumerate(groups):
        intact = torch.log_softmax(intact_last_logits(lab, tokens), dim=-1)
        blocks: list[torch.Tensor] = []

        def measure(logits: torch.Tensor) -> torch.Tensor:  # [k, batch, pos, V] -> [k], keeping [k, batch]
            kl = kl_divergence(intact, logits[:, :, -1]).cpu()
            blocks.append(kl)
            return kl.mean(-1)

        def group_progress(fraction: float, message: str, g=g) -> None:
            if progress is not None:
                progress((g + fraction) / len(groups), f"length group {g + 1}/{len(groups)}: {message}")

        scan.ablation_scan(lab, tokens, measure, method=method, heads=heads, chunk=chunk, positions="last",
                           progress=group_progress)
        per_head = torch.cat(blocks)  # [n_heads scanned, batch] in `heads` order
        for (layer, head), values in zip(heads, per_head):
            out[index, layer, head] = values
    return out


@dataclass(frozen=True)
class Safety(Scorer):
    """Ships of every head, averaged over `n` harmful requests (built-in `split`, or `prompts`: a list or a CSV/JSONL path).

    The default requests are the harmful *training* requests, so ablation experiments on the held-out
    ones (task "refusal") never select heads on the requests they are measured on. `method` is any
    ablation method; `epsilon` is passed to the methods that take one (the paper's `scaled_query`).

    Cost: one intact pass plus one ablated pass per head for each request (batched by the scan, the
    intact prefix shared): time grows with n x heads x model size x request length (about 60 tokens); memory
    is the scan's per-pass budget (`scan.PASS_BUDGET_BYTES`, 512 MiB of logits and scores) plus the intact pass
    of the longest request group (`longpass.eager_pass_bytes`). Refused up front when that would not fit.
    """

    kind = "safety"
    n: int | None = 8
    seed: int = 0
    prompts: list[str] | str | None = None
    split: str = "train"
    method: str = "scaled_query"
    epsilon: float = ScaledQuery.epsilon

    def __post_init__(self):
        self.ablation()  # an unknown method or a bad epsilon fails here, before any work
        if self.n is not None and int(self.n) < 1:
            raise ValueError(f"n must be at least 1 request; got {self.n}.")

    def ablation(self) -> AblationMethod:
        """The ablation method object: `method`, given `epsilon` where it takes one."""
        return make_method(self.method, **{k: v for k, v in {"epsilon": self.epsilon}.items() if k in method_fields(self.method)})

    def compute(self, lab: Lab) -> HeadScores:
        chosen = choose_requests(self.prompts, self.n, self.seed, self.split)
        method = self.ablation()
        groups = length_groups(lab, chosen)
        widest = max(groups, key=lambda group: group[1].numel())[1]  # [batch, pos] tokens of the largest group
        lab.require_memory(scan.PASS_BUDGET_BYTES + eager_pass_bytes(lab, widest.shape[1], widest.shape[0]), "safety",
                           "use fewer or shorter requests (n, prompts)")
        per_request = ships_per_request(lab, chosen, method)
        first_tokens = []
        for index, tokens in length_groups(lab, chosen):
            top = intact_last_logits(lab, tokens).argmax(-1).tolist()
            first_tokens += list(zip(index, [lab.tokenizer.decode([t]) for t in top]))
        params = ", ".join(f"{k} {v}" for k, v in method.params().items())
        return self.result(lab, per_request.mean(0), {"per_request": per_request}, meta={
            "metric": "Ships: KL(intact || head ablated) of the next-token distribution at the assistant-turn start, "
                      f"mean over harmful requests ({method.name}" + (f", {params}" if params else "") + ")",
            "n_requests": len(chosen),
            "requests": chosen,
            "intact_first_tokens": [t for _, t in sorted(first_tokens)],
        })


# --- Sahara ------------------------------------------------------------------------------------


SAHARA_FORMAT = "headlab.sahara/v1"


@dataclass(frozen=True)
class Sahara(Safety):
    """A Sahara search: the Ships requests and ablation (inherited from `Safety`) plus the search's own settings.

    Fields: `k` heads to add; candidates = the `pool` best Ships heads (None: every head — 270 ablated
    passes per step); `objective` "kl" (KL from the intact next-token distribution) or "refusal_prob"
    (drop of the probability of the intact model's first answer token).

    Cost: k steps of one ablated pass per candidate and request, batched: time grows with k x pool x n.
    """

    kind = ""  # not a head score: `sahara()` runs it
    k: int = 4
    pool: int | None = 27
    objective: str = "kl"

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in SAHARA_OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(SAHARA_OBJECTIVES)}; got {self.objective!r}.")
        if int(self.k) < 1:
            raise ValueError(f"k must be at least 1 head; got {self.k}.")

    def ships(self) -> Safety:
        """The Ships scorer on the same requests and ablation, which ranks the candidates."""
        return Safety(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Safety)})


@dataclass
class SaharaResult:
    """The greedily grown head group and the objective after each addition (`curve[i]` = with `heads[:i+1]`)."""

    model: str
    heads: list[Head]
    curve: list[float]
    objective: str
    method: str
    epsilon: float
    candidates: list[Head]
    n_requests: int
    params: dict = field(default_factory=dict)  # the `Sahara` config and the Ships run it ranked candidates by
    seconds: float = 0.0  # how long the search took when it was computed

    def to_dict(self) -> dict:
        return asdict(self)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"step": range(1, len(self.heads) + 1), "added": [head_label(*h) for h in self.heads],
                             self.objective: self.curve})

    def save(self, path: Path) -> Path:
        store.write_json(path, {"format": SAHARA_FORMAT, "record": "sahara", "kind": "sahara", "params": self.params,
                                "result": self.to_dict()})
        return path

    @classmethod
    def load(cls, path: Path) -> "SaharaResult":
        result = store.read_record(path, SAHARA_FORMAT, "Sahara")["result"]
        result["heads"] = [tuple(h) for h in result["heads"]]
        result["candidates"] = [tuple(h) for h in result["candidates"]]
        return cls(**result)


def _objective_fn(objective: str, intact_logits: torch.Tensor):
    """`[k, batch, V]` last-position logits -> `[k, batch]` objective values (higher = moved further)."""
    intact_logp = torch.log_softmax(intact_logits, dim=-1)
    if objective == "kl":
        return lambda logits: kl_divergence(intact_logp, logits)
    first = intact_logits.argmax(-1)  # [batch]: the intact model's own first answer token
    p_intact = intact_logp.exp().gather(-1, first[:, None])[:, 0]

    def drop(logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=-1)
        return p_intact - p[..., torch.arange(len(first)), first]

    return drop


@torch.no_grad()
def _group_values(lab: Lab, groups, group_heads: list[Head], candidates: list[Head], method: AblationMethod,
                  objective: str, intact: list[torch.Tensor], chunk: int | None) -> torch.Tensor:
    """`[len(candidates)]`: the objective (mean over requests) with `group_heads` + each candidate ablated."""
    total = torch.zeros(len(candidates))
    count = 0
    for (index, tokens), intact_logits in zip(groups, intact):
        fn = _objective_fn(objective, intact_logits)
        tokens = tokens.to(lab.device)
        batch = tokens.shape[0]
        size = scan.heads_per_pass(lab, tokens, chunk)
        for start in range(0, len(candidates), size):
            part = candidates[start:start + size]
            targets = scan.block_targets(part, batch)  # the group in every row, one candidate per block
            for layer, heads in by_layer(group_heads).items():
                targets.setdefault(layer, []).insert(0, (slice(None), heads))
            with lab.model.hooks(fwd_hooks=method.hooks(lab, targets, method_state(lab, method, tokens))):
                logits = lab.model(tokens.repeat(len(part), 1), return_type="logits")[:, -1]
            values = fn(logits.view(len(part), batch, -1).float())  # [k, batch]
            total[start:start + len(part)] += values.sum(-1).cpu()
        count += batch
    return total / count


def sahara(lab: Lab, *, scores: HeadScores | None = None, chunk: int | None = None, recompute: bool = False,
           save: bool = True, progress=None, **params) -> SaharaResult:
    """Greedy search for the `k` heads whose joint ablation moves the model furthest on harmful requests.

    `params`: the `Sahara` fields (k, pool, objective, and the Ships requests and ablation). `scores`: Ships
    scores ranking the candidates (default: `hl.score(lab, "safety", ...)` on the same requests and ablation).
    Read from the store when this search (and the Ships run behind it) was run before, unless `recompute`.
    Returns `SaharaResult` with the group (in the order added) and the objective after each step.
    """
    config = Sahara(**params)
    if scores is None:
        from headlab.scorers import score

        scores = score(lab, "safety", **config.ships().params())
    key = {**config.params(), "ships": {"kind": scores.kind, "params": scores.params}}
    path = store.run_path(lab.info.slug, "sahara", key)
    return store.cached_run(path, SaharaResult.load, lambda: _search(lab, config, scores, chunk, progress, key),
                            recompute=recompute, save=save)


@torch.no_grad()
def _search(lab: Lab, config: Sahara, scores: HeadScores, chunk: int | None, progress, key: dict) -> SaharaResult:
    started = time.perf_counter()
    info = lab.info
    n_all = info.n_layers * info.n_heads
    candidates = scores.top_heads(n_all if config.pool is None else min(config.pool, n_all))
    if config.k > len(candidates):
        raise ValueError(f"k={config.k} is larger than the candidate pool ({len(candidates)} heads).")
    chosen = choose_requests(config.prompts, config.n, config.seed, config.split)
    groups = length_groups(lab, chosen)
    intact = [intact_last_logits(lab, tokens) for _, tokens in groups]
    method = config.ablation()
    group: list[Head] = []
    curve: list[float] = []
    for step in range(config.k):
        left = [h for h in candidates if h not in group]
        values = _group_values(lab, groups, group, left, method, config.objective, intact, chunk)
        best = int(values.argmax())
        group.append(left[best])
        curve.append(float(values[best]))
        if progress is not None:
            progress((step + 1) / config.k, f"Sahara step {step + 1}/{config.k}: added {head_label(*left[best])}")
    return SaharaResult(model=info.name, heads=group, curve=curve, objective=config.objective, method=method.name,
                        epsilon=config.epsilon, candidates=candidates, n_requests=len(chosen), params=key,
                        seconds=round(time.perf_counter() - started, 2))


# --- the refusal check ---------------------------------------------------------------------------

# Refusal rate on held-out harmful requests with the top-1 and top-k Ships heads vs random k-head sets ablated.
CHECK = CurveConfig(task="refusal", ks=(4,), n_random=3, n=12)
FEW_REFUSALS = 0.5  # below this intact refusal rate there is little refusal to remove


def method_label(method: str) -> str:
    """An ablation method as a view names it, its defaults read from the method: 'scaled_query (epsilon = 0.001)'."""
    fields = method_fields(method)
    return method + (f" ({', '.join(f'{k} = {v:g}' for k, v in fields.items())})" if fields else "")


def ships_ablation(scores: HeadScores) -> AblationMethod:
    """The ablation method (with its parameters) a Ships run used."""
    return make_scorer("safety", **scores.params).ablation()


def answers_side_by_side(lab: Lab, prompts: list[str], head_sets: dict[str, list[Head]], method: AblationMethod,
                         max_new_tokens: int):
    """The greedy answer to each request with each head set ablated (an empty set: intact): one column per set."""
    import pandas as pd

    from headlab.tasks import make_task

    task = make_task("refusal", lab, n=len(prompts), prompts=prompts, max_new_tokens=max_new_tokens)
    columns = {name: task.answers(ablation_hooks(lab, heads, method, task)) for name, heads in head_sets.items()}
    return pd.DataFrame({"request": prompts, **columns})


@dataclass
class RefusalCheck:
    """The refusal curve (top-1 and top-k Ships heads vs random sets) and a few answers side by side."""

    curve: AblationCurve
    examples: "pandas.DataFrame"  # noqa: F821

    @property
    def k(self) -> int:
        return self.curve.ks[-1]

    def rates(self) -> dict[str, float]:
        c = self.curve
        return {"intact": c.baseline, "top1": c.top[0], "topk": c.top[-1], "random_mean": c.random_mean[-1]}

    def to_frame(self):
        return self.curve.to_frame()

    def figure(self):
        return self.curve.figure()

    def summary(self) -> str:
        c, r = self.curve, self.rates()
        text = (f"Refusal rate on {c.task['n']} held-out harmful requests ({c.method}-ablation, greedy "
                f"{c.task['max_new_tokens']} tokens): intact **{r['intact']:.2f}**, top-1 Ships head ablated "
                f"**{r['top1']:.2f}**, top-{self.k} ({format_heads(c.top_heads[-1])}) **{r['topk']:.2f}**, random {self.k} "
                f"heads **{r['random_mean']:.2f}** (mean of {len(c.random[-1])}).")
        if r["intact"] < FEW_REFUSALS:
            text += " The intact model refuses few of these requests, so there is little refusal to remove."
        return text


def refusal_check(lab: Lab, scores: HeadScores, k: int = CHECK.ks[0], n_random: int = CHECK.n_random, *,
                  n: int | None = CHECK.n, n_examples: int = 3, seed: int = 0, max_new_tokens: int | None = None,
                  progress=None) -> RefusalCheck:
    """Ablate the top-1 and top-k heads of a Ships run and random k-head sets (the run's own ablation) on the
    "refusal" task (a stored `ablation_curve`), and show the first `n_examples` answers intact and top-k ablated."""
    method = ships_ablation(scores)
    task_params = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    curve = ablation_curve(lab, scores, CHECK.task, ks=sorted({1, int(k)}), method=method.name, n_random=n_random, n=n,
                           seed=seed, task_params=task_params, method_params=method.params(), progress=progress)
    shown = choose_requests(None, curve.task["n"], seed, curve.task["split"])[:n_examples]
    examples = answers_side_by_side(lab, shown, {"intact": [], f"top-{k} ablated": curve.top_heads[-1]}, method,
                                    curve.task["max_new_tokens"])
    return RefusalCheck(curve=curve, examples=examples)
