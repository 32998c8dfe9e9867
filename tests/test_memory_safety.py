"""Memory safety: every kernel that takes an index, a slot, a page table, a length or a window from
its caller, fed the out-of-range values -2**31, -1, size, size + 1 and 2**31 - 1 of each such
argument ("size": the extent the value indexes), on both backends, neither crashes nor reads or
writes outside its tensors, and gives what the float64 reference gives when it treats those
entries as invalid (the op's own check, NaN never passing).

How a stray access shows without bounds-checking hardware: every tensor of a call is a view into
the middle of a larger buffer whose margins hold poison (NaN floats, 0xFF bytes, i.e. NaN fp8 codes
and NaN scales; 0 in integer inputs, a valid index, and 0x5A5A5A5A around integer outputs). A read
past a tensor brings NaN or a wrong value into the output, compared with the reference; a write
past it changes a margin, compared byte for byte; no input may change either. On the CPU, Triton
runs through its interpreter, which has no bounds checking of its own (Triton 3.6): this test
checks every address the interpreter loads, stores or updates atomically against the byte extents
of the launch's tensor arguments, and fails at the first one outside them, before it is touched.
On the GPU, compute-sanitizer does that job.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import triton.language as tl

from dsagen.workloads import workload
import dsagen
from dsagen.ops import get_op

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def out_of_range(size: int) -> tuple[int, ...]:
    """The five values outside [0, size) every index-like argument gets."""
    return (I32_MIN, -1, size, size + 1, I32_MAX)


# ------------------------------------------------------------------------------------------------
# tensors between poisoned margins

MARGIN = 2  # elements of poison before and after each padded dimension
INT_OUT_POISON = 0x5A5A5A5A


def poison_of(dtype: torch.dtype, is_output: bool):
    if dtype.is_floating_point and dtype.itemsize > 1:
        return float("nan")
    if dtype in (torch.uint8, torch.float8_e4m3fn):
        return 0xFF  # fp8: a NaN code; four of them: a NaN fp32 scale, two: a NaN bf16
    return INT_OUT_POISON if is_output else 0


@dataclasses.dataclass
class Guarded:
    """A tensor's values in the middle of a poisoned buffer (`view`), and what the buffer held."""
    view: torch.Tensor
    buffer: torch.Tensor
    before: torch.Tensor
    inside: torch.Tensor  # bool [buffer.shape]: the view's elements

    @classmethod
    def of(cls, t: torch.Tensor, is_output: bool, dims=None) -> "Guarded":
        """`dims`: the dimensions given margins (default all; packed layouts keep some unpadded)."""
        dims = range(t.dim()) if dims is None else dims
        pad = [MARGIN if d in dims else 0 for d in range(t.dim())]
        shape = [n + 2 * p for n, p in zip(t.shape, pad)]
        raw = torch.uint8 if t.dtype == torch.float8_e4m3fn else t.dtype
        buffer = torch.full(shape, poison_of(t.dtype, is_output), dtype=raw, device=t.device).view(t.dtype)
        window = tuple(slice(p, p + n) for p, n in zip(pad, t.shape))
        view = buffer[window]
        view.copy_(t)
        inside = torch.zeros(shape, dtype=torch.bool, device=t.device)
        inside[window] = True
        return cls(view, buffer, buffer.clone(), inside)

    def bits(self, t: torch.Tensor) -> torch.Tensor:
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    def margins_kept(self) -> bool:
        now, was = self.bits(self.buffer), self.bits(self.before)
        return torch.equal(now[~self.inside], was[~self.inside])

    def unchanged(self) -> bool:
        return torch.equal(self.bits(self.buffer), self.bits(self.before))


# ------------------------------------------------------------------------------------------------
# the Triton interpreter, bounds-checked

class OutOfBounds(AssertionError):
    pass


