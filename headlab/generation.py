"""Greedy generation under hooks, and exact-match answers: what the needle tasks, the retrieval scorer and the
refusal task share.

Generation runs the HF model the bridge wraps with its KV cache, one token per step, inside
`lab.model.hooks(...)`: the bridge's hooks (`hook_pattern`, `hook_z`, ...) fire on those calls, so the
same loop serves the retrieval scorer (reading the newest query's attention row) and the ablation tasks
(hooks that edit `hook_z`). Cost: one prefill of the prompt plus one cached step per new token.
"""
from __future__ import annotations

import torch

from headlab.activations import Hook, capturing, layer_names
from headlab.lab import Lab


def _newest_row(pattern: torch.Tensor) -> torch.Tensor:
    """`[batch, head, q, k]` -> `[head, k]`: only the newest query's row of the first sample, on the CPU."""
    return pattern[0, :, -1].float().cpu()


@torch.no_grad()
def greedy_generate(
    lab: Lab, tokens: torch.Tensor, max_new_tokens: int, hooks: list[Hook] | None = None, keep_attention: bool = False,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of `tokens` `[1, pos]` with `hooks` active.

    Returns the generated ids and, when `keep_attention`, for every generated token the attention
    of the query that produced it over all keys so far: `[n_layers, n_heads, k]` each.
    """
    names = layer_names(lab, "pattern") if keep_attention else []
    model = lab.hf_model
    generated, attention = [], []
    with lab.model.hooks(fwd_hooks=list(hooks or [])), capturing(lab, names, _newest_row) as rows:
        out = model(tokens.to(lab.device), use_cache=True)
        for step in range(max_new_tokens):
            next_id = out.logits[0, -1].argmax()
            generated.append(int(next_id))
            if keep_attention:
                attention.append(torch.stack([rows[name] for name in names]))
            if step + 1 < max_new_tokens:
                out = model(next_id.view(1, 1).to(lab.device), past_key_values=out.past_key_values, use_cache=True)
    return generated, attention


def answer_is_correct(lab: Lab, generated: list[int], answer: str) -> bool:
    """Exact match: the generated text, stripped, starts with `answer`."""
    return lab.tokenizer.decode(generated).strip().startswith(answer.strip())


def answer_budget(lab: Lab, answer: str) -> int:
    """New tokens to generate for `answer`: its token count plus two."""
    return len(lab.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) + 2
