"""The spec DSL: a TOML file (or dataclasses) describing one DSA model's three kernels.

Step 1 of the pipeline (spec -> plan -> resolve -> lower -> render -> compile/load -> run). Plain
data: everything here is validated before it can reach a template (only checked integers, floats
and enum strings leave this module, so no spec text is ever pasted into generated code), and
nothing here knows a kernel: the op registry tells it which names a [schedule.<kernel>] table may
use (`known_kernels`), and the semantic hash lives with the ops (dsagen.ops.semantic_hash).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import SpecError

INDEXER_DTYPES = ("fp8_e4m3", "bf16")
ATTENTION_DTYPES = ("bf16",)

# What the generated kernels support (each bound is a register-tile limit of the templates).
MAX_HEADS = 1024
MAX_INDEXER_HEAD_DIM = 256  # one query head row and one key row are held whole in a tile
MAX_V_DIM = 512  # the output accumulator [heads, v_dim] lives in registers
MAX_ROPE_DIM = 128  # qk_dim - v_dim: the extra (rope) part of each query/key row
MAX_TOPK = 1 << 20
MAX_WINDOW = 1 << 20  # tokens of a sliding-window cache (its indices are one more selection)

# the kernel names a [schedule.<kernel>] table may use, as the op registry says when it is imported
# (None: not told, so any name is kept until a build looks its kernel up)
_kernel_names: Callable[[], tuple[str, ...]] | None = None


def known_kernels(names: Callable[[], tuple[str, ...]]) -> None:
    """Tell spec validation where the kernel names come from (the op registry's `names`)."""
    global _kernel_names
    _kernel_names = names


# the variant names a kernel declares (its algorithms, each its own template), as dsagen.schedule
# says when it is imported (None: not told, so any name is kept until a build looks it up)
_variant_names: Callable[[str], tuple[str, ...]] | None = None
VARIANT_KEY = "variant"  # the one string a [schedule.<kernel>] table may hold: which algorithm


def known_variants(variants: Callable[[str], tuple[str, ...]]) -> None:
    """Tell spec validation where a kernel's variant names come from."""
    global _variant_names
    _variant_names = variants


@dataclass(frozen=True)
class IndexerSpec:
    """Lightning indexer: logits[t,s] = k_scale[s] * sum_j w[t,j] * relu(q[t,j] . k[s])."""

    heads: int = 64
    head_dim: int = 128
    dtype: str = "fp8_e4m3"


@dataclass(frozen=True)
class TopKSpec:
    """Top-k selector: the k largest logits of each row's window, int32, -1 padded.

    fused: dsa() selects straight from the indexer's inputs (indexer_topk), never writing the
    S x SKV logits; a choice of execution, not of math, so it is not part of any semantic hash."""

    k: int = 2048
    fused: bool = False


@dataclass(frozen=True)
class AttentionSpec:
    """Sparse MLA attention (MQA form): one shared kv row of qk_dim per token, V = its first v_dim."""

    heads: int = 128
    qk_dim: int = 576
    v_dim: int = 512
    dtype: str = "bf16"
    sm_scale: float | None = None
    # a learned sink logit per head (DeepSeek-V4): the pipelines take attn_sink [heads] fp32 and
    # give out *= 1 / (1 + exp(sink - lse)), lse unchanged. A run-time input of the kernels (a
    # specialization chosen by the call), so not part of any hash.
    sink: bool = False

    @property
    def rope_dim(self) -> int:
        return self.qk_dim - self.v_dim

    @property
    def softmax_scale(self) -> float:
        """The scale actually used: the spec's, else qk_dim ** -0.5."""
        return self.sm_scale if self.sm_scale is not None else self.qk_dim ** -0.5


@dataclass(frozen=True)
class CacheSpec:
    """The paged KV caches of the decode path (dsagen.cache_formats): tokens per page and the
    formats of the MLA cache and the indexer key cache, by name."""

    page_size: int = 64
    mla_format: str = "deepseek_v32_fp8"
    index_format: str = "deepgemm_fp8"
    # tokens of the sliding-window cache attended in the same softmax as the selection (DeepSeek-V4:
    # the last 128); 0: none. decode() then takes window_cache and window_indices [B, s_q, window].
    window: int = 0


@dataclass(frozen=True)
class Spec:
    indexer: IndexerSpec = field(default_factory=IndexerSpec)
    topk: TopKSpec = field(default_factory=TopKSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    cache: CacheSpec | None = None  # optional: without it, no decode kernel is offered
    # pinned schedule knobs per kernel, and which of its variants: {"sparse_attention": {"block_h": 64, ...}}
    schedule: Mapping[str, Mapping[str, int | str]] = field(default_factory=dict, hash=False)
    name: str = "unnamed"

    def __post_init__(self) -> None:
        validate(self)
        # read-only after validation, so a checked spec cannot drift
        frozen = {k: MappingProxyType(dict(v)) for k, v in self.schedule.items()}
        object.__setattr__(self, "schedule", MappingProxyType(frozen))

    def pinned(self, kernel: str) -> dict[str, int | str]:
        return dict(self.schedule.get(kernel, {}))

    def to_dict(self) -> dict[str, Any]:
        """Plain data that spec_from_dict turns back into an equal Spec (sent to worker processes)."""
        attention = {k: v for k, v in asdict(self.attention).items() if v is not None}
        extra = {"cache": asdict(self.cache)} if self.cache is not None else {}
        return extra | {"name": self.name, "indexer": asdict(self.indexer), "topk": asdict(self.topk),
                "attention": attention, "schedule": {k: dict(v) for k, v in self.schedule.items()}}


# ---------------------------------------------------------------------------------------------
# validation

def _check_int(where: str, value: Any, lo: int, hi: int, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}={value!r} must be an integer ({what or f'{lo}..{hi}'})")
    if not lo <= value <= hi:
        raise SpecError(f"{where}={value} is out of range: allowed {what or f'{lo}..{hi}'}")


def _check_enum(where: str, value: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise SpecError(f"{where}={value!r} is not supported: allowed {', '.join(map(repr, allowed))}")


FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.1754943508222875e-38  # the smallest normal fp32


def softmax_scale_value(value: Any) -> tuple[float | None, str | None]:
    """(the scale as a float, None) or (None, what is wrong): a real number (Python or NumPy, not
    a bool), finite, > 0 and inside the fp32 range the kernels compute in."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        return None, f"must be a finite number > 0 (a float or int), got {type(value).__name__}"
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        return None, "must be a finite number > 0"
    if not FP32_TINY <= number <= FP32_MAX:
        return None, f"is outside the fp32 range the kernels compute in ({FP32_TINY:.3g} .. {FP32_MAX:.3g})"
    return number, None


def _validate_cache(spec: Spec) -> None:
    from .cache_formats import INDEX_FORMATS, MLA_FORMATS, MLABlockFormat, check_mla_page_size

    c, at, ix = spec.cache, spec.attention, spec.indexer
    if not isinstance(c, CacheSpec):
        raise SpecError("cache must be a [cache] table")
    _check_enum("cache.mla_format", c.mla_format, tuple(MLA_FORMATS))
    _check_enum("cache.index_format", c.index_format, tuple(INDEX_FORMATS))
    fmt = MLA_FORMATS[c.mla_format]
    if (problem := check_mla_page_size(fmt, c.page_size)) is not None:
        raise SpecError(f"cache.page_size={c.page_size!r} {problem}")
    if isinstance(fmt, MLABlockFormat):
        # V is the whole dequantized row (latent and rope), as q is
        width = fmt.v_dim
        if (at.qk_dim, at.v_dim) != (fmt.qk_dim, width):
            raise SpecError(f"cache.mla_format={c.mla_format!r} holds {fmt.latent_dim} latent + {fmt.rope_dim} rope "
                            f"values per token, all of them V: attention.qk_dim and attention.v_dim must both be "
                            f"{width}, got qk_dim={at.qk_dim}, v_dim={at.v_dim}")
    elif (at.v_dim, at.rope_dim) != (fmt.latent_dim, fmt.rope_dim):
        raise SpecError(f"cache.mla_format={c.mla_format!r} holds {fmt.latent_dim} latent + {fmt.rope_dim} rope "
                        f"values per token, but attention has v_dim={at.v_dim} and qk_dim - v_dim={at.rope_dim}")
    if ix.dtype != "fp8_e4m3":
        raise SpecError(f"cache.index_format={c.index_format!r} stores fp8 keys, but indexer.dtype={ix.dtype!r}")


def validate(spec: Spec) -> None:
    """Raise SpecError naming the key, the value and what is allowed; return None if valid."""
    ix, tk, at = spec.indexer, spec.topk, spec.attention
    _check_int("indexer.heads", ix.heads, 1, MAX_HEADS)
    _check_int("indexer.head_dim", ix.head_dim, 1, MAX_INDEXER_HEAD_DIM)
    _check_enum("indexer.dtype", ix.dtype, INDEXER_DTYPES)
    _check_int("topk.k", tk.k, 1, MAX_TOPK)
    if not isinstance(tk.fused, bool):
        raise SpecError(f"topk.fused={tk.fused!r} must be true or false")
    _check_int("attention.heads", at.heads, 1, MAX_HEADS)
    _check_int("attention.qk_dim", at.qk_dim, 1, MAX_V_DIM + MAX_ROPE_DIM)
    _check_int("attention.v_dim", at.v_dim, 1, MAX_V_DIM + MAX_ROPE_DIM)
    if at.v_dim > at.qk_dim:
        raise SpecError(f"attention.v_dim={at.v_dim} must be <= attention.qk_dim={at.qk_dim}")
    _check_int("attention.v_dim", at.v_dim, 1, MAX_V_DIM)
    if at.rope_dim > MAX_ROPE_DIM:
        raise SpecError(
            f"attention.qk_dim={at.qk_dim} is too large for attention.v_dim={at.v_dim}: "
            f"qk_dim - v_dim must be <= {MAX_ROPE_DIM}"
        )
    _check_enum("attention.dtype", at.dtype, ATTENTION_DTYPES)
    if not isinstance(at.sink, bool):
        raise SpecError(f"attention.sink={at.sink!r} must be true or false")
    if at.sm_scale is not None:
        number, problem = softmax_scale_value(at.sm_scale)
        if problem:
            raise SpecError(f"attention.sm_scale={at.sm_scale!r} {problem}")
        object.__setattr__(at, "sm_scale", number)  # a NumPy scalar becomes a plain float
    if spec.cache is not None:
        _validate_cache(spec)
        _check_int("cache.window", spec.cache.window, 0, MAX_WINDOW, f"0 (no window cache) .. {MAX_WINDOW} tokens")
    if not isinstance(spec.name, str) or not spec.name:
        raise SpecError(f"name={spec.name!r} must be a non-empty string")
    if not isinstance(spec.schedule, Mapping):
        raise SpecError("schedule must be a table of [schedule.<kernel>] tables")
    known = _kernel_names() if _kernel_names is not None else None
    for kernel, knobs in spec.schedule.items():
        if known is not None and kernel not in known:
            raise SpecError(f"schedule.{kernel} is not a kernel: allowed {', '.join(known)}")
        if not isinstance(knobs, Mapping):
            raise SpecError(f"schedule.{kernel} must be a table of knob = integer")
        for knob, value in knobs.items():
            if knob == VARIANT_KEY:
                _validate_variant(kernel, value)
            elif isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"schedule.{kernel}.{knob}={value!r} must be an integer")
    # knob names and values are checked against schedules/<backend>/<kernel>.toml by dsagen.schedule


def _validate_variant(kernel: str, value: Any) -> None:
    """A pinned variant names one of the kernel's declared algorithms."""
    known = _kernel_names() if _kernel_names is not None else ()
    allowed = _variant_names(kernel) if _variant_names is not None and kernel in known else None
    if isinstance(value, str) and (allowed is None or value in allowed):
        return
    if allowed is None:
        choices = "a variant name (a string)"
    elif allowed:
        choices = ", ".join(repr(v) for v in allowed)
    else:
        choices = f"none ({kernel} has one algorithm)"
    raise SpecError(f"schedule.{kernel}.{VARIANT_KEY}={value!r} is not a variant of {kernel}: allowed {choices}")


# ---------------------------------------------------------------------------------------------
# TOML

_SECTIONS: dict[str, tuple[type, set[str], set[str]]] = {
    # section: (dataclass, required keys, optional keys)
    "indexer": (IndexerSpec, {"heads", "head_dim", "dtype"}, set()),
    "topk": (TopKSpec, {"k"}, {"fused"}),
    "attention": (AttentionSpec, {"heads", "qk_dim", "v_dim", "dtype"}, {"sm_scale", "sink"}),
}
_OPTIONAL_SECTIONS: dict[str, tuple[type, set[str], set[str]]] = {
    "cache": (CacheSpec, set(), {"page_size", "mla_format", "index_format", "window"}),
}
_TOP_LEVEL = {"name", "indexer", "topk", "attention", "cache", "schedule"}


def spec_from_dict(data: Mapping[str, Any]) -> Spec:
    """Build a Spec from parsed TOML; unknown keys (typos) and missing keys are errors."""
    if not isinstance(data, Mapping):
        raise SpecError("a spec must be a TOML table")
    for key in data:
        if key not in _TOP_LEVEL:
            raise SpecError(f"unknown key {key!r}: allowed top-level keys are {', '.join(sorted(_TOP_LEVEL))}")
    sections = {}
    for name, (cls, required, optional) in _SECTIONS.items():
        table = data.get(name)
        if table is None:
            raise SpecError(f"missing section [{name}] (keys: {', '.join(sorted(required | optional))})")
        if not isinstance(table, Mapping):
            raise SpecError(f"{name} must be a table [{name}]")
        for key in table:
            if key not in required | optional:
                raise SpecError(
                    f"unknown key {name}.{key}: allowed keys are {', '.join(sorted(required | optional))}"
                )
        for key in sorted(required):
            if key not in table:
                raise SpecError(f"missing key {name}.{key}")
        sections[name] = cls(**table)
    for name, (cls, required, optional) in _OPTIONAL_SECTIONS.items():
        table = data.get(name)
        if table is None:
            continue
        if not isinstance(table, Mapping):
            raise SpecError(f"{name} must be a table [{name}]")
        for key in table:
            if key not in required | optional:
                raise SpecError(
                    f"unknown key {name}.{key}: allowed keys are {', '.join(sorted(required | optional))}")
        sections[name] = cls(**table)
    schedule = data.get("schedule", {})
    name = data.get("name", "unnamed")
    return Spec(schedule=schedule, name=name, **sections)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a TOML spec file (a leading UTF-8 byte-order mark, as some Windows editors
    write, is not part of the TOML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SpecError(f"cannot read spec file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # the parser recurses per nested array or inline table
        raise SpecError(f"{path}: not valid TOML: nested too deeply") from None
    try:
        return spec_from_dict(data)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except RecursionError:  # a value deep enough to parse, but not to check or print
        raise SpecError(f"{path}: a value is nested too deeply") from None
