"""Prompt generators that need no network: random and repeated random token sequences."""
from __future__ import annotations

import torch

from headlab.lab import Lab


def ordinary_token_ids(lab: Lab) -> torch.Tensor:
    """Ids of the vocabulary without special tokens (BOS/EOS/chat markers), `[n_ordinary]`."""
    special = set(lab.tokenizer.all_special_ids or [])
    vocab = min(lab.info.d_vocab, len(lab.tokenizer))
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[[i for i in special if i < vocab]] = False
    return torch.nonzero(keep).flatten()


def random_tokens(lab: Lab, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`[n, seq_len]` uniformly random ordinary tokens, reproducible from `seed`."""
    pool = ordinary_token_ids(lab)
    gen = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (n, seq_len), generator=gen)]


def with_bos(lab: Lab, tokens: torch.Tensor) -> torch.Tensor:
    """Prepend the BOS token to `[batch, pos]` when the model has one."""
    if lab.bos_token_id is None:
        return tokens
    bos = torch.full((tokens.shape[0], 1), lab.bos_token_id, dtype=tokens.dtype)
    return torch.cat([bos, tokens], dim=1)


def repeated_random_tokens(lab: Lab, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """`[n, (1) + 2 * seq_len]`: BOS, then a random sequence, then the same sequence again."""
    half = random_tokens(lab, n, seq_len, seed)
    tokens = with_bos(lab, torch.cat([half, half], dim=1))
    lab.check_length(tokens.shape[1], "repeated-token sequence")
    return tokens


def texts_to_tokens(lab: Lab, texts: list[str], repeat: int = 1) -> list[torch.Tensor]:
    """Each text tokenized (BOS first), its tokens repeated `repeat` times; a list of `[1, pos]`."""
    out = []
    for text in texts:
        ids = lab.tokenizer(text, add_special_tokens=False)["input_ids"] * repeat
        if not ids:
            raise ValueError("An empty prompt was given: every prompt needs at least one token.")
        out.append(with_bos(lab, torch.tensor([ids])))
        lab.check_length(out[-1].shape[1])
    return out