class BoundsChecker:
    """Wraps the interpreter's memory access (load, store, atomics): each address must lie, with
    all its bytes, inside one tensor argument of the running launch (its view's extent, not its
    storage), else OutOfBounds is raised before the access."""

    def __init__(self, interpreter):
        self.module = interpreter
        self.memory = interpreter._interpreter
        self.extents: list[tuple[int, int, str]] = []
        self.violations: list[str] = []

    # what the interpreter module calls
    def __getattr__(self, name):
        return getattr(self.memory, name)

    def load(self, ptrs, mask, other, dtype):
        self.check(ptrs, mask, np.dtype(dtype).itemsize, "load")
        return self.memory.load(ptrs, mask, other, dtype)

    def store(self, ptrs, value, mask):
        self.check(ptrs, mask, value.dtype.itemsize, "store")
        return self.memory.store(ptrs, value, mask)

    def atomic_rmw(self, op, ptrs, value, mask, sem):
        self.check(ptrs, mask, value.dtype.itemsize, "atomic")
        return self.memory.atomic_rmw(op, ptrs, value, mask, sem)

    def atomic_cas(self, ptrs, cmp, value, sem):
        self.check(ptrs, None, value.dtype.itemsize, "atomic")
        return self.memory.atomic_cas(ptrs, cmp, value, sem)

    def check(self, ptrs, mask, nbytes: int, what: str) -> None:
        addr = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs)).reshape(-1)]
        if addr.size == 0:
            return
        inside = np.zeros(addr.shape, dtype=bool)
        for lo, hi, _ in self.extents:
            inside |= (addr >= np.uint64(lo)) & (addr + np.uint64(nbytes) <= np.uint64(hi))
        if not inside.all():
            bad = int(addr[~inside][0])
            near = min(self.extents, key=lambda e: min(abs(bad - e[0]), abs(bad - e[1])), default=None)
            where = f", byte {bad - near[0]:+d} of {near[2]} ({near[1] - near[0]} bytes)" if near else ""
            self.violations.append(f"{what} of {nbytes} bytes at {bad:#x}{where}")
            raise OutOfBounds(self.violations[-1])

    def record_launch(self, executor, args, kwargs) -> None:
        """The byte extents of the launch's tensor arguments."""
        names = list(getattr(executor, "arg_names", [])) + list(kwargs)
        values = list(args) + list(kwargs.values())
        self.extents = []
        for i, arg in enumerate(values):
            if isinstance(arg, torch.Tensor) and arg.numel():
                last = sum((n - 1) * s for n, s in zip(arg.shape, arg.stride()))
                name = names[i] if i < len(names) else f"argument {i}"
                self.extents.append((arg.data_ptr(), arg.data_ptr() + (last + 1) * arg.element_size(), name))


