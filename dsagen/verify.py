"""Checking a kernel's output against the float64 reference.

Used by the tests and by the tuner (a fast but wrong candidate is rejected, never recorded).
Closeness is the RMS ratio ||got - ref|| / ||ref|| over the finite reference entries; infinities
must match exactly in place and sign; NaN never passes. The bound is a number: each kernel's
workload declares its outputs' bounds beside its reference (`Workload.tolerances`), and a
"<kernel>.<output>" label without a number is looked up there.
"""
from __future__ import annotations

import torch

from . import reference


class Mismatch(AssertionError):
    """A kernel output disagrees with the reference."""


def tolerance(what: str) -> float:
    """The bound of "<kernel>.<output>" (with ".<dtype>" where the kernel keys one) as its workload
    declares it."""
    from .workloads import workload

    kernel, _, output = what.partition(".")
    return workload(kernel).tolerance(output)


def assert_close(what: str, got: torch.Tensor, ref: torch.Tensor, tol: float | None = None) -> float:
    """Raise Mismatch unless got matches ref within an RMS ratio of `tol` (default: the bound the
    op declares for the "<kernel>.<output>" label `what`); returns the RMS ratio."""
    if tol is None:
        tol = tolerance(what)
    got64 = got.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    if got64.shape != ref64.shape:
        raise Mismatch(f"{what}: shape {tuple(got64.shape)} != reference {tuple(ref64.shape)}")
    if torch.isnan(got64).any():
        raise Mismatch(f"{what}: {int(torch.isnan(got64).sum())} NaN values (unwritten or broken)")
    ref_inf = torch.isinf(ref64)
    if not torch.equal(torch.isinf(got64), ref_inf) or not torch.equal(got64[ref_inf], ref64[ref_inf]):
        bad = int((torch.isinf(got64) != ref_inf).sum())
        raise Mismatch(f"{what}: infinities differ from the reference at {bad} places")
    fin = ~ref_inf
    diff = torch.linalg.vector_norm(got64[fin] - ref64[fin]).item()
    scale = torch.linalg.vector_norm(ref64[fin]).item()
    ratio = diff / scale if scale > 0 else diff
    if not ratio <= tol:
        raise Mismatch(f"{what}: RMS ratio {ratio:.3g} > tolerance {tol:g}")
    return ratio


def assert_topk(indices: torch.Tensor, logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, k: int,
                tolerance: float = 0.0) -> None:
    """Exact top-k contract: per row, min(k, window) distinct in-window indices whose values are the
    k largest of the window (any tie order), then -1 in every remaining slot. NaN ranks above +inf
    (docs/numerics.md): a row's NaNs are selected first, and the count of NaNs selected must match.

    tolerance > 0 is for selections made on logits that differ from `logits` by rounding (the fused
    indexer + top-k): the smallest selected value may then fall below the true k-th largest by at
    most tolerance x the row's largest |value|."""
    idx = indices.detach().cpu().long()
    x = logits.detach().cpu()
    ks_c, ke_c = ks.cpu(), ke.cpu()
    if tuple(idx.shape) != (x.shape[0], k):
        raise Mismatch(f"topk: shape {tuple(idx.shape)} != {(x.shape[0], k)}")
    want = reference.topk_values(x, ks_c, ke_c, k)
    for t in range(x.shape[0]):
        lo, hi = reference.window(ks_c, ke_c, x.shape[1], t)
        n = want[t].numel()
        head, tail = idx[t, :n], idx[t, n:]
        if (tail != -1).any():
            raise Mismatch(f"topk row {t}: slots {n}.. must be -1, got {tail[tail != -1][:5].tolist()}")
        if ((head < lo) | (head >= hi)).any():
            raise Mismatch(f"topk row {t}: indices outside the window [{lo}, {hi}): "
                           f"{head[(head < lo) | (head >= hi)][:5].tolist()}")
        if torch.unique(head).numel() != n:
            raise Mismatch(f"topk row {t}: repeated indices")
        got_vals = x[t, head].double()
        got_nan, want_nan = torch.isnan(got_vals), torch.isnan(want[t])
        if int(got_nan.sum()) != int(want_nan.sum()):
            raise Mismatch(f"topk row {t}: {int(got_nan.sum())} NaN selected, the window's top {n} hold "
                           f"{int(want_nan.sum())} (NaN ranks above +inf)")
        got_rest = torch.sort(got_vals[~got_nan], descending=True).values
        want_rest = want[t][~want_nan]
        if tolerance == 0.0:
            if not torch.equal(got_rest, want_rest):
                raise Mismatch(f"topk row {t}: selected values are not the {n} largest of the window")
        elif want_rest.numel() and got_rest[-1] < want_rest[-1] - tolerance * want_rest.abs().max():
            raise Mismatch(f"topk row {t}: selected value {got_rest[-1].item():.6g} is below the {n}-th largest "
                           f"{want_rest[-1].item():.6g} by more than the tolerance")
