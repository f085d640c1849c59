"""Successor heads (Gould et al. 2023): the succession score, read from the weights.

For every item token t of an ordinal list (days, months, number words, ...):

    e_t    = effective embedding of t                      (default: MLP_0(ln2_0(W_E[t])), the paper's)
    out_t  = ln1_L(e_t) @ W_V[L, kv(h)] @ W_O[L, h]        (the head's OV circuit, its layer's ln1 as the model has it)
    logits = ln_final(out_t) @ W_U + b_U                   (the unembedding with the final norm)

restricted to the list's own items; a hit when the argmax is t's successor. A head's succession
score is its hit rate over every item (that has a successor) of every list; `raw["per_task"]`
holds the per-list accuracy `[task, layer, head]` and `raw["chance"]` each list's chance `1 / items`.

GQA: query head h reads KV head `h // (n_heads // n_kv_heads)`, so its OV circuit is that KV
head's W_V with h's own W_O. The head's biases (b_V, b_O) are not part of the OV circuit and are
left out, as W_OV leaves them out; layer 0's biases are included when its attention output is
part of the effective embedding (a real layer-0 output has them).

Everything goes through `ModelParts` (the bridge's weights and its own norm and MLP modules), so
the same code runs on GPT-2 (LayerNorm with bias, GELU MLP, learned positions ignored, tied or
separate W_U) and on Llama-style models (RMSNorm, gated MLP, GQA). The tests prove it on
hand-built heads, in the embedded model and in a GPT-2-shaped toy.

Variants (`embedding`, `final_norm`, `center`): the effective embedding can be
- "mlp0": MLP_0(ln2_0(W_E)) — the paper's choice (MLP0's output alone), the default;
- "embed+mlp0": W_E + MLP_0(ln2_0(W_E)) — the residual stream after MLP0;
- "embed": W_E — the raw token embedding;
- "attn0+mlp0": MLP_0(ln2_0(r)) with r = W_E + attn_0(r) when the token attends only to itself;
- "block0": r + MLP_0(ln2_0(r)) — the whole of block 0's residual stream for a lone token.
`final_norm=False` skips ln_final (logits = out @ W_U + b_U); `center=True` subtracts each list's
mean effective embedding before the OV circuit, so only what tells the items apart is read;
`exclude_self=True` (not the paper's) takes the argmax over the other items, for heads that copy.
What holds for the embedded model: analyses/README.md, section "successor_heads".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from headlab.ablation.curve import AblationCurve, CurveConfig, ablation_curve
from headlab.datasets import ordinals
from headlab.heads import Head, check_head, head_label
from headlab.lab import Lab
from headlab.scorers import Scorer
from headlab.scores import HeadScores
from headlab.tasks import Task
from headlab.tasks.successor import SuccessorTask

EMBEDDINGS = ("mlp0", "embed+mlp0", "embed", "attn0+mlp0", "block0")
PAPER_EMBEDDING = "mlp0"
# The behavioural check: continuation accuracy with the top-k heads vs random k-head sets ablated.
CHECK = CurveConfig(task=SuccessorTask.name, ks=(3,), n_random=5, n=SuccessorTask.default_n)

Norm = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ModelParts:
    """What the succession score reads from a model (float32, CPU), as plain tensors and callables.

    Attributes:
        W_E: `[d_vocab, d_model]`; W_U: `[d_model, d_vocab]`; b_U: `[d_vocab]` or None.
        W_V: `[layer, kv_head, d_model, d_head]`; b_V: `[layer, kv_head, d_head]` or None.
        W_O: `[layer, head, d_head, d_model]`; b_O: `[layer, d_model]` or None.
        ln1: `ln1(layer, x)`, the norm in front of `layer`'s attention (identity if it has none).
        ln2_0, mlp0: block 0's norm in front of its MLP and the MLP, `[n, d_model] -> [n, d_model]`.
        ln_final: the final norm.
    """

    W_E: torch.Tensor
    W_U: torch.Tensor
    b_U: torch.Tensor | None
    W_V: torch.Tensor
    b_V: torch.Tensor | None
    W_O: torch.Tensor
    b_O: torch.Tensor | None
    ln1: Callable[[int, torch.Tensor], torch.Tensor]
    ln2_0: Norm
    mlp0: Norm
    ln_final: Norm

    @property
    def n_layers(self) -> int:
        return self.W_O.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_O.shape[1]

    @property
    def group_size(self) -> int:
        return self.n_heads // self.W_V.shape[1]

    def replace(self, **changes) -> "ModelParts":
        return ModelParts(**{**self.__dict__, **changes})


def _optional(model, name: str) -> torch.Tensor | None:
    """A stacked bias of the bridge, or None for a bias-free checkpoint (the bridge raises then)."""
    try:
        value = getattr(model, name)
    except AttributeError:
        return None
    return None if value is None else value.detach().float().cpu()


def _module_fn(module) -> Norm:
    """Call a bridge component on `[n, d_model]` as the model would on `[batch, pos, d_model]`."""

    def run(x: torch.Tensor) -> torch.Tensor:
        param = next(module.parameters(), None)
        device, dtype = (param.device, param.dtype) if param is not None else (x.device, x.dtype)
        with torch.no_grad():
            return module(x.to(device, dtype)[None])[0].float().cpu()

    return run


def model_parts(lab: Lab) -> ModelParts:
    """`ModelParts` of a loaded model, read from its TransformerBridge (weights copied to CPU float32)."""
    model = lab.model
    with torch.no_grad():
        W_E, W_U = model.W_E.detach().float().cpu(), model.W_U.detach().float().cpu()
        W_V, W_O = model.W_V.detach().float().cpu(), model.W_O.detach().float().cpu()
    blocks = model.blocks

    def ln1(layer: int, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(blocks[layer], "ln1", None)
        return _module_fn(norm)(x) if norm is not None else x

    block0 = blocks[0]
    ln2 = getattr(block0, "ln2", None)
    return ModelParts(
        W_E=W_E, W_U=W_U, b_U=_optional(model, "b_U"), W_V=W_V, b_V=_optional(model, "b_V"), W_O=W_O,
        b_O=_optional(model, "b_O"), ln1=ln1, ln2_0=_module_fn(ln2) if ln2 is not None else (lambda x: x),
        mlp0=_module_fn(block0.mlp), ln_final=_module_fn(model.ln_final),
    )


def attn0_self(parts: ModelParts, x: torch.Tensor) -> torch.Tensor:
    """Layer 0's attention output for tokens that attend only to themselves, `[n, d_model]` (biases included)."""
    v = torch.einsum("nd,kde->kne", parts.ln1(0, x), parts.W_V[0])  # [kv, n, d_head]
    if parts.b_V is not None:
        v = v + parts.b_V[0][:, None]
    v = v.repeat_interleave(parts.group_size, dim=0)  # [head, n, d_head]
    out = torch.einsum("hne,hed->nd", v, parts.W_O[0])
    return out + parts.b_O[0] if parts.b_O is not None else out


