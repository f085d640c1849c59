"""Ablation methods: what "remove a head" means, one frozen dataclass each.

A method declares the activation it edits (`point`, a TransformerLens hook inside each block's
attention), the axis of that activation that indexes heads, its parameters (dataclass fields,
checked once in `__post_init__`) and its edit. The hook plumbing is written once, in
`AblationMethod.hooks`: a `Targets` map `{layer: [(rows, heads), ...]}` says which heads to edit in
which batch rows, so one call serves a plain ablation (every row: `(slice(None), heads)`), the
batched scan (block i of the repeated batch ablates head i) and Sahara (a group in every row plus one
candidate per block). As kvpress' presses override one `score`, a new method overrides `edit`
(and `prepare` if it needs statistics of a reference batch) and is registered by subclassing.

- `zero`: the heads' outputs (`hook_z`, before W_O) are set to 0.
- `mean`: the heads' outputs are replaced by their mean over a reference batch (averaged over batch
  and positions, so it applies at any sequence length).
- `streaming_window` (`sink`, `recent`): the heads may attend only to the first `sink` tokens and to
  the last `recent` tokens up to and including the query (key k is kept for query q when
  `k < sink or q - k < recent`): exactly what a compressed-KV runtime does to a streaming head.
- `scaled_query` (`epsilon`): the heads' pre-softmax scores are multiplied by `epsilon` (their query
  scaled by epsilon), so their attention becomes nearly uniform over the keys they may see: Zhou et
  al.'s "undifferentiated attention" ablation for safety heads.
- `sink_only` (`sink`): the heads attend only to the first `sink` tokens, the state Guo et al. call
  dormant: what the model loses when a head parks its attention on the sink.

The default is `mean`: on the embedded model, zero-ablating any one of a few early heads
(L1H3, L1H4, L1H5, L2H2) raises the repeated-token loss by 3-10 nats whatever the task, because
they write a near-constant vector the rest of the model relies on; mean-ablating them moves it by
less than 0.4. Mean ablation removes what a head computes from its input, not its constant offset.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from headlab.activations import Hook, act_name, head_means
from headlab.lab import Lab

Rows = slice  # batch rows of the activation one edit applies to
Targets = dict[int, list[tuple[Rows, list[int]]]]  # {layer: [(rows, heads), ...]}
LayerState = dict[int, torch.Tensor] | None  # what `prepare` computed, per layer

METHODS: dict[str, type["AblationMethod"]] = {}
DEFAULT_METHOD = "mean"


@dataclass(frozen=True)
class AblationMethod(ABC):
    """Base of every ablation method. Subclasses set `name`, `point`, `head_axis` and implement `edit`."""

    name: ClassVar[str] = ""
    point: ClassVar[str] = ""  # activation edited, as `act_name(point, layer)`: "z" or "attn_scores"
    head_axis: ClassVar[int] = 0  # axis of that activation that indexes heads
    needs_reference: ClassVar[bool] = False  # whether `prepare` reads a reference batch

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            METHODS[cls.name] = cls

    def __post_init__(self) -> None:
        """Check the parameters; subclasses raise `ValueError` naming the bad one."""

    def params(self) -> dict:
        """The method's parameters as a JSON-able dict (empty for a method without any)."""
        return dataclasses.asdict(self)

    def prepare(self, lab: Lab, reference: torch.Tensor | None) -> LayerState:
        """Per-layer statistics the edit needs, from `reference` tokens `[batch, pos]` (None if it needs none)."""
        return None

    @abstractmethod
    def edit(self, act: torch.Tensor, heads: list[int], state: torch.Tensor | None) -> None:
        """Ablate `heads` in `act` in place: `act` is a view of the rows to edit (a copy of the activation)."""

    def hooks(self, lab: Lab, targets: Targets, state: LayerState = None) -> list[Hook]:
        """Forward hooks applying `edit` to `targets` `{layer: [(rows, heads)]}`: one hook per layer."""

        def layer_hook(layer: int, pairs: list[tuple[Rows, list[int]]]):
            def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
                act = act.clone()
                for rows, heads in pairs:
                    self.edit(act[rows], heads, None if state is None else state[layer])
                return act

            return hook

        return [(act_name(self.point, layer), layer_hook(layer, pairs)) for layer, pairs in targets.items() if pairs]


@dataclass(frozen=True)
class Zero(AblationMethod):
    """The heads' outputs (`hook_z` `[batch, pos, head, d_head]`) set to 0."""

    name, point, head_axis = "zero", "z", 2

    def edit(self, act, heads, state):
        act[:, :, heads] = 0.0


