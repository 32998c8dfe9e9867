"""One build per spec inferred from a call's tensors, kept for the process."""
from __future__ import annotations

import functools

from ..kernels import DSAKernels, build
from ..spec import AttentionSpec, CacheSpec, IndexerSpec, Spec, TopKSpec


@functools.lru_cache(maxsize=64)
def kernels_for(index_heads: int = 64, index_dim: int = 128, index_dtype: str = "fp8_e4m3", topk: int = 2048,
                heads: int = 128, qk_dim: int = 576, v_dim: int = 512, page_size: int | None = None,
                backend: str = "triton") -> DSAKernels:
    """The build (Triton unless `backend` says otherwise) of the spec these numbers describe (the
    fields a call does not fix keep the DeepSeek-V3.2 values; they are not part of the kernels it runs)."""
    cache = CacheSpec(page_size=page_size) if page_size is not None else None
    spec = Spec(indexer=IndexerSpec(heads=index_heads, head_dim=index_dim, dtype=index_dtype),
                topk=TopKSpec(k=topk), attention=AttentionSpec(heads=heads, qk_dim=qk_dim, v_dim=v_dim),
                cache=cache, name="inferred from the call's tensors")
    return build(spec, backend)
