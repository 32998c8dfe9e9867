"""Training the lightning indexer (DeepSeek-V3.2): the KL loss between the main attention's
distribution over each query's selected keys and the indexer's softmax over the same keys.

For query t with selected keys S_t (its row of indices; entries < 0 or >= SKV are invalid):
  I[t, s]   = sum_j w[t, j] * relu(iq[t, j] . ik[s])                        (indexer logits)
  m[t, s]   = sum_h exp(sm_scale * aq[t, h] . akv[s] - alse[t, h])         (attention mass)
  p[t, s]   = m[t, s] / sum_{s' in S_t} m[t, s']                            (the target)
  loss[t]   = sum_s p log p - sum_s p * log_softmax_{S_t}(I[t])[s]
The target is recomputed from the attention's inputs and its lse and is detached: no gradient
flows into aq, akv or alse. Every slot of a row counts once (a repeated index counts twice, as in
the sparse attention). A row whose target is undefined (no valid index, or no attention mass on
its keys) has loss 0 and zero gradients; index_lse is +inf for a row with no valid index (the
attention's convention: exp(I - index_lse) is then 0).

This module holds the forward op and what the backward op (indexer_loss_bwd) shares with it: the
argument checks, the workload inputs, the naive PyTorch version and the dense warm-up indices.
"""
from __future__ import annotations

import torch

from ..plan import SKV, Cost, S, next_pow2
from .base import Call, Gradient, Op
from .checks import check_out, check_tensor, softmax_scale
from .shared import SM_SCALE
from .signature import Signature, tensor

# the eight arguments the loss and its backward start with
LOSS_ARGS = (tensor("iq"), tensor("ik"), tensor("weights"), tensor("aq"), tensor("akv"), tensor("alse"),
             tensor("indices"), SM_SCALE)

TRAINING_ONLY = ("{kernel} trains the indexer and needs a bf16 indexer (indexer.dtype = \"bf16\", as in "
                 "specs/deepseek_v32_training.toml); this spec's indexer is {dtype}, which is inference-only")


def training_problem(spec, kernel: str) -> str | None:
    """Why `spec` cannot run the indexer's training kernels (an fp8 indexer), else None."""
    if spec.indexer.dtype != "bf16" or spec.attention.dtype != "bf16":
        return TRAINING_ONLY.format(kernel=kernel, dtype=spec.indexer.dtype)
    return None


def require_training_spec(spec, kernel: str) -> None:
    """Raise ValueError with the reason where a user could reach the kernel with an fp8 spec."""
    problem = training_problem(spec, kernel)
    if problem:
        raise ValueError(problem)


