"""The runtime the transformers way: a `transformers.Cache` and an attention function ("headlab_compressed").

    from headlab.runtime.hf import CompressedKVCache, compressed_attention
    cache = CompressedKVCache(mask)            # compensate=True: RazorAttention's compensation token
    with compressed_attention(hf_model):
        out = hf_model.generate(input_ids, past_key_values=cache, max_new_tokens=32, do_sample=False)
    cache.kv_bytes(); cache.kv_bytes_by_device()   # a model sharded with device_map: each layer's pages on its device

`CompressedKVCache.update` does not return the whole cache (that would copy it): it hands the new
keys and values to the attention function registered through transformers' `AttentionInterface`,
which attends over the cache pages (`headlab.runtime.attention.cached_attention`, the runtime's own
eager path) and only then stores the new tokens. The model's attention module passes its
`sliding_window` (a sliding-window layer's heads all stream with `sink=0, recent=sliding_window`,
as in `CompressedLM`) and its `softcap` (Gemma 2) with each call, so a layer's stores are made at
its first attention call. Use it on a plain transformers model: TransformerLens' bridge computes
attention itself. The attention mask is ignored (no padding), and `generate` prefills the prompt
in one piece unless its generation config sets `prefill_chunk_size`.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from headlab import placement
from headlab.masks import HeadMask
from headlab.runtime.attention import cached_attention
from headlab.runtime.cache import LayerCache, head_layout

ATTENTION_NAME = "headlab_compressed"
_pending = threading.local()  # the layer whose update() waits for its attention call


class CompressedLayer(CacheLayerMixin):
    """One layer of a `CompressedKVCache`: a `cache.LayerCache` made at the layer's first attention call."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, mask: HeadMask, index: int, page_size: int, compensate: bool) -> None:
        super().__init__()
        self.mask, self.index, self.page_size, self.compensate = mask, index, page_size, compensate
        self.length = 0
        self.device: torch.device | None = None  # where the stores live: the layer's keys' device
        self.store: LayerCache | None = None
        self.waiting: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True  # the stores wait for the first attention call, which names the sliding window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the new rotated keys/values `[batch, n_kv_heads, t, d_head]`; they are stored once attended."""
        if self.waiting is not None:
            raise RuntimeError(f"The model did not use the '{ATTENTION_NAME}' attention function: run it inside compressed_attention(model).")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.waiting = (key_states, value_states, self.length)
        self.length += key_states.shape[2]
        _pending.layer = self
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float, softcap: float | None, sliding_window: int | None) -> torch.Tensor:
        """`query` `[batch, n_heads, t, d_head]` -> `[batch, t, n_heads, d_head]`; then stores the waiting tokens."""
        keys, values, start = self.waiting
        if self.store is None:
            batch, n_kv, _, d_head = keys.shape
            full, window = head_layout(self.mask, self.index, sliding_window, self.compensate)
            self.device = keys.device
            self.store = LayerCache(full, window, query.shape[1] // n_kv, batch, d_head, self.page_size, keys.dtype, keys.device)
        out = cached_attention(self.store, query, keys, values, start, scaling, softcap)
        self.waiting = None
        return out.transpose(1, 2).contiguous()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store, self.waiting, self.length, self.is_initialized, self.device = None, None, 0, False, None

    def nbytes(self) -> int:
        return self.store.nbytes() if self.store is not None else 0


class CompressedKVCache(Cache):
    """A `transformers.Cache` that follows a `HeadMask` (pass it as `past_key_values`); `compensate` as `CompressedLM`'s."""

    def __init__(self, mask: HeadMask, page_size: int = 256, compensate: bool = False) -> None:
        self.mask = mask
        super().__init__(layers=[CompressedLayer(mask, layer, page_size, compensate) for layer in range(mask.n_layers)])

    def kv_bytes(self) -> int:
        """Bytes held by the key and value pages right now."""
        return sum(layer.nbytes() for layer in self.layers)

    def kv_bytes_by_device(self) -> dict[str, int]:
        """`kv_bytes` per device `{"cuda:0": bytes, ...}`: each layer's pages sit on its layer's device (those the
        model has run so far)."""
        made = [layer for layer in self.layers if layer.device is not None]
        return placement.by_device([layer.device for layer in made], [layer.nbytes() for layer in made])


def compressed_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                                 scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
                                 sliding_window: int | None = None, **kwargs):
    """The attention function registered as "headlab_compressed" (called by the model's attention modules)."""
    layer = getattr(_pending, "layer", None)
    if layer is None or layer.waiting is None:
        raise RuntimeError(f"'{ATTENTION_NAME}' attention needs a CompressedKVCache as past_key_values (with use_cache=True).")
    _pending.layer = None
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, scaling, softcap, sliding_window), None


def register() -> str:
    """Register the attention function with transformers; returns its name."""
    AttentionInterface.register(ATTENTION_NAME, compressed_attention_forward)
    return ATTENTION_NAME


@contextmanager
def compressed_attention(hf_model):
    """Within the block, `hf_model` attends through "headlab_compressed" (restored afterwards)."""
    register()
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield hf_model
    finally:
        hf_model.set_attn_implementation(previous)