@pytest.fixture
def bounds_checked(monkeypatch):
    """The Triton interpreter with every memory access checked (a no-op where it cannot be: the
    GPU, where compute-sanitizer checks instead)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield None
        return
    if not hasattr(interpreter, "_interpreter") or not hasattr(interpreter.GridExecutor, "_init_args_hst"):
        yield None
        return
    checker = BoundsChecker(interpreter)
    init_args = interpreter.GridExecutor._init_args_hst

    def recording_init_args(executor, args_dev, kwargs):
        args, kwargs_hst = init_args(executor, args_dev, kwargs)
        checker.record_launch(executor, args, kwargs_hst)
        return args, kwargs_hst

    monkeypatch.setattr(interpreter, "_interpreter", checker)
    monkeypatch.setattr(interpreter.GridExecutor, "_init_args_hst", recording_init_args)
    yield checker


def _copy_shifted(src, dst, shift, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(dst + offs, tl.load(src + offs + shift))


def test_the_bounds_checker_catches_a_stray_read(device, bounds_checked):
    """The checker itself: an interpreted kernel that reads one element past its tensor fails
    before the read, and names the tensor."""
    if device.type != "cpu" or bounds_checked is None:
        pytest.skip("the Triton interpreter runs on the CPU only")
    from triton.runtime.interpreter import InterpretedFunction

    kernel = InterpretedFunction(_copy_shifted)
    src, dst = torch.arange(8.0), torch.zeros(8)
    kernel[(1,)](src, dst, 0, N=8)
    assert torch.equal(dst, src)
    with pytest.raises(Exception, match=r"load of 4 bytes at 0x[0-9a-f]+, byte \+32 of src \(32 bytes\)"):
        kernel[(1,)](src, dst, 1, N=8)
    assert len(bounds_checked.violations) == 1


# ------------------------------------------------------------------------------------------------
# the kernels and their index-like arguments

SPECS = {
    "prefill": dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=24, dtype="fp8_e4m3"), topk=dsagen.TopKSpec(k=7),
                           attention=dsagen.AttentionSpec(heads=3, qk_dim=40, v_dim=32)),
    "training": dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=24, dtype="bf16"), topk=dsagen.TopKSpec(k=7),
                            attention=dsagen.AttentionSpec(heads=3, qk_dim=40, v_dim=32)),
    "decode": dsagen.Spec(indexer=dsagen.IndexerSpec(heads=3, head_dim=24), topk=dsagen.TopKSpec(k=7),
                          attention=dsagen.AttentionSpec(heads=3), cache=dsagen.CacheSpec(page_size=16)),
}
PAGE_SIZE = 16


def windows(which: str):
    """ks, ke or both out of range: row r gets value r % 5 (the other bound as the workload has
    it), or, for both, the r-th of the 25 pairs (inverted ones included: ks = 2**31 - 1 with
    ke = -2**31 must not wrap into a window)."""
    def corrupt(a):
        n_keys = a["logits"].shape[1] if "logits" in a else a["k"].shape[0]
        bad = out_of_range(n_keys)
        rows = a["ks"].shape[0]
        if which == "ks,ke":
            pairs = list(itertools.product(bad, bad))
            assert rows >= len(pairs)
            a["ks"][:len(pairs)] = torch.tensor([p[0] for p in pairs], dtype=torch.int32)
            a["ke"][:len(pairs)] = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
        else:
            a[which][:] = torch.tensor([bad[r % 5] for r in range(rows)], dtype=torch.int32)
    return corrupt


def selected(extent):
    """Selected rows or slots out of range (size: extent(args)): row r holds the five values from
    slot r on (cyclically), the last row only them."""
    def corrupt(a):
        bad = out_of_range(extent(a))
        idx = a["indices"].view(-1, a["indices"].shape[-1])
        k = idx.shape[1]
        for r in range(idx.shape[0]):
            for j in range(k if r == idx.shape[0] - 1 else 5):
                idx[r, (r + j) % k] = bad[j % 5]
    return corrupt


def table_entries(extent):
    """Every other block-table entry out of range (size: extent(args)), each value at least once."""
    def corrupt(a):
        bad = out_of_range(extent(a))
        table = a["block_table"]
        spots = [(b, i) for b in range(table.shape[0]) for i in range(table.shape[1]) if (b + i) % 2 == 0]
        assert len(spots) >= 5
        for n, (b, i) in enumerate(spots):
            table[b, i] = bad[n % 5]
    return corrupt


def context_lengths(extent):
    """Request b's context length: value b % 5 (size: extent(args), the columns)."""
    def corrupt(a):
        bad = out_of_range(extent(a))
        lens = a["context_lens"]
        lens[:] = torch.tensor([bad[b % 5] for b in range(lens.shape[0])], dtype=torch.int32)
    return corrupt


def slot_mapping(dtype):
    """Every other row's slot out of range (size: the cache's slots); int64 mappings also get
    -2**63 and 2**63 - 1."""
    def corrupt(a):
        n_slots = a["cache"].shape[0] * a["cache"].shape[1]
        bad = out_of_range(n_slots) + ((-(2**63), 2**63 - 1) if dtype == torch.int64 else ())
        slots = a["slot_mapping"].to(dtype)
        assert slots.shape[0] >= 2 * len(bad)
        for n, r in enumerate(range(0, slots.shape[0], 2)):
            slots[r] = bad[n % len(bad)]
        a["slot_mapping"] = slots
    return corrupt


def n_pages(a):
    return a["index_cache"].shape[0]


def n_cols(a):
    return a["block_table"].shape[1] * PAGE_SIZE if "index_cache" in a else a["logits"].shape[1]


def first_page_past_int32(a):
    """decode_topk cannot know the cache's pages: its limit is the first page without int32 slots."""
    return 2**31 // PAGE_SIZE


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    arg: str  # what holds the out-of-range values
    spec: str
    S: int  # the op's workload shape (requests for the decode kernels)
    SKV: int
    corrupt: object
    triton_only: bool = False
    packed: tuple = ()  # tensors whose inner layout is fixed: margins on dim 0 only
    deterministic: bool = False  # a batch-invariant build (its own schedule knobs)

    def __str__(self):
        return f"{self.kernel}-{self.arg}" + ("-deterministic" if self.deterministic else "")


