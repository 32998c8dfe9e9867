"""What a kernel family is to dsagen: one `Op` subclass per family declares everything every stage
needs, so no stage switches on a kernel's name.

An op names the spec fields its math reads (its semantic hash), its problem symbols (what its
schedule files are written in), its FLOPs and minimum bytes (sympy), its templates per backend
and their folder, its argument checks, its float64 reference and its workload (inputs, poisoned
outputs, the check, naive PyTorch) used alike by the tests, the tuner and `dsagen bench`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import sympy as sp
import torch

from ..cache_formats import MLA_FORMATS, MLACacheFormat
from ..errors import DsagenError
from ..resources import data_dir
from ..spec import softmax_scale_value

# the problem sizes every op's costs are written in: S queries (rows), SKV keys, and the mean
# window length W (causal queries at the end of the context see fewer than SKV keys)
S, SKV, W = sp.symbols("S SKV W", positive=True, integer=True)

TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}
ELEM_BYTES = {"fp8_e4m3": 1, "bf16": 2, "fp32": 4}

# query tokens each request brings per decode step in the decode ops' workloads (multi-token
# prediction's usual 2): the cache write, the paged indexer, its top-k and the sparse decode agree
WORKLOAD_NEXT_N = 2

# said by the indexer ops, which have no backward: their logits only select indices, so their
# inputs learn through the training loss
INDEXER_TRAINS_THROUGH_LOSS = ("the indexer's q, k and weights are trained through kernels.indexer_loss; its logits "
                               "only select indices")

# the indexer's RMS-ratio bounds on its fp32 logits, by input dtype (the paged indexer runs the fp8
# one's math). The logits multiply exact fp8/bf16 products into fp32, so only summation order
# differs. fp8 on Hopper: wgmma accumulates fp8 products in reduced precision inside one dot
# (measured on the H200 at D=128: RMS ratio 1.3e-4), so the fp8 indexer gets a looser bound than bf16.
INDEXER_LOGITS_TOLERANCES = {"logits.bf16": 1e-5, "logits.fp8_e4m3": 1e-3}


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum): tiles are padded to it and masked."""
    p = minimum
    while p < n:
        p *= 2
    return p


def causal_window_mean(s: int, skv: int) -> float:
    """Mean window length when the S queries are the last S positions of a causal SKV context."""
    return skv - s + (s + 1) / 2


@dataclass(frozen=True)
class Cost:
    """FLOPs and the fewest bytes (each input read once, each output written once) as sympy
    expressions of S, SKV, W; `compute_unit` names the peak the FLOPs run at."""

    kernel: str
    flops: sp.Expr
    bytes: sp.Expr
    compute_unit: str  # "bf16", "fp8" or "none"

    def evaluate(self, sizes: Mapping[str, float]) -> tuple[float, float]:
        subs = {S: sizes["S"], SKV: sizes["SKV"], W: sizes.get("W", sizes["SKV"])}
        return float(sp.sympify(self.flops).subs(subs)), float(sp.sympify(self.bytes).subs(subs))

    def floor_ms(self, sizes: Mapping[str, float], gpu) -> tuple[float, str]:
        """Roofline floor in ms on `gpu` and which term binds ('compute' or 'memory')."""
        flops, nbytes = self.evaluate(sizes)
        mem_ms = nbytes / (gpu.bandwidth_tbps * 1e12) * 1e3
        peak = {"bf16": gpu.bf16_tflops, "fp8": gpu.fp8_tflops or gpu.bf16_tflops, "none": None}[self.compute_unit]
        comp_ms = flops / (peak * 1e12) * 1e3 if peak else 0.0
        return (comp_ms, "compute") if comp_ms >= mem_ms else (mem_ms, "memory")


