"""One build per spec inferred from a call's tensors, kept for the process."""
from __future__ import annotations

import functools
import re
from typing import Mapping

from ..errors import SpecError
from ..kernels import DSAKernels, build
from ..spec import AttentionSpec, CacheSpec, IndexerSpec, Spec, TopKSpec

# the spec field each of kernels_for's numbers becomes
SPEC_FIELDS = {"index_heads": "indexer.heads", "index_dim": "indexer.head_dim", "topk": "topk.k",
               "heads": "attention.heads", "qk_dim": "attention.qk_dim", "v_dim": "attention.v_dim",
               "page_size": "cache.page_size"}
_SPEC_FIELD = re.compile(r"\b(?:indexer|topk|attention|cache)\.[a-z_]+\b")


@functools.lru_cache(maxsize=64)
def kernels_for(index_heads: int = 64, index_dim: int = 128, index_dtype: str = "fp8_e4m3", topk: int = 2048,
                heads: int = 128, qk_dim: int = 576, v_dim: int = 512, page_size: int | None = None,
                backend: str = "triton", mla_format: str = "deepseek_v32_fp8") -> DSAKernels:
    """The build (Triton unless `backend` says otherwise) of the spec these numbers describe (the
    fields a call does not fix keep the DeepSeek-V3.2 values; they are not part of the kernels it runs)."""
    cache = CacheSpec(page_size=page_size, mla_format=mla_format) if page_size is not None else None
    spec = Spec(indexer=IndexerSpec(heads=index_heads, head_dim=index_dim, dtype=index_dtype),
                topk=TopKSpec(k=topk), attention=AttentionSpec(heads=heads, qk_dim=qk_dim, v_dim=v_dim),
                cache=cache, name="inferred from the call's tensors")
    return build(spec, backend)


def kernels_for_call(fn: str, said: Mapping[str, str], **numbers) -> DSAKernels:
    """kernels_for(**numbers) for the compat function `fn`. The caller wrote tensors, not a spec,
    so a spec its shapes cannot make is reported in the caller's words: `said` maps each number
    given to the caller's expression for it ({"heads": "h_q (q.shape[2])"})."""
    try:
        return kernels_for(**numbers)
    except SpecError as exc:
        words = {SPEC_FIELDS[name]: expression for name, expression in said.items()}
        text = _SPEC_FIELD.sub(lambda m: words.get(m[0], m[0]), str(exc))
        raise ValueError(f"{fn}: {text}") from None
