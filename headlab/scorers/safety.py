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

import random
from dataclasses import asdict, dataclass

import torch

from headlab import requests, scan
from headlab.lab import Lab
from headlab.scorers import register
from headlab.scores import Head, HeadScores

SHIPS_METHODS = ("scaled_query", "zero")
SAHARA_OBJECTIVES = ("kl", "refusal_prob")


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


def _check(method: str, epsilon: float) -> None:
    if method not in SHIPS_METHODS:
        raise ValueError(f"Ships ablation must be one of {', '.join(SHIPS_METHODS)}; got {method!r}.")
    if method == "scaled_query" and not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1); got {epsilon}.")


@torch.no_grad()
def intact_last_logits(lab: Lab, tokens: torch.Tensor) -> torch.Tensor:
    """`[batch, d_vocab]` next-token logits at the last position, no hooks."""
    return lab.model(tokens.to(lab.device), return_type="logits")[:, -1].float()


def _kl(intact_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(intact || ablated) over the last axis: `intact_logp` `[batch, V]`, `logits` `[..., batch, V]`."""
    ablated = torch.log_softmax(logits.float(), dim=-1)
    return (intact_logp.exp() * (intact_logp - ablated)).sum(-1)


@torch.no_grad()
def ships_per_request(
    lab: Lab, prompts: list[str], *, method: str = "scaled_query", epsilon: float = 1e-3,
    heads: list[Head] | None = None, chunk: int | None = None, progress=None,
) -> torch.Tensor:
    """`[n_requests, n_layers, n_heads]`: Ships of each head on each request (NaN for heads not scanned)."""
    _check(method, epsilon)
    info = lab.info
    heads = heads if heads is not None else [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]
    out = torch.full((len(prompts), info.n_layers, info.n_heads), float("nan"))
    groups = length_groups(lab, prompts)
    for g, (index, tokens) in enumerate(groups):
        intact = torch.log_softmax(intact_last_logits(lab, tokens), dim=-1)
        blocks: list[torch.Tensor] = []

        def measure(logits: torch.Tensor) -> torch.Tensor:  # [k, batch, pos, V] -> [k], keeping [k, batch]
            kl = _kl(intact, logits[:, :, -1]).cpu()
            blocks.append(kl)
            return kl.mean(-1)

        def group_progress(fraction: float, message: str, g=g) -> None:
            if progress is not None:
                progress((g + fraction) / len(groups), f"length group {g + 1}/{len(groups)}: {message}")

        scan.ablation_scan(lab, tokens, measure, method=method, heads=heads, epsilon=epsilon, chunk=chunk,
                           positions="last", progress=group_progress)
        per_head = torch.cat(blocks)  # [n_heads scanned, batch] in `heads` order
        for (layer, head), values in zip(heads, per_head):
            out[index, layer, head] = values
    return out


@register("safety")
def safety(
    lab: Lab,
    *,
    n: int | None = 8,
    seed: int = 0,
    prompts: list[str] | str | None = None,
    split: str = "train",
    method: str = "scaled_query",
    epsilon: float = 1e-3,
) -> HeadScores:
    """Ships of every head, averaged over `n` harmful requests (built-in `split`, or `prompts`: a list or a CSV/JSONL path).

    The default requests are the harmful *training* requests, so ablation experiments on the held-out
    ones (task "refusal") never select heads on the requests they are measured on.
    """
    chosen = choose_requests(prompts, n, seed, split)
    per_request = ships_per_request(lab, chosen, method=method, epsilon=epsilon)
    first_tokens = []
    for index, tokens in length_groups(lab, chosen):
        top = intact_last_logits(lab, tokens).argmax(-1).tolist()
        first_tokens += list(zip(index, [lab.tokenizer.decode([t]) for t in top]))
    first_tokens = [t for _, t in sorted(first_tokens)]
    return HeadScores(
        kind="safety",
        model=lab.info.name,
        params={"n": n, "seed": seed, "prompts": prompts, "split": split, "method": method, "epsilon": epsilon},
        values=per_request.mean(0),
        raw={"per_request": per_request},
        meta={
            "metric": "Ships: KL(intact || head ablated) of the next-token distribution at the assistant-turn start, "
                      f"mean over harmful requests ({method}" + (f", epsilon {epsilon}" if method == "scaled_query" else "") + ")",
            "n_requests": len(chosen),
            "requests": chosen,
            "intact_first_tokens": first_tokens,
        },
    )


# --- Sahara ------------------------------------------------------------------------------------


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

    def to_dict(self) -> dict:
        return asdict(self)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"step": range(1, len(self.heads) + 1), "added": [f"L{l}H{h}" for l, h in self.heads],
                             self.objective: self.curve})


def _objective_fn(objective: str, intact_logits: torch.Tensor):
    """`[k, batch, V]` last-position logits -> `[k, batch]` objective values (higher = moved further)."""
    intact_logp = torch.log_softmax(intact_logits, dim=-1)
    if objective == "kl":
        return lambda logits: _kl(intact_logp, logits)
    first = intact_logits.argmax(-1)  # [batch]: the intact model's own first answer token
    p_intact = intact_logp.exp().gather(-1, first[:, None])[:, 0]

    def drop(logits: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits.float(), dim=-1)
        return p_intact - p[..., torch.arange(len(first)), first]

    return drop


@torch.no_grad()
def _group_values(lab: Lab, groups, group_heads: list[Head], candidates: list[Head], method: str, epsilon: float,
                  objective: str, intact: list[torch.Tensor], chunk: int | None) -> torch.Tensor:
    """`[len(candidates)]`: the objective (mean over requests) with `group_heads` + each candidate ablated."""
    from headlab.ablation import ablation_hooks

    params = {"epsilon": epsilon} if method == "scaled_query" else {}
    base = ablation_hooks(lab, group_heads, method, None, **params)
    total = torch.zeros(len(candidates))
    count = 0
    for (index, tokens), intact_logits in zip(groups, intact):
        fn = _objective_fn(objective, intact_logits)
        tokens = tokens.to(lab.device)
        batch = tokens.shape[0]
        size = scan.heads_per_pass(lab, tokens, chunk)
        for start in range(0, len(candidates), size):
            part = candidates[start:start + size]
            hooks = base + scan._block_hooks(lab, part, batch, method, epsilon, None)
            with lab.model.hooks(fwd_hooks=hooks):
                logits = lab.model(tokens.repeat(len(part), 1), return_type="logits")[:, -1]
            values = fn(logits.view(len(part), batch, -1).float())  # [k, batch]
            total[start:start + len(part)] += values.sum(-1).cpu()
        count += batch
    return total / count


@torch.no_grad()
def sahara(
    lab: Lab,
    *,
    k: int = 4,
    scores: HeadScores | None = None,
    pool: int | None = 27,
    prompts: list[str] | str | None = None,
    n: int | None = 8,
    seed: int = 0,
    split: str = "train",
    method: str = "scaled_query",
    epsilon: float = 1e-3,
    objective: str = "kl",
    chunk: int | None = None,
    progress=None,
) -> SaharaResult:
    """Greedy search for the `k` heads whose joint ablation moves the model furthest on harmful requests.

    Args:
        scores: Ships scores ranking the candidates (default: `hl.score(lab, "safety", ...)` on the same requests).
        pool: candidates = the `pool` best Ships heads (None: every head — 270 ablated passes per step).
        objective: "kl" (KL from the intact next-token distribution) or "refusal_prob" (drop of the
            probability of the intact model's first answer token).
    Returns:
        `SaharaResult` with the group (in the order added) and the objective after each step.
    """
    _check(method, epsilon)
    if objective not in SAHARA_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(SAHARA_OBJECTIVES)}; got {objective!r}.")
    if k < 1:
        raise ValueError(f"k must be at least 1 head; got {k}.")
    info = lab.info
    if scores is None:
        from headlab.scorers import score

        scores = score(lab, "safety", n=n, seed=seed, prompts=prompts, split=split, method=method, epsilon=epsilon)
    all_heads = info.n_layers * info.n_heads
    candidates = scores.top_heads(all_heads if pool is None else min(pool, all_heads))
    if k > len(candidates):
        raise ValueError(f"k={k} is larger than the candidate pool ({len(candidates)} heads).")
    chosen = choose_requests(prompts, n, seed, split)
    groups = length_groups(lab, chosen)
    intact = [intact_last_logits(lab, tokens) for _, tokens in groups]
    group: list[Head] = []
    curve: list[float] = []
    for step in range(k):
        left = [h for h in candidates if h not in group]
        values = _group_values(lab, groups, group, left, method, epsilon, objective, intact, chunk)
        best = int(values.argmax())
        group.append(left[best])
        curve.append(float(values[best]))
        if progress is not None:
            progress((step + 1) / k, f"Sahara step {step + 1}/{k}: added L{left[best][0]}H{left[best][1]}")
    return SaharaResult(model=info.name, heads=group, curve=curve, objective=objective, method=method, epsilon=epsilon,
                        candidates=candidates, n_requests=len(chosen))