def check_tensor(name: str, t, dtype, shape: tuple, device: torch.device | None = None,
                 contiguous_last: bool = True) -> None:
    """Raise ValueError naming `name` unless t is a tensor of `dtype` and `shape` (None: any size)
    on `device`, with a unit stride in its last dimension."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the other inputs are on {device}")
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} is on {t.device}: dsagen runs on cuda (compiled) or cpu (interpreted)")
    if contiguous_last and t.numel() > 0 and t.dim() > 0 and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}")


def check_out(name: str, t, dtype, shape: tuple, device) -> None:
    """An optional output buffer: None, or a tensor exactly as the kernel would allocate it."""
    if t is not None:
        check_tensor(name, t, dtype, shape, device)


def check_scale(name: str, value) -> float:
    """A run-time softmax scale as a float, or ValueError naming `name` and what is allowed."""
    number, problem = softmax_scale_value(value)
    if problem:
        raise ValueError(f"{name}={value!r} {problem}")
    return number


def softmax_scale(spec, sm_scale) -> float:
    """The run-time scale given (checked, as a plain float), else the spec's: what every attention
    op computes with."""
    return spec.attention.softmax_scale if sm_scale is None else check_scale("sm_scale", sm_scale)


def with_softmax_scale(spec, args: tuple, kwargs: dict, position: int = 3) -> tuple[tuple, dict]:
    """The launcher's arguments with sm_scale (positional argument `position`, or the keyword)
    filled in by softmax_scale: run() passes arguments by position, so the default goes in here."""
    args, kwargs = tuple(args), dict(kwargs)
    given = args[position] if len(args) > position else kwargs.pop("sm_scale", None)
    return args[:position] + (softmax_scale(spec, given),) + args[position + 1:], kwargs


def mla_format(spec) -> MLACacheFormat:
    """The MLA cache row layout a decode spec names."""
    return MLA_FORMATS[spec.cache.mla_format]


def few_keys_warning(spec, SKV_: int) -> str | None:
    """A top-k benchmark where every key is selected measures padding, not selection."""
    k = spec.topk.k
    if SKV_ <= k:
        return (f"SKV={SKV_} <= k={k}: every key of a row is selected, so the kernel only pads with -1 and "
                "the speed-up over torch.topk says nothing about selection")
    return None


def generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def causal_windows(S_: int, SKV_: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ks = 0, ke[t] = SKV - S + t + 1: query t sees itself and everything before it."""
    ks = torch.zeros(S_, dtype=torch.int32, device=device)
    ke = torch.arange(SKV_ - S_ + 1, SKV_ + 1, dtype=torch.int32, device=device)
    return ks, ke


def causal_topk_indices(S_: int, SKV_: int, k: int, device, g) -> torch.Tensor:
    """Per query (the last S_ positions of a causal context), k random distinct keys of its window,
    padded with the invalid index SKV_ where the window is shorter (the sparse attention's inputs)."""
    pos = torch.arange(SKV_ - S_, SKV_, device=device)
    keys = torch.rand(S_, SKV_, device=device, generator=g)
    keys = keys.masked_fill(torch.arange(SKV_, device=device)[None, :] > pos[:, None], -1.0)
    vals, idx = keys.topk(min(k, SKV_), dim=1)
    idx = torch.where(vals >= 0, idx, SKV_).int()
    if k > SKV_:
        idx = torch.cat([idx, torch.full((S_, k - SKV_), SKV_, dtype=torch.int32, device=device)], 1)
    return idx.contiguous()


@dataclass(frozen=True)
class Call:
    """One checked call of a kernel: its device and the (S, SKV) its schedule is looked up by."""

    device: torch.device
    S: int
    SKV: int