def dense_window_indices(ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """int32 [S, widest window]: row t lists ks[t], ..., ke[t] - 1 in order, then -1.

    The dense warm-up stage of V3.2 trains the indexer against dense attention over each query's
    whole causal window; with these indices the same sparse kernels compute that loss."""
    if ks.shape != ke.shape or ks.dim() != 1:
        raise ValueError(f"ks and ke must be 1-D of the same length, got {list(ks.shape)} and {list(ke.shape)}")
    lo = ks.long().clamp(min=0)
    n = (ke.long() - lo).clamp(min=0)
    width = int(n.max()) if n.numel() else 0
    cols = torch.arange(width, device=ks.device)[None, :]
    idx = lo[:, None] + cols
    return torch.where(cols < n[:, None], idx, -1).to(torch.int32)


# -- checks shared by the forward and the backward ---------------------------------------------------------

def check_loss_inputs(spec, kernel, iq, ik, weights, aq, akv, alse, indices, sm_scale):
    """The eight arguments both ops start with: (device, S, SKV), or ValueError naming the bad one."""
    require_training_spec(spec, kernel)
    ix, at = spec.indexer, spec.attention
    check_tensor("iq", iq, torch.bfloat16, (None, ix.heads, ix.head_dim))
    dev, n_q = iq.device, iq.shape[0]
    check_tensor("ik", ik, torch.bfloat16, (None, ix.head_dim), dev)
    n_kv = ik.shape[0]
    check_tensor("weights", weights, torch.float32, (n_q, ix.heads), dev)
    check_tensor("aq", aq, torch.bfloat16, (n_q, at.heads, at.qk_dim), dev)
    check_tensor("akv", akv, torch.bfloat16, (n_kv, at.qk_dim), dev)
    check_tensor("alse", alse, torch.float32, (n_q, at.heads), dev)
    check_tensor("indices", indices, torch.int32, (n_q, None), dev)
    softmax_scale(spec, sm_scale)
    if n_kv >= 2**31 - 1:
        raise ValueError(f"ik has {n_kv} rows: int32 indices address at most 2**31 - 2")
    return dev, n_q, n_kv


# -- cost ----------------------------------------------------------------------------------------------------

def input_bytes(spec):
    """Every input of the forward read once (each selected key row at most once)."""
    ix, at, k = spec.indexer, spec.attention, spec.topk.k
    return (S * ix.heads * ix.head_dim * 2 + SKV * ix.head_dim * 2 + S * ix.heads * 4  # iq, ik, w
            + S * at.heads * at.qk_dim * 2 + SKV * at.qk_dim * 2 + S * at.heads * 4  # aq, akv, alse
            + S * k * 4)  # indices


def loss_symbols(spec) -> dict[str, int]:
    """The numbers both ops' schedule files are written in."""
    ix, at = spec.indexer, spec.attention
    return {"heads": at.heads, "heads_pad": next_pow2(at.heads), "dqk_pad": next_pow2(at.qk_dim, 16),
            "index_heads_pad": next_pow2(ix.heads, 16), "di_pad": next_pow2(ix.head_dim, 16)}


def loss_fields(spec) -> dict:
    """What the math of both ops reads (the tuning database's key)."""
    ix, at = spec.indexer, spec.attention
    return {"heads": at.heads, "qk_dim": at.qk_dim, "index_heads": ix.heads, "index_head_dim": ix.head_dim,
            "index_dtype": ix.dtype, "topk": spec.topk.k}


def loss_derived(spec, kernel: str, backend: str) -> dict:
    """Padded tile sizes; rendering for an fp8 spec stops here with the reason."""
    require_training_spec(spec, kernel)
    ix = spec.indexer
    if backend != "triton":
        return {}
    return {"hi_pad": next_pow2(ix.heads, 16), "di_pad": next_pow2(ix.head_dim, 16)}


class IndexerLossFamily(Op):
    """What the loss and its backward share: a bf16-indexer spec, the fields and symbols of both the
    indexer and the attention whose distribution it learns, the templates' derived sizes."""
    backends = ("triton", "tvm")
    short_names = {"block_n": "n", "block_h": "bh", "block_d": "bd", "num_warps": "w", "num_stages": "s"}

    def unavailable(self, spec, backend):
        return super().unavailable(spec, backend) or training_problem(spec, self.name)

    def semantic_fields(self, spec):
        return loss_fields(spec)

    def module_stem(self, spec):
        ix, at = spec.indexer, spec.attention
        return f"{self.name}_hi{ix.heads}_di{ix.head_dim}_h{at.heads}_dqk{at.qk_dim}"

    def derived(self, spec, point, backend):
        return loss_derived(spec, self.name, backend)

    def problem_symbols(self, spec):
        return loss_symbols(spec)


def loss_backward_args(inputs, outputs, grads) -> tuple:
    return (*(inputs[a.name] for a in LOSS_ARGS), outputs["index_lse"], grads["loss"])


def loss_input_gradients(bwd_outputs) -> dict:
    d_iq, d_ik, d_weights = bwd_outputs
    return {"iq": d_iq, "ik": d_ik, "weights": d_weights}


class IndexerLossOp(IndexerLossFamily):
    name = "indexer_loss"
    position = 90
    summary = ("indexer training loss: per-query KL(attention mass || indexer softmax) over the selected keys, "
               "and the indexer's logsumexp (bf16 indexer)")
    doc = ("(loss [S] fp32, index_lse [S] fp32): V3.2's indexer training loss per query,\n"
           "KL(p || softmax of the indexer logits) over the row's selected keys, where p is the main\n"
           "attention's probability mass (aq, akv, alse: its q, kv and lse, read as constants) summed\n"
           "over heads and normalized. Differentiable in iq, ik and weights (indexer_loss_bwd). For the\n"
           "dense warm-up, pass indices = dsagen.dense_window_indices(ks, ke).")
    signature = Signature(LOSS_ARGS, returns=("loss", "index_lse"))
    # gradients flow to the indexer's q, k and weights; the attention's inputs are the target's
    # (V3.2 detaches them), and index_lse is a statistic saved for the backward
    gradient = Gradient("indexer_loss_bwd", ("index_lse",), loss_backward_args, loss_input_gradients)

    def cost(self, spec):
        ix, at, k = spec.indexer, spec.attention, spec.topk.k
        flops = 2 * S * k * (at.heads * at.qk_dim + ix.heads * ix.head_dim)
        return Cost(self.name, flops, input_bytes(spec) + S * 8, "bf16")

    def check_args(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale=None, loss=None, index_lse=None):
        dev, n_q, n_kv = check_loss_inputs(spec, self.name, iq, ik, weights, aq, akv, alse, indices, sm_scale)
        check_out("loss", loss, torch.float32, (n_q,), dev)
        check_out("index_lse", index_lse, torch.float32, (n_q,), dev)
        return Call(dev, n_q, n_kv)

    def fake(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale):
        n = iq.shape[0]
        return iq.new_empty((n,), dtype=torch.float32), iq.new_empty((n,), dtype=torch.float32)


INDEXER_LOSS = IndexerLossOp()