def effective_embedding(parts: ModelParts, token_ids: torch.Tensor, embedding: str = PAPER_EMBEDDING) -> torch.Tensor:
    """The effective embedding `[n, d_model]` of `token_ids` under variant `embedding` (see the module doc)."""
    if embedding not in EMBEDDINGS:
        raise ValueError(f"Unknown effective embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}.")
    x = parts.W_E[token_ids]
    if embedding == "embed":
        return x
    if embedding in ("attn0+mlp0", "block0"):
        x = x + attn0_self(parts, x)
    mlp = parts.mlp0(parts.ln2_0(x))
    return mlp if embedding in ("mlp0", "attn0+mlp0") else x + mlp


def succession_logits(
    parts: ModelParts, tasks: list[ordinals.OrdinalTask], *, embedding: str = PAPER_EMBEDDING,
    final_norm: bool = True, center: bool = False, heads: list[Head] | None = None,
) -> list[torch.Tensor]:
    """Per task, the logits over the task's own items `[layer, head, item_in, item_out]`.

    With `heads`, only those heads are filled (the rest are NaN).
    """
    ids = torch.tensor([tid for task in tasks for tid in task.token_ids])
    spans, start = [], 0
    for task in tasks:
        spans.append((start, start + len(task.token_ids)))
        start += len(task.token_ids)
    emb = effective_embedding(parts, ids, embedding)
    if center:
        emb = torch.cat([emb[a:b] - emb[a:b].mean(0, keepdim=True) for a, b in spans])
    W_U = parts.W_U[:, ids]
    b_U = parts.b_U[ids] if parts.b_U is not None else torch.zeros(len(ids))
    L, H = parts.n_layers, parts.n_heads
    out = [torch.full((L, H, b - a, b - a), float("nan")) for a, b in spans]
    wanted = {(l, h) for l, h in heads} if heads is not None else None
    for layer in range(L):
        layer_heads = [h for h in range(H) if wanted is None or (layer, h) in wanted]
        if not layer_heads:
            continue
        x = parts.ln1(layer, emb)
        kv = torch.tensor([h // parts.group_size for h in layer_heads])
        v = torch.einsum("nd,kde->kne", x, parts.W_V[layer, kv])  # [heads, n, d_head]
        resid = torch.einsum("kne,ked->knd", v, parts.W_O[layer, layer_heads])  # [heads, n, d_model]
        if final_norm:
            resid = parts.ln_final(resid.flatten(0, 1)).view_as(resid)
        logits = resid @ W_U + b_U  # [heads, n, n_all]
        for t, (a, b) in enumerate(spans):
            out[t][layer, layer_heads] = logits[:, a:b, a:b]
    return out


def without_self(logits: torch.Tensor) -> torch.Tensor:
    """`[..., item_in, item_out]` logits with each item's own logit set to -inf (so a copying head can't win)."""
    n = logits.shape[-1]
    return logits.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))


