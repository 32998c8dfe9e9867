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

import math

import torch

from .. import reference
from ..verify import assert_close
from . import register
from .base import (SKV, Call, Cost, Op, S, causal_topk_indices, check_out, check_tensor, generator, next_pow2,
                   softmax_scale, with_softmax_scale)

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


# -- workload ------------------------------------------------------------------------------------------------

def attention_lse(aq, akv, indices, sm_scale: float, chunk: int = 64) -> torch.Tensor:
    """The attention forward's lse [S, H] fp32 over each row's valid indices, computed in float64
    (the reference's math, chunked over queries and vectorized): +inf for a row with none."""
    n_kv = akv.shape[0]
    lse = torch.empty(aq.shape[:2], dtype=torch.float32, device=aq.device)
    kv64 = akv.double()
    for s0 in range(0, aq.shape[0], chunk):
        ix = indices[s0:s0 + chunk].long()
        valid = (ix >= 0) & (ix < n_kv)
        rows = kv64[ix.clamp(0, max(n_kv - 1, 0))] if n_kv else kv64.new_zeros(*ix.shape, akv.shape[1])
        scores = torch.einsum("chd,ckd->chk", aq[s0:s0 + chunk].double(), rows) * sm_scale
        scores = scores.masked_fill(~valid[:, None, :], -math.inf)
        out = torch.logsumexp(scores, -1)
        lse[s0:s0 + chunk] = torch.where(valid.any(-1)[:, None], out, math.inf).float()
    return lse


def loss_inputs(spec, S_: int, SKV_: int, device, seed: int) -> tuple:
    """(iq, ik, weights, aq, akv, alse, indices, sm_scale): random bf16 indexer and attention
    inputs at scales that give logits of order 1, causal random top-k indices, and the attention's
    lse from the float64 forward."""
    ix, at = spec.indexer, spec.attention
    g = generator(device, seed)
    iq = torch.randn(S_, ix.heads, ix.head_dim, device=device, generator=g).bfloat16()
    ik = torch.randn(SKV_, ix.head_dim, device=device, generator=g).bfloat16()
    w = torch.randn(S_, ix.heads, device=device, generator=g) / (ix.heads * ix.head_dim) ** 0.5
    aq = torch.randn(S_, at.heads, at.qk_dim, device=device, generator=g).bfloat16()
    akv = torch.randn(SKV_, at.qk_dim, device=device, generator=g).bfloat16()
    idx = causal_topk_indices(S_, SKV_, spec.topk.k, device, g)
    scale = at.softmax_scale
    return (iq, ik, w, aq, akv, attention_lse(aq, akv, idx, scale), idx, scale)


# -- naive PyTorch ---------------------------------------------------------------------------------------------

def naive_loss_terms(iq, ik, weights, aq, akv, alse, indices, sm_scale, chunk: int = 256):
    """Per chunk of queries (gather + einsum, fp32): yields (rows, valid, rows of ik, per-head
    indexer scores, logits, target p, the row's defined flag) for the naive forward and backward."""
    n_kv = ik.shape[0]
    for s0 in range(0, iq.shape[0], chunk):
        sl = slice(s0, s0 + chunk)
        ix = indices[sl].long()
        valid = (ix >= 0) & (ix < n_kv)
        safe = ix.clamp(0, max(n_kv - 1, 0))
        k_rows = ik[safe].float()  # [c, k, Di]
        scores = torch.einsum("cjd,ckd->cjk", iq[sl].float(), k_rows)
        logits = torch.einsum("cjk,cj->ck", scores.relu(), weights[sl]).masked_fill(~valid, -math.inf)
        att = torch.einsum("chd,ckd->chk", aq[sl].float(), akv[safe].float()) * sm_scale
        mass = torch.exp(att - alse[sl, :, None]).sum(1).masked_fill(~valid, 0.0)
        total = mass.sum(-1, keepdim=True)
        defined = total[:, 0] > 0
        p = mass / torch.where(defined[:, None], total, 1.0)
        yield sl, valid, safe, k_rows, scores, logits, p, defined


def naive_indexer_loss(iq, ik, weights, aq, akv, alse, indices, sm_scale, chunk: int = 256):
    """(loss [S], index_lse [S]) with gather + einsum in fp32, chunks of queries."""
    loss = torch.zeros(iq.shape[0], dtype=torch.float32, device=iq.device)
    lse = torch.full((iq.shape[0],), math.inf, dtype=torch.float32, device=iq.device)
    for sl, valid, _, _, _, logits, p, defined in naive_loss_terms(iq, ik, weights, aq, akv, alse, indices,
                                                                     sm_scale, chunk):
        row_lse = torch.logsumexp(logits, -1)
        has = valid.any(-1)
        lse[sl] = torch.where(has, row_lse, math.inf)
        logsm = (logits - row_lse[:, None]).masked_fill(~valid, 0.0)
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
        loss[sl] = torch.where(defined, (plogp - p * logsm).sum(-1), 0.0)
    return loss, lse