@dataclass(frozen=True)
class Mean(AblationMethod):
    """The heads' outputs replaced by their mean `[head, d_head]` over the reference batch."""

    name, point, head_axis, needs_reference = "mean", "z", 2, True

    def prepare(self, lab, reference):
        if reference is None:
            raise ValueError("mean ablation needs reference tokens whose per-head mean output it uses.")
        return head_means(lab, reference)

    def edit(self, act, heads, state):
        act[:, :, heads] = state[heads].to(act.dtype)


def streaming_window_allowed(n_queries: int, n_keys: int, sink: int, recent: int, device=None) -> torch.Tensor:
    """`[q, k]` bool: which keys a streaming head keeps. Queries are the last `n_queries` positions
    of `n_keys` (so this also holds while decoding with a cache); causality is included."""
    q_pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    k_pos = torch.arange(n_keys, device=device)[None, :]
    return (k_pos <= q_pos) & ((k_pos < sink) | (q_pos - k_pos < recent))


@dataclass(frozen=True)
class StreamingWindow(AblationMethod):
    """The heads see only the first `sink` and the last `recent` keys (`hook_attn_scores` `[batch, head, q, k]`)."""

    name, point, head_axis = "streaming_window", "attn_scores", 1
    sink: int = 4
    recent: int = 64

    def __post_init__(self):
        if isinstance(self.sink, bool) or isinstance(self.recent, bool) or int(self.sink) != self.sink or int(self.recent) != self.recent:
            raise ValueError(f"streaming_window needs whole numbers of tokens; got sink={self.sink!r}, recent={self.recent!r}.")
        if self.sink < 0 or self.recent < 1:
            raise ValueError(f"streaming_window needs sink >= 0 and recent >= 1 (the query sees itself); "
                             f"got sink={self.sink}, recent={self.recent}.")

    def edit(self, act, heads, state):
        allowed = streaming_window_allowed(act.shape[-2], act.shape[-1], self.sink, self.recent, act.device)
        act[:, heads] = act[:, heads].masked_fill(~allowed, float("-inf"))


@dataclass(frozen=True)
class ScaledQuery(AblationMethod):
    """The heads' pre-softmax scores (`hook_attn_scores` `[batch, head, q, k]`) multiplied by `epsilon`."""

    name, point, head_axis = "scaled_query", "attn_scores", 1
    epsilon: float = 1e-3

    def __post_init__(self):
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"scaled_query needs epsilon in [0, 1) (the factor the query is scaled by); got {self.epsilon}.")

    def edit(self, act, heads, state):
        act[:, heads] = act[:, heads] * self.epsilon


@dataclass(frozen=True)
class SinkOnly(AblationMethod):
    """The heads attend only to the first `sink` tokens (`hook_attn_scores` `[batch, head, q, k]`): forced dormant.

    Guo et al. 2024 find that a dormant head parks its attention on the first token and writes (almost)
    nothing; this makes any head do so, to ask what the model loses when a head goes dormant on every input.
    """

    name, point, head_axis = "sink_only", "attn_scores", 1
    sink: int = 1

    def __post_init__(self):
        if isinstance(self.sink, bool) or int(self.sink) != self.sink or self.sink < 1:
            raise ValueError(f"sink_only needs sink >= 1 whole tokens (every query must see one key); got {self.sink!r}.")

    def edit(self, act, heads, state):
        keep = torch.arange(act.shape[-1], device=act.device) < self.sink  # [k]
        act[:, heads] = act[:, heads].masked_fill(~keep, float("-inf"))


def method_fields(name: str) -> dict[str, object]:
    """`{parameter: default}` of the method registered as `name`."""
    return {f.name: f.default for f in dataclasses.fields(method_class(name))}


def parameterless_methods() -> list[str]:
    """The registered methods that take no parameters (what a form without parameter fields can offer), by name."""
    return sorted(name for name in METHODS if not method_fields(name))


def method_class(name: str) -> type[AblationMethod]:
    if name not in METHODS:
        raise KeyError(f"Unknown ablation method '{name}'. Known: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def make_method(method: str | AblationMethod = DEFAULT_METHOD, **params) -> AblationMethod:
    """The method `method` (a name, or an instance returned as is) with `params`; unknown names are an error."""
    if isinstance(method, AblationMethod):
        if params:
            raise TypeError(f"Give parameters either in the {method.name} method object or as keywords, not both.")
        return method
    cls = method_class(method)
    unknown = set(params) - set(method_fields(method))
    if unknown:
        takes = sorted(method_fields(method)) or "none"
        raise TypeError(f"Ablation method '{method}' takes no parameter {sorted(unknown)}; it takes {takes}.")
    return cls(**params)


def by_layer(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    """`[(layer, head)]` grouped `{layer: [heads]}` in first-seen order."""
    grouped: dict[int, list[int]] = {}
    for layer, head in heads:
        grouped.setdefault(layer, []).append(head)
    return grouped