CASES = [
    *(Case("topk", w, "prefill", 25, 40, windows(w)) for w in ("ks", "ke", "ks,ke")),
    *(Case("indexer", w, "prefill", 25, 40, windows(w)) for w in ("ks", "ke", "ks,ke")),
    *(Case("indexer_topk", w, "prefill", 25, 40, windows(w), triton_only=True) for w in ("ks", "ke", "ks,ke")),
    Case("sparse_attention", "indices", "prefill", 6, 40, selected(lambda a: a["kv"].shape[0])),
    Case("sparse_attention_bwd", "indices", "prefill", 6, 40, selected(lambda a: a["kv"].shape[0])),
    Case("sparse_attention_bwd", "indices", "prefill", 6, 40, selected(lambda a: a["kv"].shape[0]), deterministic=True),
    Case("indexer_loss", "indices", "training", 6, 40, selected(lambda a: a["ik"].shape[0])),
    Case("indexer_loss_bwd", "indices", "training", 6, 40, selected(lambda a: a["ik"].shape[0])),
    Case("paged_indexer", "block_table", "decode", 4, 40, table_entries(n_pages), packed=("index_cache",)),
    Case("paged_indexer", "context_lens", "decode", 5, 40, context_lengths(n_cols), packed=("index_cache",)),
    Case("decode_topk", "block_table", "decode", 4, 40, table_entries(first_page_past_int32)),
    Case("decode_topk", "block_table", "decode", 4, 40, table_entries(first_page_past_int32), deterministic=True),
    Case("decode_topk", "context_lens", "decode", 5, 40, context_lengths(n_cols)),
    Case("sparse_decode", "indices", "decode", 3, 40,
         selected(lambda a: a["mla_cache"].shape[0] * a["mla_cache"].shape[1]), packed=("mla_cache",)),
    Case("mla_cache_write", "slot_mapping", "decode", 5, 40, slot_mapping(torch.int32), packed=("cache",)),
    Case("mla_cache_write", "slot_mapping-int64", "decode", 7, 40, slot_mapping(torch.int64), packed=("cache",)),
]
WRITTEN_IN_PLACE = {"mla_cache_write": "cache"}
TVM_LLVM_ONLY = {"sparse_attention_bwd", "indexer_loss", "indexer_loss_bwd"}  # no cuda kernel on TVM


def checked_rows(named: dict) -> torch.Tensor:
    """What the op's check samples: requests for the decode kernels, rows (queries) otherwise."""
    lead = named["context_lens"] if "context_lens" in named else next(iter(named.values()))
    return torch.arange(lead.shape[0])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_out_of_range_values_stay_inside_the_tensors(case, backend, device, gen, bounds_checked):
    if case.triton_only and backend != "triton":
        pytest.skip(f"{case.kernel} is a Triton kernel")
    if backend == "tvm" and device.type == "cuda" and case.kernel in TVM_LLVM_ONLY:
        pytest.skip(f"the TVM {case.kernel} runs on the CPU only")
    spec = SPECS[case.spec]
    op = get_op(case.kernel)
    names = list(op.signature.names)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    named = dict(zip(names, workload(op).inputs(spec, case.S, case.SKV, device, seed)))
    case.corrupt(named)
    inputs = {n: Guarded.of(t, False, (0,) if n in case.packed else None)
              for n, t in named.items() if isinstance(t, torch.Tensor)}
    args = [inputs[n].view if n in inputs else named[n] for n in named]  # the optional inputs left out
    outputs = {n: Guarded.of(t, True) for n, t in workload(op).poisoned_outputs(spec, args).items()}
    kernels = dsagen.build(spec, backend=backend, deterministic=case.deterministic)
    result = kernels.run(case.kernel, *args, **{n: g.view for n, g in outputs.items()})
    assert bounds_checked is None or not bounds_checked.violations
    workload(op).check(spec, args, result, checked_rows(named))
    for name, g in inputs.items():
        kept = g.margins_kept() if WRITTEN_IN_PLACE.get(case.kernel) == name else g.unchanged()
        assert kept, f"{case.kernel} wrote into {name} or its margins"
    for name, g in outputs.items():
        assert g.margins_kept(), f"{case.kernel} wrote past its output {name}"
