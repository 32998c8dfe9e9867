"""The argument checks of dsagen.compat's drop-in entry points.

Each bad argument gets one error, raised before anything is built or launched: TypeError for a
value of the wrong Python type, ValueError for a wrong dtype, shape, device or value, RuntimeError
for inputs that require grad (the peers have no backward). The message starts with the compat
function's name and names the caller's argument (or the expression of it at fault, q.shape[2]),
never a spec field (attention.heads, cache.mla_format) nor a kernel's own argument name. The
integers the peers take as host ints accept NumPy integers and 0-d integer tensors, never a bool.

Only the positive cases launch kernels (small shapes); every refused call fails in the checks.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from dsagen import reference
from dsagen.cache_formats import pack_index_pages
from dsagen.compat import deep_gemm, flash_mla
from dsagen.ops.paged_indexer_workload import paged_indexer_reference
from dsagen.verify import assert_close

FP8, BF16, I32 = torch.float8_e4m3fn, torch.bfloat16, torch.int32
# what the caller never wrote: spec fields, the kernels' own argument names, the kernels' wording
NOT_THE_CALLERS = re.compile(r"\b(?:indexer|topk|attention|cache)\.[a-z_]+|\bindex_cache\b|\bmla_cache\b|"
                             r"output buffers|\bdsagen\.(?:indexer|paged_indexer|sparse_decode|sparse_attention)\b")


def mqa_args(dev) -> dict:
    """fp8_mqa_logits: M=4 queries, H=2 heads, D=16, N=6 keys."""
    return dict(q=torch.zeros(4, 2, 16, device=dev).to(FP8),
                kv=(torch.zeros(6, 16, device=dev).to(FP8), torch.ones(6, device=dev)),
                weights=torch.zeros(4, 2, device=dev), cu_seqlen_ks=torch.zeros(4, dtype=I32, device=dev),
                cu_seqlen_ke=torch.full((4,), 6, dtype=I32, device=dev), clean_logits=True)


def metadata_args(dev) -> dict:
    return dict(context_lens=torch.tensor([7, 3], dtype=I32, device=dev), block_size=4, num_sms=4)


def paged_args(dev) -> dict:
    """fp8_paged_mqa_logits: B=2 requests, next_n=1, H=2, D=16, blocks of 4 tokens."""
    return dict(q=torch.zeros(2, 1, 2, 16, device=dev).to(FP8),
                kv_cache=torch.zeros(4, 4, 1, 20, dtype=torch.uint8, device=dev),
                weights=torch.zeros(2, 2, device=dev), context_lens=torch.tensor([7, 3], dtype=I32, device=dev),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=I32, device=dev),
                schedule_metadata=torch.zeros(5, 2, dtype=I32, device=dev), max_context_len=8, clean_logits=True)


def kvcache_args(dev) -> dict:
    """flash_mla_with_kvcache: b=2, s_q=1, h_q=2, 4 pages of 16 tokens, topk 5."""
    return dict(q=torch.zeros(2, 1, 2, 576, dtype=BF16, device=dev),
                k_cache=torch.zeros(4, 16, 1, 656, dtype=torch.uint8, device=dev), block_table=None,
                cache_seqlens=None, head_dim_v=512, tile_scheduler_metadata=flash_mla.get_mla_metadata()[0],
                num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=True,
                indices=torch.zeros(2, 1, 5, dtype=I32, device=dev))


def sparse_args(dev) -> dict:
    """flash_mla_sparse_fwd: s_q=2, h_q=4, d_qk=576, 10 kv rows, topk 8."""
    return dict(q=torch.zeros(2, 4, 576, dtype=BF16, device=dev), kv=torch.zeros(10, 1, 576, dtype=BF16, device=dev),
                indices=torch.zeros(2, 1, 8, dtype=I32, device=dev), sm_scale=0.1)


CALLS = {
    "fp8_mqa_logits": (deep_gemm.fp8_mqa_logits, mqa_args),
    "get_paged_mqa_logits_metadata": (deep_gemm.get_paged_mqa_logits_metadata, metadata_args),
    "fp8_paged_mqa_logits": (deep_gemm.fp8_paged_mqa_logits, paged_args),
    "flash_mla_with_kvcache": (flash_mla.flash_mla_with_kvcache, kvcache_args),
    "flash_mla_sparse_fwd": (flash_mla.flash_mla_sparse_fwd, sparse_args),
}


def case(fn: str, what: str, change, error: type, says: str):
    """One bad argument: `change(args, device)` returns the arguments replaced; the call raises
    exactly `error`, whose message contains `says`."""
    return pytest.param(fn, change, error, says, id=f"{fn}-{what}")


def fp8(*shape):
    return lambda dev: torch.zeros(*shape, device=dev).to(FP8)


def grad(t: torch.Tensor) -> torch.Tensor:
    """A copy of a floating-point input that requires grad."""
    return t.detach().clone().requires_grad_()


def misaligned_cache(dev) -> torch.Tensor:
    """A [4, 16, 1, 656] uint8 cache starting 2 bytes into its storage."""
    return torch.zeros(4 * 16 * 656 + 2, dtype=torch.uint8, device=dev)[2:].view(4, 16, 1, 656)


def unpacked_index_cache(dev) -> torch.Tensor:
    """A [4, 4, 1, 20] uint8 cache whose tokens are 24 bytes apart."""
    return torch.zeros(4, 4, 1, 24, dtype=torch.uint8, device=dev)[..., :20]


BAD = [
    # fp8_mqa_logits
    case("fp8_mqa_logits", "kv-a-tensor", lambda a, d: {"kv": a["kv"][0]}, TypeError,
         "kv must be a (k, k_scale) tuple, got Tensor"),
    case("fp8_mqa_logits", "kv-three-tensors", lambda a, d: {"kv": (*a["kv"], a["kv"][1])}, TypeError,
         "kv must be a (k, k_scale) tuple"),
    case("fp8_mqa_logits", "q-a-list", lambda a, d: {"q": [[0.0]]}, TypeError, "q must be a torch.Tensor"),
    case("fp8_mqa_logits", "q-bf16", lambda a, d: {"q": a["q"].to(BF16)}, ValueError, "q must have dtype"),
    case("fp8_mqa_logits", "q-2d", lambda a, d: {"q": a["q"][0]}, ValueError, "q must have shape"),
    case("fp8_mqa_logits", "k-bf16", lambda a, d: {"kv": (a["kv"][0].to(BF16), a["kv"][1])}, ValueError,
         "kv[0] (k) must have dtype"),
    case("fp8_mqa_logits", "k-head-dim-not-q's", lambda a, d: {"kv": (fp8(6, 8)(d), a["kv"][1])}, ValueError,
         "kv[0] (k) must have shape"),
    case("fp8_mqa_logits", "k_scale-too-short", lambda a, d: {"kv": (a["kv"][0], a["kv"][1][:5])}, ValueError,
         "kv[1] (k_scale) must have shape"),
    case("fp8_mqa_logits", "k_scale-a-list", lambda a, d: {"kv": (a["kv"][0], [1.0] * 6)}, TypeError,
         "kv[1] (k_scale) must be a torch.Tensor"),
    case("fp8_mqa_logits", "weights-heads-not-q's", lambda a, d: {"weights": a["weights"][:, :1]}, ValueError,
         "weights must have shape"),
    case("fp8_mqa_logits", "cu_seqlen_ks-int64", lambda a, d: {"cu_seqlen_ks": a["cu_seqlen_ks"].long()},
         ValueError, "cu_seqlen_ks must have dtype"),
    case("fp8_mqa_logits", "cu_seqlen_ke-too-short", lambda a, d: {"cu_seqlen_ke": a["cu_seqlen_ke"][:3]},
         ValueError, "cu_seqlen_ke must have shape"),
    case("fp8_mqa_logits", "clean_logits-None", lambda a, d: {"clean_logits": None}, TypeError,
         "clean_logits must be True or False"),
    case("fp8_mqa_logits", "no-heads", lambda a, d: {"q": a["q"][:, :0], "weights": a["weights"][:, :0]},
         ValueError, "H (q.shape[1]) must be >= 1"),
    case("fp8_mqa_logits", "too-many-heads",
         lambda a, d: {"q": fp8(4, 2000, 16)(d), "weights": torch.zeros(4, 2000, device=d)}, ValueError,
         "H (q.shape[1])=2000 is out of range"),
    case("fp8_mqa_logits", "head-dim-300",
         lambda a, d: {"q": fp8(4, 2, 300)(d), "kv": (fp8(6, 300)(d), a["kv"][1])}, ValueError,
         "D (q.shape[2])=300 is out of range"),
    case("fp8_mqa_logits", "weights-requires-grad", lambda a, d: {"weights": grad(a["weights"])}, RuntimeError,
         "fp8_mqa_logits has no backward, but weights requires grad"),
    # get_paged_mqa_logits_metadata
    case("get_paged_mqa_logits_metadata", "context_lens-a-list", lambda a, d: {"context_lens": [7, 3]}, TypeError,
         "context_lens must be a torch.Tensor"),
    case("get_paged_mqa_logits_metadata", "context_lens-int64",
         lambda a, d: {"context_lens": a["context_lens"].long()}, ValueError, "context_lens must have dtype"),
    case("get_paged_mqa_logits_metadata", "block_size-0", lambda a, d: {"block_size": 0}, ValueError,
         "block_size must be a positive int, got 0"),
    case("get_paged_mqa_logits_metadata", "block_size-str", lambda a, d: {"block_size": "x"}, TypeError,
         "block_size must be a positive int"),
    case("get_paged_mqa_logits_metadata", "block_size-float", lambda a, d: {"block_size": 64.0}, TypeError,
         "block_size must be a positive int"),
    case("get_paged_mqa_logits_metadata", "block_size-past-the-bound", lambda a, d: {"block_size": 2**20 + 1},
         ValueError, "block_size=1048577 must be an int from 1 to 1048576"),
    case("get_paged_mqa_logits_metadata", "num_sms-True", lambda a, d: {"num_sms": True}, TypeError,
         "num_sms must be a positive int"),
    case("get_paged_mqa_logits_metadata", "num_sms-0", lambda a, d: {"num_sms": 0}, ValueError,
         "num_sms must be a positive int, got 0"),
    # fp8_paged_mqa_logits
    case("fp8_paged_mqa_logits", "q-3d", lambda a, d: {"q": a["q"][0]}, ValueError, "q must have shape"),
    case("fp8_paged_mqa_logits", "q-bf16", lambda a, d: {"q": a["q"].to(BF16)}, ValueError, "q must have dtype"),
    case("fp8_paged_mqa_logits", "kv_cache-a-list", lambda a, d: {"kv_cache": [0]}, TypeError,
         "kv_cache must be a torch.Tensor"),
    case("fp8_paged_mqa_logits", "kv_cache-int8", lambda a, d: {"kv_cache": a["kv_cache"].view(torch.int8)},
         ValueError, "kv_cache must have dtype"),
    case("fp8_paged_mqa_logits", "kv_cache-row-not-D+4",
         lambda a, d: {"kv_cache": torch.zeros(4, 4, 1, 21, dtype=torch.uint8, device=d)}, ValueError,
         "kv_cache must have shape"),
    case("fp8_paged_mqa_logits", "kv_cache-blocks-past-the-bound",
         lambda a, d: {"kv_cache": torch.zeros(1, 2**20 + 1, 1, 20, dtype=torch.uint8, device=d)}, ValueError,
         "block_size (kv_cache.shape[1])=1048577 must be an int from 1 to 1048576"),
    case("fp8_paged_mqa_logits", "kv_cache-not-packed", lambda a, d: {"kv_cache": unpacked_index_cache(d)},
         ValueError, "kv_cache must be packed within each block"),
    case("fp8_paged_mqa_logits", "weights-rows-not-B*next_n", lambda a, d: {"weights": a["weights"][:1]},
         ValueError, "weights must have shape"),
    case("fp8_paged_mqa_logits", "context_lens-a-list", lambda a, d: {"context_lens": [7, 3]}, TypeError,
         "context_lens must be a torch.Tensor"),
    case("fp8_paged_mqa_logits", "context_lens-int64", lambda a, d: {"context_lens": a["context_lens"].long()},
         ValueError, "context_lens must have dtype"),
    case("fp8_paged_mqa_logits", "block_table-1d", lambda a, d: {"block_table": a["block_table"][0]}, ValueError,
         "block_table must have shape"),
    case("fp8_paged_mqa_logits", "schedule_metadata-None", lambda a, d: {"schedule_metadata": None}, TypeError,
         "schedule_metadata must be a torch.Tensor"),
    case("fp8_paged_mqa_logits", "schedule_metadata-3-columns",
         lambda a, d: {"schedule_metadata": torch.zeros(5, 3, dtype=I32, device=d)}, ValueError,
         "schedule_metadata must have shape"),
    case("fp8_paged_mqa_logits", "max_context_len-True", lambda a, d: {"max_context_len": True}, TypeError,
         "max_context_len must be a non-negative int"),
    case("fp8_paged_mqa_logits", "max_context_len-negative", lambda a, d: {"max_context_len": -1}, ValueError,
         "max_context_len must be a non-negative int, got -1"),
    case("fp8_paged_mqa_logits", "max_context_len-float", lambda a, d: {"max_context_len": 8.0}, TypeError,
         "max_context_len must be a non-negative int"),
    case("fp8_paged_mqa_logits", "max_context_len-float-0d-tensor",
         lambda a, d: {"max_context_len": torch.tensor(8.0, device=d)}, TypeError,
         "max_context_len must be a non-negative int"),
    case("fp8_paged_mqa_logits", "max_context_len-bool-0d-tensor",
         lambda a, d: {"max_context_len": torch.tensor(True, device=d)}, TypeError,
         "max_context_len must be a non-negative int"),
    case("fp8_paged_mqa_logits", "max_context_len-1d-tensor",
         lambda a, d: {"max_context_len": torch.tensor([8], device=d)}, TypeError,
         "max_context_len must be a non-negative int"),
    case("fp8_paged_mqa_logits", "max_context_len-numpy-negative",
         lambda a, d: {"max_context_len": np.int64(-3)}, ValueError, "max_context_len must be a non-negative int"),
    case("fp8_paged_mqa_logits", "clean_logits-str", lambda a, d: {"clean_logits": "yes"}, TypeError,
         "clean_logits must be True or False"),
    case("fp8_paged_mqa_logits", "next_n-0", lambda a, d: {"q": a["q"][:, :0], "weights": a["weights"][:0]},
         ValueError, "next_n (q.shape[1]) must be >= 1"),
    case("fp8_paged_mqa_logits", "no-heads", lambda a, d: {"q": a["q"][:, :, :0], "weights": a["weights"][:, :0]},
         ValueError, "H (q.shape[2]) must be >= 1"),
    case("fp8_paged_mqa_logits", "head-dim-300",
         lambda a, d: {"q": fp8(2, 1, 2, 300)(d), "kv_cache": torch.zeros(4, 4, 1, 304, dtype=torch.uint8, device=d)},
         ValueError, "D (q.shape[3])=300 is out of range"),
    case("fp8_paged_mqa_logits", "weights-requires-grad", lambda a, d: {"weights": grad(a["weights"])},
         RuntimeError, "fp8_paged_mqa_logits has no backward, but weights requires grad"),
    # flash_mla_with_kvcache
    case("flash_mla_with_kvcache", "is_fp8_kvcache-False", lambda a, d: {"is_fp8_kvcache": False}, ValueError,
         "is_fp8_kvcache=True"),
    case("flash_mla_with_kvcache", "indices-None", lambda a, d: {"indices": None}, ValueError, "pass indices"),
    case("flash_mla_with_kvcache", "causal-True", lambda a, d: {"causal": True}, ValueError, "causal=False"),
    case("flash_mla_with_kvcache", "causal-str", lambda a, d: {"causal": "no"}, TypeError,
         "causal must be True or False"),
    case("flash_mla_with_kvcache", "head_dim_v-256", lambda a, d: {"head_dim_v": 256}, ValueError,
         "head_dim_v=256: must be 512"),
    case("flash_mla_with_kvcache", "head_dim_v-str", lambda a, d: {"head_dim_v": "512"}, TypeError,
         "head_dim_v must be a positive int"),
    case("flash_mla_with_kvcache", "tile_scheduler_metadata-None", lambda a, d: {"tile_scheduler_metadata": None},
         TypeError, "tile_scheduler_metadata must come from"),
    case("flash_mla_with_kvcache", "num_splits-a-tensor",
         lambda a, d: {"num_splits": torch.zeros(3, dtype=I32, device=d)}, ValueError, "num_splits must be None"),
    case("flash_mla_with_kvcache", "block_table-a-list", lambda a, d: {"block_table": [[0]]}, TypeError,
         "block_table must be None or a torch.Tensor"),
    case("flash_mla_with_kvcache", "cache_seqlens-str", lambda a, d: {"cache_seqlens": "x"}, TypeError,
         "cache_seqlens must be None or a torch.Tensor"),
    case("flash_mla_with_kvcache", "q-fp16", lambda a, d: {"q": a["q"].half()}, ValueError, "q must have dtype"),
    case("flash_mla_with_kvcache", "q-3d", lambda a, d: {"q": a["q"][0]}, ValueError, "q must have shape"),
    case("flash_mla_with_kvcache", "d_qk-512", lambda a, d: {"q": a["q"][..., :512]}, ValueError,
         "q.shape[-1] (d_qk) must be 576"),
    case("flash_mla_with_kvcache", "no-heads", lambda a, d: {"q": a["q"][:, :, :0]}, ValueError,
         "h_q (q.shape[2]) must be >= 1"),
    case("flash_mla_with_kvcache", "too-many-heads",
         lambda a, d: {"q": torch.zeros(2, 1, 2000, 576, dtype=BF16, device=d)}, ValueError,
         "h_q (q.shape[2])=2000 is out of range"),
    case("flash_mla_with_kvcache", "k_cache-a-list", lambda a, d: {"k_cache": [0]}, TypeError,
         "k_cache must be a torch.Tensor"),
    case("flash_mla_with_kvcache", "k_cache-fp32", lambda a, d: {"k_cache": a["k_cache"].float()}, ValueError,
         "k_cache must have dtype"),
    case("flash_mla_with_kvcache", "k_cache-rows-of-600",
         lambda a, d: {"k_cache": a["k_cache"][..., :600]}, ValueError, "k_cache must have shape"),
    case("flash_mla_with_kvcache", "k_cache-pages-of-0",
         lambda a, d: {"k_cache": torch.zeros(2, 0, 1, 656, dtype=torch.uint8, device=d)}, ValueError,
         "page_size (k_cache.shape[1]) must be >= 1"),
    case("flash_mla_with_kvcache", "k_cache-misaligned", lambda a, d: {"k_cache": misaligned_cache(d)}, ValueError,
         "k_cache rows must start at multiples of 4 bytes"),
    case("flash_mla_with_kvcache", "indices-int64", lambda a, d: {"indices": a["indices"].long()}, ValueError,
         "indices must have dtype"),
    case("flash_mla_with_kvcache", "indices-batch-not-q's", lambda a, d: {"indices": a["indices"][:1]},
         ValueError, "indices must have shape"),
    case("flash_mla_with_kvcache", "topk-too-large",
         lambda a, d: {"indices": torch.zeros(2, 1, 2**20 + 1, dtype=I32, device=d)}, ValueError,
         "topk (indices.shape[-1])=1048577 is out of range"),
    case("flash_mla_with_kvcache", "softmax_scale-negative", lambda a, d: {"softmax_scale": -1.0}, ValueError,
         "softmax_scale=-1.0 must be a finite number > 0"),
    case("flash_mla_with_kvcache", "softmax_scale-str", lambda a, d: {"softmax_scale": "x"}, TypeError,
         "softmax_scale must be a finite number > 0"),
    case("flash_mla_with_kvcache", "q-requires-grad", lambda a, d: {"q": grad(a["q"])}, RuntimeError,
         "flash_mla_with_kvcache has no backward, but q requires grad"),
    # flash_mla_sparse_fwd
    case("flash_mla_sparse_fwd", "attn_sink-per-token", lambda a, d: {"attn_sink": torch.zeros(2, 4, device=d)},
         ValueError, "attn_sink must have shape [4]"),
    case("flash_mla_sparse_fwd", "d_v-256", lambda a, d: {"d_v": 256}, ValueError, "d_v=256: must be 512"),
    case("flash_mla_sparse_fwd", "d_v-float", lambda a, d: {"d_v": 512.0}, TypeError, "d_v must be a positive int"),
    case("flash_mla_sparse_fwd", "q-fp16", lambda a, d: {"q": a["q"].half()}, ValueError, "q must have dtype"),
    case("flash_mla_sparse_fwd", "q-2d", lambda a, d: {"q": a["q"][0]}, ValueError, "q must have shape"),
    case("flash_mla_sparse_fwd", "d_qk-128", lambda a, d: {"q": a["q"][..., :128]}, ValueError,
         "q.shape[-1] (d_qk) must be 576 (512 latent + 64 rope) or 512"),
    case("flash_mla_sparse_fwd", "no-heads", lambda a, d: {"q": a["q"][:, :0]}, ValueError,
         "h_q (q.shape[1]) must be >= 1"),
    case("flash_mla_sparse_fwd", "no-heads-and-topk-0",
         lambda a, d: {"q": a["q"][:, :0], "indices": a["indices"][..., :0]}, ValueError,
         "h_q (q.shape[1]) must be >= 1"),
    case("flash_mla_sparse_fwd", "too-many-heads",
         lambda a, d: {"q": torch.zeros(2, 2000, 576, dtype=BF16, device=d)}, ValueError,
         "h_q (q.shape[1])=2000 is out of range"),
    case("flash_mla_sparse_fwd", "kv-two-heads",
         lambda a, d: {"kv": torch.zeros(10, 2, 576, dtype=BF16, device=d)}, ValueError, "kv must have shape"),
    case("flash_mla_sparse_fwd", "kv-d_qk-not-q's", lambda a, d: {"kv": a["kv"][..., :512]}, ValueError,
         "kv must have shape"),
    case("flash_mla_sparse_fwd", "kv-fp32", lambda a, d: {"kv": a["kv"].float()}, ValueError,
         "kv must have dtype"),
    case("flash_mla_sparse_fwd", "kv-a-list", lambda a, d: {"kv": [0.0]}, TypeError, "kv must be a torch.Tensor"),
    case("flash_mla_sparse_fwd", "indices-int64", lambda a, d: {"indices": a["indices"].long()}, ValueError,
         "indices must have dtype"),
    case("flash_mla_sparse_fwd", "indices-s_q-not-q's", lambda a, d: {"indices": a["indices"][:1]}, ValueError,
         "indices must have shape"),
    case("flash_mla_sparse_fwd", "indices-2d", lambda a, d: {"indices": a["indices"][:, 0]}, ValueError,
         "indices must have shape"),
    case("flash_mla_sparse_fwd", "topk-too-large",
         lambda a, d: {"indices": torch.zeros(2, 1, 2**20 + 1, dtype=I32, device=d)}, ValueError,
         "topk (indices.shape[-1])=1048577 is out of range"),
    case("flash_mla_sparse_fwd", "topk_length-int64",
         lambda a, d: {"topk_length": torch.zeros(2, dtype=torch.int64, device=d)}, ValueError,
         "topk_length must have dtype"),
    case("flash_mla_sparse_fwd", "topk_length-too-long",
         lambda a, d: {"topk_length": torch.zeros(3, dtype=I32, device=d)}, ValueError, "topk_length must have shape"),
    case("flash_mla_sparse_fwd", "topk_length-a-list", lambda a, d: {"topk_length": [1, 2]}, TypeError,
         "topk_length must be a torch.Tensor"),
    case("flash_mla_sparse_fwd", "sm_scale-nan", lambda a, d: {"sm_scale": math.nan}, ValueError,
         "sm_scale=nan must be a finite number > 0"),
    case("flash_mla_sparse_fwd", "sm_scale-str", lambda a, d: {"sm_scale": "0.1"}, TypeError,
         "sm_scale must be a finite number > 0"),
    case("flash_mla_sparse_fwd", "backend-cuda", lambda a, d: {"backend": "cuda"}, ValueError,
         "backend='cuda' is not supported"),
    case("flash_mla_sparse_fwd", "q-requires-grad", lambda a, d: {"q": grad(a["q"])}, RuntimeError,
         "flash_mla_sparse_fwd has no backward, but q requires grad: call it under torch.no_grad()"),
    case("flash_mla_sparse_fwd", "kv-requires-grad", lambda a, d: {"kv": grad(a["kv"])}, RuntimeError,
         "flash_mla_sparse_fwd has no backward, but kv requires grad"),
]


@pytest.mark.parametrize("fn,change,error,says", BAD)
def test_a_bad_argument_is_named_in_the_callers_words(device, fn, change, error, says):
    call, make_args = CALLS[fn]
    args = make_args(device)
    args |= change(args, device)
    with pytest.raises(Exception) as info:
        call(**args)
    message = str(info.value)
    assert type(info.value) is error, f"{type(info.value).__name__}: {message}"
    assert message.startswith(fn), message
    assert says in message, message
    assert "\n" not in message and not NOT_THE_CALLERS.search(message), message


def test_inputs_requiring_grad_run_under_no_grad(device, gen):
    """FlashMLA has no backward; under torch.no_grad() inputs that require grad are simply read."""
    s_q, h_q, s_kv, topk = 2, 2, 12, 4
    q = torch.randn(s_q, h_q, 576, generator=gen).bfloat16()
    kv = torch.randn(s_kv, 1, 576, generator=gen).bfloat16()
    idx = torch.randint(-1, s_kv + 1, (s_q, 1, topk), generator=gen, dtype=I32)
    with torch.no_grad():
        out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q.to(device).requires_grad_(),
                                                              kv.to(device).requires_grad_(), idx.to(device), 0.05)
    assert not (out.requires_grad or max_logits.requires_grad or lse.requires_grad)
    ref_out, ref_lse = reference.sparse_attention(q, kv[:, 0], idx[:, 0], 0.05, 512)
    assert_close("sparse_attention.out", out, ref_out)
    assert_close("sparse_attention.lse", lse, ref_lse)


def test_metadata_object_reused_at_another_shape(device):
    """The first call fixes the metadata's shapes (topk 0: no kernel runs; every query gets out 0
    and lse +inf); a call at another batch size is refused."""
    args = kvcache_args(device) | {"indices": torch.zeros(2, 1, 0, dtype=I32, device=device)}
    out, lse = flash_mla.flash_mla_with_kvcache(**args)
    assert out.shape == (2, 1, 2, 512) and (out == 0).all() and lse.shape == (2, 2, 1) and torch.isposinf(lse).all()
    with pytest.raises(ValueError, match="flash_mla_with_kvcache: tile_scheduler_metadata was made for"):
        flash_mla.flash_mla_with_kvcache(**args | {"q": args["q"][:1], "indices": args["indices"][:1]})


@pytest.mark.parametrize("number", [np.int64(4), torch.tensor(4), np.int32(4)], ids=["numpy-int64", "0d-tensor",
                                                                                     "numpy-int32"])
def test_metadata_takes_host_integers(device, number):
    meta = deep_gemm.get_paged_mqa_logits_metadata(metadata_args(device)["context_lens"], number, number)
    assert meta.shape == (5, 2) and meta.dtype == I32 and meta.device.type == device.type


def paged_case(gen, device):
    """Two requests of 7 and 3 tokens (next_n 2) over shuffled pages of 4 tokens, D 16, H 2."""
    page, D, H, next_n = 4, 16, 2, 2
    keys = (torch.randn(5 * page, D, generator=gen) * 8).to(FP8)
    scales = torch.exp2(torch.randint(-2, 3, (5 * page,), generator=gen).float())
    cache = pack_index_pages(keys, scales, page)
    table = torch.randperm(5, generator=gen)[:4].reshape(2, 2).int()
    q = (torch.randn(2, next_n, H, D, generator=gen) * 4).to(FP8)
    weights = torch.randn(2 * next_n, H, generator=gen)
    lens = torch.tensor([7, 3], dtype=I32)
    return [t.to(device) for t in (q, cache, weights, lens, table)]


@pytest.mark.parametrize("max_context_len", [np.int64(6), torch.tensor(11)], ids=["numpy-int64-crops",
                                                                                  "0d-tensor-pads"])
def test_max_context_len_takes_host_integers(device, gen, max_context_len):
    """np.int64 and a 0-d integer tensor are read as host ints: the logits cropped or padded with
    -inf to that width, the rest the float64 math."""
    q, cache, weights, lens, table = paged_case(gen, device)
    meta = deep_gemm.get_paged_mqa_logits_metadata(lens, 4, 8)
    got = deep_gemm.fp8_paged_mqa_logits(q, cache, weights, lens, table, meta, max_context_len)
    width = int(max_context_len)
    ref = paged_indexer_reference(q, cache, weights, lens, table)  # [4, 8]
    want = torch.full((4, width), -math.inf, dtype=torch.float64)
    want[:, :min(width, 8)] = ref[:, :width]
    assert_close("indexer.logits.fp8_e4m3", got, want)
