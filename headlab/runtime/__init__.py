"""Compressed-KV runtime: the Lab's weights, its own cache and attention, following a `HeadMask`.

    from headlab import runtime
    rt = runtime.CompressedLM(lab, mask, chunk_size=256, page_size=256)
    rt.generate("Once upon a time", max_new_tokens=32); rt.kv_bytes()
    rt.logits(tokens)  # [batch, pos, vocab], prefill in chunks from an empty cache
    rt = runtime.CompressedLM(hf_model_on_cuda, mask, max_length=131072 + 64)  # attention="sdpa" on CUDA

Modules: `weights` (the plain HF modules behind the TransformerLens bridge), `cache` (paged full
and sink + ring-buffer streaming caches), `attention` (RoPE and attention over cache segments),
`model` (`CompressedLM`), `static` (the "sdpa" path: preallocated buffers, SDPA prefill, static
decode step for a CUDA graph), `decode_kernel` (its Triton split-KV decode attention), `fused`
(torch.compile'd pieces of the CUDA decode step), `benchmark` (`measure`: memory / speed table vs Hugging Face's
full cache, random-weight Llama builder), `hf` (the same cache as a `transformers.Cache` plus an attention
function for `hf_model.generate(..., past_key_values=cache)` on a plain transformers model).
"""
from headlab.runtime.cache import CompressedCache, FullKV, StreamingKV
from headlab.runtime.model import CompressedLM
from headlab.runtime.static import StaticCache
from headlab.runtime.benchmark import measure  # noqa: E402

__all__ = ["CompressedCache", "CompressedLM", "FullKV", "StaticCache", "StreamingKV", "measure"]
