"""Activations in one place: hook names, capturing what a forward pass computes, and the KL of two runs.

Hook names come from TransformerLens' own `get_act_name` ("pattern", 3 -> `blocks.3.attn.hook_pattern`),
so no module spells them by hand. `capturing(lab, names)` is the one way headlab keeps activations: a
context manager whose dict fills with each hooked activation (optionally reduced, e.g. to the last
query row) while the model runs inside it; `capture(lab, tokens, names)` is one plain forward pass
with it. Its hooks are marked `reads_only`, so inside a linear pass (`headlab.longpass`) a capture of
`hook_pattern` gets exactly recomputed blocks of pattern rows instead of forcing eager attention.
`kl_divergence` is the one KL(intact || edited) of next-token distributions that Ships,
Sahara and the scan's `last_token_kl` use.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from transformer_lens.utilities import get_act_name

from headlab.lab import Lab

Hook = tuple[str, Callable]  # (hook name, fn(activation, hook=None) -> activation or None)
Reduce = Callable[[torch.Tensor], torch.Tensor]
READS_ONLY = "_headlab_reads_only"  # attribute of a hook that never edits its activation


def reads_only(hook: Callable) -> Callable:
    """Mark `hook` as one that never edits its activation (a linear pass then gives it recomputed pattern rows)."""
    setattr(hook, READS_ONLY, True)
    return hook


def act_name(name: str, layer: int) -> str:
    """The TransformerLens hook name of activation `name` ("pattern", "z", "attn_scores", "q", "resid_pre", ...) in `layer`."""
    return get_act_name(name, layer)


def layer_names(lab: Lab, *names: str) -> list[str]:
    """`act_name(name, layer)` for every layer of `lab` and every name, layer-major."""
    return [act_name(name, layer) for layer in range(lab.info.n_layers) for name in names]


@contextmanager
def capturing(lab: Lab, names: Iterable[str], reduce: Reduce | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the activations at `names` (detached, `reduce`d when given) of every forward pass run inside.

    Entries are keyed by the requested name (the bridge may report an alias's target as `hook.name`)
    and replaced by each new pass, so a loop of passes inside one `with` sees the latest.
    """
    stash: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        def keep(act: torch.Tensor, hook=None) -> torch.Tensor:
            # a sharded model (device_map) computes each layer on its own GPU: gather on the lab's device
            stash[name] = (reduce(act) if reduce else act).detach().to(lab.device)
            return act

        return reads_only(keep)

    with lab.model.hooks(fwd_hooks=[(name, keeper(name)) for name in names]):
        yield stash


@torch.no_grad()
def capture(lab: Lab, tokens: torch.Tensor, names: Iterable[str], reduce: Reduce | None = None) -> dict[str, torch.Tensor]:
    """One forward pass of `tokens` `[batch, pos]` (no logits kept); the activations at `names`."""
    with capturing(lab, names, reduce) as stash:
        lab.model(tokens.to(lab.device), return_type=None)
    return dict(stash)


def attention_pattern(lab: Lab, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """Attention of every head of `layer` on `tokens` `[1, pos]`: `[head, q_pos, k_pos]` on the CPU.

    The full pattern, for short prompts (the pattern viewer): one eager forward, memory ~ head x pos^2 per layer
    (quadratic in pos), refused up front when it would not fit.
    """
    pos = tokens.shape[-1]
    lab.require_memory(4 * 4 * lab.info.n_heads * pos * pos, f"The attention pattern of {pos} tokens",
                       "use a shorter prompt")
    name = act_name("pattern", layer)
    return capture(lab, tokens, [name])[name][0].float().cpu()


@torch.no_grad()
def head_means(lab: Lab, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """`{layer: [n_heads, d_head]}`: each head's output (`hook_z`) averaged over the batch and positions of `tokens`."""
    z = capture(lab, tokens, layer_names(lab, "z"))
    return {layer: z[act_name("z", layer)].mean(dim=(0, 1)) for layer in range(lab.info.n_layers)}


def kl_divergence(intact_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(intact || edited) over the last axis.

    Args:
        intact_logp: `[batch, vocab]` log-probabilities of the intact run.
        logits: `[..., batch, vocab]` logits of edited runs (any leading axes).
    Returns:
        `[..., batch]`.
    """
    edited = torch.log_softmax(logits.float(), dim=-1)
    return (intact_logp.exp() * (intact_logp - edited)).sum(-1)