class IndexerLossFamily(Op):
    """What the loss and its backward share: a bf16-indexer spec, the fields and symbols of both the
    indexer and the attention whose distribution it learns, the templates' derived sizes."""
    backends = ("triton", "tvm")
    stage = False
    short_names = {"block_n": "n", "block_h": "bh", "block_d": "bd", "num_warps": "w", "num_stages": "s"}
    # the loss (and its index_lse) is an fp32 sum; the gradients of q, k and the weights come from
    # bf16 inputs through fp32 accumulators, so a looser bound (the sparse attention backward's)
    tolerances = {"loss": 1e-3, "dq": 2e-2, "dk": 2e-2, "dweights": 2e-2}

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

    def shape_info(self, spec, S_, SKV_):
        ix, at = spec.indexer, spec.attention
        return {"S": S_, "SKV": SKV_, "Hi": ix.heads, "Di": ix.head_dim, "H": at.heads, "Dqk": at.qk_dim,
                "topk": spec.topk.k}


class IndexerLossOp(IndexerLossFamily):
    name = "indexer_loss"
    position = 90
    summary = ("indexer training loss: per-query KL(attention mass || indexer softmax) over the selected keys, "
               "and the indexer's logsumexp (bf16 indexer)")
    outputs = ("loss", "index_lse")
    naive_name = "gather + einsum (fp32, chunks of 256)"
    args = (("iq", "Tensor"), ("ik", "Tensor"), ("weights", "Tensor"), ("aq", "Tensor"), ("akv", "Tensor"),
            ("alse", "Tensor"), ("indices", "Tensor"), ("sm_scale", "float"))
    # gradients flow to the indexer's q, k and weights; the attention's inputs are the target's
    # (V3.2 detaches them), and index_lse is a statistic saved for the backward
    backward_kernel = "indexer_loss_bwd"
    non_differentiable = ("index_lse",)

    def backward_args(self, inputs, outputs, grads):
        return (*(inputs[name] for name, _ in self.args), outputs["index_lse"], grads["loss"])

    def input_gradients(self, bwd_outputs):
        d_iq, d_ik, d_weights = bwd_outputs
        return {"iq": d_iq, "ik": d_ik, "weights": d_weights}

    def cost(self, spec):
        ix, at, k = spec.indexer, spec.attention, spec.topk.k
        flops = 2 * S * k * (at.heads * at.qk_dim + ix.heads * ix.head_dim)
        return Cost(self.name, flops, input_bytes(spec) + S * 8, "bf16")

    def check_args(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale=None, loss=None, index_lse=None):
        dev, n_q, n_kv = check_loss_inputs(spec, self.name, iq, ik, weights, aq, akv, alse, indices, sm_scale)
        check_out("loss", loss, torch.float32, (n_q,), dev)
        check_out("index_lse", index_lse, torch.float32, (n_q,), dev)
        return Call(dev, n_q, n_kv)

    def launch_args(self, spec, args, kwargs):
        return with_softmax_scale(spec, args, kwargs, position=7)  # after the seven tensors

    def fake(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale):
        n = iq.shape[0]
        return iq.new_empty((n,), dtype=torch.float32), iq.new_empty((n,), dtype=torch.float32)

    def reference(self, spec, iq, ik, weights, aq, akv, alse, indices, sm_scale=None):
        scale = softmax_scale(spec, sm_scale)
        return reference.indexer_loss(iq, ik, weights, aq, akv, alse, indices, scale)

    def inputs(self, spec, S_, SKV_, device, seed):
        return loss_inputs(spec, S_, SKV_, device, seed)

    def poisoned_outputs(self, spec, inputs):
        n, dev = inputs[0].shape[0], inputs[0].device
        return {"loss": torch.full((n,), math.nan, device=dev), "index_lse": torch.full((n,), -7.0, device=dev)}

    def check(self, spec, inputs, result, rows):
        iq, ik, w, aq, akv, alse, idx, scale = inputs
        loss, lse = result
        r = rows.to(iq.device)
        ref_loss, ref_lse = reference.indexer_loss(iq[r], ik, w[r], aq[r], akv, alse[r], idx[r], scale)
        r1 = assert_close("indexer_loss.loss", loss[r], ref_loss, self.tolerance("loss"))
        r2 = assert_close("indexer_loss.index_lse", lse[r], ref_lse, self.tolerance("loss"))
        return f"float64 reference on {len(rows)} rows, RMS ratio loss {r1:.2e}, index_lse {r2:.2e}"

    def naive(self, spec, inputs):
        return lambda: naive_indexer_loss(*inputs)


register(IndexerLossOp())