class Op:
    """A kernel family. Subclasses set the class attributes and implement the methods below.

    Templates live in `<data_root>/templates/<backend>/<name>.py.j2` and search spaces in
    `<data_root>/schedules/<backend>/<name>.toml`; `data_root` defaults to dsagen's own data, and a
    kernel defined outside dsagen points it at its own folder.
    """

    name: str = ""
    summary: str = ""  # one line for `dsagen check` and the docs
    # where the op is listed (check, generate, --kernel's help; stages() in this order is the
    # pipeline's): lower first, equal positions in the order they registered. dsagen's own ops hold
    # 10..110; a kernel that leaves it lists after them.
    position: int = 1000
    backends: tuple[str, ...] = ("triton",)
    stage: bool = False  # one of the three DSA stages (dsa() and the spec's semantic hash use them)
    needs_cache: bool = False  # a decode kernel: offered only by specs with a [cache] section
    # semantic fields (positive integers) in which a tuned entry of another spec may differ and
    # still answer a lookup, nearest value first (an unseen head count gets the nearest tuned one)
    near_fields: tuple[str, ...] = ("heads",)
    # how a winner is confirmed and recorded: "events" (CUDA events around eager calls, L2 flushed:
    # what `dsagen bench` reports) or "graph" (CUDA-graph replays: how a decode step runs, where
    # several short launches would otherwise be timed by their host launch cost)
    timing: str = "events"
    # knobs a deterministic build forces whatever else resolves the schedule (say, an output order
    # that does not depend on how the work was split)
    deterministic_knobs: Mapping[str, int] = {}
    data_root: Path | None = None
    short_names: Mapping[str, str] = {}  # knob -> its spelling in Triton module names
    naive_name: str = "naive PyTorch"
    # the launcher's positional arguments as (name, torch schema type: Tensor, Tensor?, float,
    # int), and its keyword outputs in the order it returns them
    args: tuple[tuple[str, str], ...] = ()
    outputs: tuple[str, ...] = ("out",)
    # the RMS-ratio bound ||got - ref|| / ||ref|| of each checked output against the float64
    # reference (verify.assert_close), keyed by what is checked (an output's name), with ".<dtype>"
    # where the bound depends on one
    tolerances: Mapping[str, float] = {}
    # autograd (dsagen/autograd.py): the registered op that differentiates this one, and the
    # outputs that carry no gradient (statistics such as an lse); None: not differentiable
    backward_kernel: str | None = None
    non_differentiable: tuple[str, ...] = ()
    # said, when there is no backward, to a caller whose input requires grad: where training goes instead
    no_backward_hint: str = ""

    def backward_args(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any],
                      grads: Mapping[str, Any]) -> tuple:
        """The backward kernel's positional arguments, from this op's inputs and outputs (by name)
        and the gradients of its differentiable outputs (contiguous, zeros where unused)."""
        raise NotImplementedError(f"{self.name}: backward_args")

    def input_gradients(self, bwd_outputs: tuple) -> dict[str, Any]:
        """The backward kernel's outputs as {input name: gradient}; inputs left out get None."""
        raise NotImplementedError(f"{self.name}: input_gradients")

    def canonical_shape(self) -> tuple[int, int]:
        """The call shape (rows, keys per row) at which a batch-invariant build resolves every call
        of this kernel, so one schedule serves every batch: a decode step's B * next_n = 256 rows of
        a 32K context, or a 4096-query prefill of a 32K context. An op may override it."""
        return (256, 32768) if self.needs_cache else (4096, 32768)

    def tolerance(self, output: str) -> float:
        """The bound `output` is checked to; an undeclared one is an error naming what is declared."""
        if output not in self.tolerances:
            declared = ", ".join(self.tolerances) or "none"
            raise DsagenError(f"op {self.name!r} declares no tolerance for {output!r} (declared: {declared})")
        return self.tolerances[output]

    # -- where its files are ----------------------------------------------------------------
    def root(self, kind: str) -> Path:
        """The folder holding this op's `templates` or `schedules`."""
        return (self.data_root / kind) if self.data_root is not None else data_dir(kind)

    # -- spec -> numbers ------------------------------------------------------------------
    def semantic_fields(self, spec) -> dict[str, Any]:
        """The numbers this op's math depends on (hashed for the tuning database)."""
        raise NotImplementedError

    def enabled(self, spec, backend: str) -> bool:
        """Whether a build of `spec` on `backend` offers this kernel."""
        return self.unavailable(spec, backend) is None

    def unavailable(self, spec, backend: str) -> str | None:
        """Why a build of `spec` on `backend` does not offer this kernel (said to a user who calls
        it anyway), or None where it does. An op with its own conditions extends this."""
        if backend not in self.backends:
            return f"{self.name} has no {backend} template (its backends: {', '.join(self.backends)})"
        if self.needs_cache and spec.cache is None:
            return f"{self.name} is a decode kernel: it needs a spec with a [cache] section"
        return None

    def template_fields(self, spec) -> dict[str, Any]:
        """Validated numbers and enum strings the template reads (never free text)."""
        return self.semantic_fields(spec)

    def module_stem(self, spec) -> str:
        """The start of the module's name: the op and its specialization."""
        fields = self.template_fields(spec)
        return self.name + "".join(f"_{k.replace('_', '')}{v}" for k, v in fields.items())

    def derived(self, spec, point: Mapping[str, int], backend: str) -> dict[str, Any]:
        """Sizes a template needs beyond the spec and the schedule (padded tile shapes)."""
        return {}

    def problem_symbols(self, spec) -> dict[str, int]:
        """The numbers this op's schedule footprints and constraints are written in."""
        return {}

    def cost(self, spec) -> Cost:
        raise NotImplementedError

    # -- run time ---------------------------------------------------------------------------
    def check_args(self, spec, *args, **outs) -> Call:
        """Check every argument (dtype, shape, device, strides), raising ValueError naming the bad
        one; return the device and the (S, SKV) its schedule is chosen by."""
        raise NotImplementedError

    def launch_args(self, spec, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments as the generated launcher takes them (defaults filled in from the spec)."""
        return args, kwargs

    def fake(self, spec, *args):
        """Outputs of the right shape, dtype and device without running (torch.compile's tracing)."""
        raise NotImplementedError

    # -- tests, tuner, bench ----------------------------------------------------------------
    def reference(self, spec, *args):
        """The float64 result written from the math."""
        raise NotImplementedError

    def inputs(self, spec, S_: int, SKV_: int, device, seed: int) -> tuple:
        """Benchmark/tuning inputs at (S, SKV): the launcher's positional arguments."""
        raise NotImplementedError

    def poisoned_outputs(self, spec, inputs) -> dict[str, torch.Tensor]:
        """Output buffers filled with values no kernel writes (NaN, -7), as launcher keywords."""
        raise NotImplementedError

    def check(self, spec, inputs, result, rows: torch.Tensor) -> str:
        """Raise verify.Mismatch if `result` is wrong on `rows`; else say what was checked."""
        raise NotImplementedError

    def naive(self, spec, inputs) -> Callable[[], object]:
        """A zero-argument callable running naive PyTorch on `inputs` (the speed-up baseline)."""
        raise NotImplementedError

    def shape_info(self, spec, S_: int, SKV_: int) -> dict[str, Any]:
        """The shape as `dsagen bench` reports it."""
        return {"S": S_, "SKV": SKV_}

    def call_shape(self, S_: int, SKV_: int) -> tuple[int, int]:
        """The (S, SKV) that `check_args` reports for the workload at (S_, SKV_): what the tuning
        database buckets a tuned entry by, so that a build looks it up where it was recorded."""
        return S_, SKV_

    def sizes(self, S_: int, SKV_: int) -> dict[str, float]:
        """The cost model's symbols at a workload's shape (its mean window for W)."""
        return {"S": S_, "SKV": SKV_, "W": SKV_}

    def bench_warning(self, spec, S_: int, SKV_: int) -> str | None:
        """Why a benchmark at this shape would mislead, or None."""
        return None

    def __repr__(self) -> str:
        return f"<dsagen op {self.name} ({', '.join(self.backends)})>"
