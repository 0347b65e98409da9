"""Which paged KV cache (engine/paged_cache.py) an engine gets, and what one of its pages costs.

From the codec's own declaration and the engine's resolved decode_kv (engine/decode_kv.py):
- `dense`, a codec whose pages are dense (bf16): its pages in the 16-bit pool (KVCache), the
  paged bf16 kernel;
- `dense`, any other codec: its values dequantized into that pool (DenseCodecKVCache);
- `compressed`: the codec's pages, open pages and sinks (CompressedKVCache), two extra slots: one
  for scoring (`LLMEngine.logits`), one for CUDA-graph padding rows.
"""

from __future__ import annotations

import torch

from zipserve.compress.codec import KVCodec
from zipserve.compress.compressed_cache import CompressedKVCache
from zipserve.engine.config import ModelConfig
from zipserve.engine.dense_codec_cache import DenseCodecKVCache
from zipserve.engine.kv_cache import KVCache
from zipserve.engine.paged_cache import PagedKVCache


def build_cache(
    codec: KVCodec,
    decode_kv: str,
    config: ModelConfig,
    num_pages: int,
    page_size: int,
    max_num_seqs: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> PagedKVCache:
    """The cache for `codec` under a resolved decode_kv ('dense' or 'compressed')."""
    if decode_kv == "dense":
        if codec.dense_pages:
            return KVCache(config, num_pages, page_size, dtype, device, codec=codec)
        return DenseCodecKVCache(codec, config, num_pages, page_size, dtype, device)
    return CompressedKVCache(codec, config, num_pages, page_size, max_num_seqs + 2, dtype, device)


def bytes_per_page(
    codec: KVCodec, decode_kv: str, config: ModelConfig, page_size: int, dtype: torch.dtype
) -> int:
    """Device bytes of one page of that cache over all KV layers (open-page slots apart)."""
    if decode_kv == "dense":
        return KVCache.bytes_per_page(config, page_size, dtype)
    return CompressedKVCache.bytes_per_page(codec, config, page_size)