def accuracy_from_logits(task: ordinals.OrdinalTask, logits: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Hits `[..., n_scored]` (1.0 where the argmax among the task's items is the successor)."""
    pairs = task.pairs()
    rows = torch.tensor([i for i, _ in pairs])
    targets = torch.tensor([s for _, s in pairs])
    logits = without_self(logits) if exclude_self else logits
    return (logits[..., rows, :].argmax(-1) == targets).float()


def succession_scores(parts: ModelParts, tasks: list[ordinals.OrdinalTask], exclude_self: bool = False,
                      **variant) -> tuple[torch.Tensor, torch.Tensor]:
    """`(score [layer, head], per_task accuracy [task, layer, head])` from `ModelParts`."""
    per_task, hits, total = [], 0.0, 0
    for task, logits in zip(tasks, succession_logits(parts, tasks, **variant)):
        task_hits = accuracy_from_logits(task, logits, exclude_self)
        per_task.append(task_hits.mean(-1))
        hits = hits + task_hits.sum(-1)
        total += task_hits.shape[-1]
    return hits / total, torch.stack(per_task)


def chance_level(tasks: list[ordinals.OrdinalTask], exclude_self: bool = False) -> float:
    """Expected hit rate of a head whose argmax is a uniformly random item of the task (other than t with `exclude_self`)."""
    total = sum(task.n_scored for task in tasks)
    return sum(task.n_scored / (len(task.items) - exclude_self) for task in tasks) / total


def check_variant(embedding: str, tasks) -> None:
    if embedding not in EMBEDDINGS:
        raise ValueError(f"Unknown effective embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}.")
    unknown = [t for t in (tasks or []) if t not in ordinals.SEQUENCES]
    if unknown:
        raise ValueError(f"Unknown ordinal sequence(s) {unknown}; known: {', '.join(ordinals.SEQUENCES)}.")


@dataclass(frozen=True)
class Successor(Scorer):
    """Succession score of every head (Gould et al. 2023): hit rate of t -> successor(t) through the head's OV circuit.

    Fields:
        n: items per ordinal list (its first n; None = all). The score reads weights only (no seed: it is deterministic).
        tasks: ordinal sequences to use (`headlab.datasets.ordinals.SEQUENCES`; None = all).
        embedding, final_norm, center: the variant (module doc); the defaults are the paper's.
        exclude_self: take the argmax over the list's items other than t itself (not the paper's: it
            asks whether a head that mostly copies ranks the successor next).

    Cost: weights only, no forward pass: one `[items, d_model] x [d_model, d_head] x [d_head, d_model]` product
    per head and an unembedding restricted to the list's items; time grows with layers x heads x items x d_model,
    memory with items x d_model per head (independent of any context length). Refused up front if even that
    does not fit.
    """

    kind = "successor"
    n: int | None = None
    tasks: list[str] | None = None
    embedding: str = PAPER_EMBEDDING
    final_norm: bool = True
    center: bool = False
    exclude_self: bool = False

    def __post_init__(self):
        check_variant(self.embedding, self.tasks)
        if self.n is not None and int(self.n) < 2:
            raise ValueError(f"successor: n (items per list) must be at least 2 so an item has a successor; got {self.n}.")

    @property
    def variant(self) -> dict:
        return {"embedding": self.embedding, "final_norm": self.final_norm, "center": self.center}

    def compute(self, lab: Lab) -> HeadScores:
        task_list, dropped = ordinals.ordinal_tasks(lab.tokenizer, self.tasks, max_items=self.n)
        items = sum(len(t.items) for t in task_list)
        lab.require_memory(4 * 4 * items * (lab.info.d_model + lab.info.n_heads * lab.info.d_head), "successor",
                           "score fewer lists (tasks) or fewer items (n)")
        values, per_task = succession_scores(model_parts(lab), task_list, exclude_self=self.exclude_self, **self.variant)
        chance = torch.tensor([1.0 / (len(t.items) - self.exclude_self) for t in task_list])
        return self.result(lab, values, {"per_task": per_task, "chance": chance}, meta={
            "metric": "fraction of ordinal items whose successor is the argmax (among the list's items) of the "
                      "head's OV circuit applied to the effective embedding, through the final norm and unembedding",
            "tasks": [t.name for t in task_list],
            "items": {t.name: t.items for t in task_list},
            "n_scored": {t.name: t.n_scored for t in task_list},
            "dropped": dropped,
            "chance": chance_level(task_list, self.exclude_self),
            "variant": {**self.variant, "exclude_self": self.exclude_self,
                        "paper": self.embedding == PAPER_EMBEDDING and self.final_norm and not self.center and not self.exclude_self},
        })


def head_predictions(lab: Lab, layer: int, head: int, **params):
    """One head's prediction for every item: a DataFrame (task, item, predicted, successor, hit).

    `params`: the `Successor` scorer's fields (n, tasks, the variant, exclude_self), its defaults otherwise.
    """
    import pandas as pd

    config = Successor(**params)
    layer, head = check_head(lab.info, layer, head)
    task_list, _ = ordinals.ordinal_tasks(lab.tokenizer, config.tasks, max_items=config.n)
    logits = succession_logits(model_parts(lab), task_list, heads=[(layer, head)], **config.variant)
    exclude_self = config.exclude_self
    rows = []
    for task, task_logits in zip(task_list, logits):
        head_logits = task_logits[layer, head]
        predicted = (without_self(head_logits) if exclude_self else head_logits).argmax(-1)
        for i, item in enumerate(task.items):
            succ = task.successor[i]
            rows.append({"task": task.name, "item": item, "predicted": task.items[int(predicted[i])],
                         "successor": task.items[succ] if succ >= 0 else "", "hit": bool(succ >= 0 and int(predicted[i]) == succ)})
    return pd.DataFrame(rows)


def summary(scores: HeadScores) -> str:
    """Markdown: the variant, the best head against chance, the lists used and what was dropped."""
    meta = scores.meta
    layer, head, best = scores.top(1)[0]
    total = sum(meta["n_scored"].values())
    lists = ", ".join(f"{name} ({len(meta['items'][name])})" for name in meta["tasks"])
    dropped = "; ".join(
        f"{name}: {'all' if name not in meta['items'] else len(items)} dropped" for name, items in meta["dropped"].items() if items
    )
    variant = meta["variant"]
    verdict = (
        "well above chance" if best >= max(0.5, 3 * meta["chance"])
        else "no head is clearly above chance (the best of many heads at chance reaches about twice chance)"
    )
    return (
        f"**Succession score** of {scores.model}: effective embedding `{variant['embedding']}`, final norm "
        f"{'on' if variant['final_norm'] else 'off'}, centring {'on' if variant['center'] else 'off'}, argmax over "
        f"{'the other items' if variant.get('exclude_self') else 'all items'}"
        f"{' (the paper’s variant)' if variant.get('paper') else ''}. Best head **{head_label(layer, head)}** ({best:.3f}) over "
        f"{total} items; chance {meta['chance']:.3f} — {verdict}.\n\nLists: {lists}."
        + (f" Not single tokens: {dropped}." if dropped else "")
    )


def list_accuracy(scores: HeadScores, layer: int, head: int):
    """One head's accuracy on each ordinal list, with the list's size and chance: a DataFrame, one row per list."""
    import pandas as pd

    if not (0 <= layer < scores.n_layers and 0 <= head < scores.n_heads):
        raise ValueError(f"Head {head_label(layer, head)} does not exist: layers 0-{scores.n_layers - 1}, heads 0-{scores.n_heads - 1}.")
    per_task, chance = scores.raw["per_task"], scores.raw["chance"]
    return pd.DataFrame(
        [{"list": name, "items": len(scores.meta["items"][name]), "accuracy": round(float(per_task[t, layer, head]), 3),
          "chance": round(float(chance[t]), 3)} for t, name in enumerate(scores.meta["tasks"])]
    )


def behaviour_check(lab: Lab, scores: HeadScores, k: int = CHECK.ks[0], n_random: int = CHECK.n_random,
                    n: int | None = CHECK.n, method: str = CHECK.method, task: Task | None = None,
                    progress=None) -> AblationCurve:
    """Continuation accuracy intact, with the top-k heads of `scores` ablated, and with `n_random` random k-sets.

    `task` (a built "successor" task) is used instead of building one of `n` prompts. Stored like any curve:
    its `to_frame()`, `figure()` and `summary()` are what a view shows.
    """
    return ablation_curve(lab, scores, task=task or CHECK.task, ks=[k], method=method, n_random=n_random, n=n,
                          progress=progress)
