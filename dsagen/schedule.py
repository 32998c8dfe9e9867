"""Search spaces (schedules/<backend>/<kernel>.toml) and choosing one schedule for a build.

A space lists each knob's allowed values and default, a footprint (shared memory, registers) and
legality constraints, all as sympy expressions over knobs and problem symbols (dsagen.plan).
Illegal points are removed before anything is compiled. A kernel with several algorithms (the op's
`variants`) has one space per variant; a schedule mapping (a spec's pinned table, an override, a
tuning-database entry) names its variant with the string key `variant`, and a chosen schedule
carries it beside its knobs.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Mapping

import sympy as sp

from .backends import BACKENDS
from .errors import ScheduleError
from .gpus import GPU
from .ops import Op, as_op
from .ops.base import Variant, Where
from .plan import problem_symbols
from .spec import VARIANT_KEY, Spec, known_variants

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

# names sympify may see in a schedule file; nothing else is evaluated
_SYMPY_NAMES = {"Max": sp.Max, "Min": sp.Min, "Mod": sp.Mod, "Eq": sp.Eq, "ceiling": sp.ceiling,
                "floor": sp.floor, "log": sp.log}


@dataclass(frozen=True)
class Knob:
    name: str
    values: tuple[int, ...]
    default: int
    help: str


@dataclass(frozen=True)
class Space:
    backend: str
    kernel: str
    knobs: dict[str, Knob]
    footprint: dict[str, sp.Expr]
    constraints: dict[str, sp.Expr]
    variant: str | None = None  # the algorithm this space is of (None: the op declares none)

    def _env(self, point: Mapping[str, int], problem: Mapping[str, int]) -> dict[sp.Symbol, int]:
        env = {sp.Symbol(k): v for k, v in {**problem, **point}.items()}
        for name, expr in self.footprint.items():
            env[sp.Symbol(name)] = expr.xreplace(env)  # every symbol numeric: xreplace evaluates, far faster than subs
        return env

    def footprint_of(self, point: Mapping[str, int], problem: Mapping[str, int]) -> dict[str, float]:
        env = self._env(point, problem)
        return {name: float(env[sp.Symbol(name)]) for name in self.footprint}

    def violations(self, point: Mapping[str, int], problem: Mapping[str, int]) -> list[str]:
        """Names (with the expression) of the constraints this point breaks; empty if legal."""
        missing = sorted(set(self.knobs) - set(point))
        if missing:
            raise ScheduleError(f"{self.backend}/{self.kernel}: the schedule has no value for {', '.join(missing)}")
        env = self._env(point, problem)
        broken = []
        for name, expr in self.constraints.items():
            if not bool(expr.xreplace(env)):
                broken.append(f"{name} ({expr})")
        return broken

    def grid(self) -> list[dict[str, int]]:
        names = list(self.knobs)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.knobs[n].values for n in names))]

    def legal_points(self, problem: Mapping[str, int]) -> list[dict[str, int]]:
        """Every grid point that satisfies all constraints (vectorised with lambdify)."""
        names = list(self.knobs)
        fp = {sp.Symbol(n): e for n, e in self.footprint.items()}
        exprs = [c.subs(fp).subs({sp.Symbol(k): v for k, v in problem.items()}) for c in self.constraints.values()]
        fns = [sp.lambdify([sp.Symbol(n) for n in names], e, modules=[{"Max": max, "Min": min}, "math"])
               for e in exprs]
        return [p for p in self.grid() if all(bool(f(*p.values())) for f in fns)]

    def default_point(self) -> dict[str, int]:
        return {n: k.default for n, k in self.knobs.items()}

    def names_every_knob(self, point: Mapping[str, int]) -> bool:
        """The point names exactly this space's knobs (an entry from before a knob was added does not)."""
        return set(point) == set(self.knobs)

    def check_names(self, point: Mapping[str, int], where: str) -> None:
        for name, value in point.items():
            if name not in self.knobs:
                of = f" (variant {self.variant})" if self.variant is not None else ""
                raise ScheduleError(
                    f"{where}.{name} is not a knob of {self.backend}/{self.kernel}{of}: "
                    f"allowed {', '.join(self.knobs)}")
            allowed = self.knobs[name].values
            if value not in allowed:
                raise ScheduleError(f"{where}.{name}={value!r} is not allowed: choose one of {list(allowed)}")


def _parse_expr(text: str, where: str) -> sp.Expr:
    try:
        return sp.sympify(text, locals=_SYMPY_NAMES)
    except (sp.SympifyError, SyntaxError, TypeError) as exc:
        raise ScheduleError(f"{where}: cannot parse expression {text!r}: {exc}") from None


def variant_names(kernel: str | Op) -> tuple[str, ...]:
    """The names of the variants `kernel` declares (empty: it has one algorithm)."""
    return tuple(v.name for v in as_op(kernel).variants if v.name is not None)


known_variants(variant_names)


def get_variant(op: Op, backend: str, name: str | None) -> Variant:
    """The variant `name` of `op` on `backend` (None: its first), or a ScheduleError naming the allowed."""
    try:
        return op.variant(backend, name)
    except ValueError as exc:
        raise ScheduleError(str(exc)) from None


def split_variant(op: Op, backend: str, schedule: Mapping[str, int | str]) -> tuple[str | None, dict[str, int]]:
    """(the variant a schedule mapping names, or None; its knobs)."""
    knobs = dict(schedule)
    name = knobs.pop(VARIANT_KEY, None)
    if name is not None:
        get_variant(op, backend, name)
    return name, knobs  # type: ignore[return-value]


def recorded_schedule(op: Op, backend: str, schedule: Mapping[str, int | str]) -> tuple[str | None, dict[str, int]]:
    """(variant, knobs) of a schedule a tuning database holds: an older form upgraded by the op, and
    one that names no variant read as the op's first; a ScheduleError for a variant it lacks."""
    name, knobs = split_variant(op, backend, op.upgrade_schedule(schedule))
    return (name if name is not None else get_variant(op, backend, None).name), knobs


def load_space(backend: str, kernel: str | Op, variant: str | None = None) -> Space:
    """The search space of `kernel` (an op, or its name) on `backend`: of its variant `variant`
    (None: the first declared, or the op's only one)."""
    return _load_space(backend, as_op(kernel), variant)


@functools.lru_cache(maxsize=None)
def _load_space(backend: str, op: Op, variant: str | None) -> Space:
    kernel = op.name
    if backend not in BACKENDS:
        raise ScheduleError(f"backend={backend!r} is not supported: allowed {', '.join(BACKENDS)}")
    if backend not in op.backends:
        raise ScheduleError(f"{kernel} has no {backend} template: its backends are {', '.join(op.backends)}")
    chosen = get_variant(op, backend, variant)
    path = op.root("schedules") / backend / f"{chosen.schedule}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ScheduleError(f"no search space for {backend}/{kernel} at {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScheduleError(f"{path}: not valid TOML: {exc}") from None
    knobs = {}
    for name, table in data.get("knobs", {}).items():
        values = tuple(int(v) for v in table["values"])
        default = int(table["default"])
        if default not in values:
            raise ScheduleError(f"{path}: knobs.{name}.default={default} is not among its values")
        knobs[name] = Knob(name, values, default, str(table.get("help", "")))
    footprint = {n: _parse_expr(t, f"{path} footprint.{n}") for n, t in data.get("footprint", {}).items()}
    constraints = {n: _parse_expr(t, f"{path} constraints.{n}") for n, t in data.get("constraints", {}).items()}
    return Space(backend, kernel, knobs, footprint, constraints, chosen.name)


@dataclass(frozen=True)
class Choice:
    """The schedule a build uses and where it came from (printed by `dsagen check` / logs)."""

    kernel: str
    point: dict[str, int]
    source: str  # "pinned", "pinned+default", "default", "default (nearest legal)"
    variant: str | None = None  # the algorithm the point is of (None: the op declares none)


def _distance(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    return sum(abs(math.log2(max(a[k], 1)) - math.log2(max(b[k], 1))) for k in a)


def pick_variant(op: Op, backend: str, name: str | None, where: Where | None, label: str) -> Variant:
    """The variant a schedule runs: the one named, else the first that may run on `where` (None:
    anywhere). A named one that may not run there is an error on a GPU; the CPU rendering runs the
    first variant that may run there instead (the interpreter never runs a GPU generation's kernel)."""
    if name is not None:
        chosen = get_variant(op, backend, name)
        if where is None or chosen.may_run(where):
            return chosen
        if where.device_type == "cuda":
            cc = where.compute_capability
            on = f"compute capability {cc[0]}.{cc[1]}" if cc else "a GPU of unknown compute capability"
            raise ScheduleError(f"{label}.{VARIANT_KEY}={name!r} cannot run on {on}: it runs on {chosen.requirement()}")
    runnable = op.variants_for(backend) if where is None else op.runnable_variants(backend, where)
    if not runnable:
        raise ScheduleError(f"no variant of {op.name} ({backend}) runs on {where}")
    return runnable[0]


def choose(spec: Spec, kernel: str | Op, gpu: GPU, backend: str = "triton",
           override: Mapping[str, int | str] | None = None, where: Where | None = None) -> Choice:
    """Pinned knobs from the spec (or override), the rest from defaults; always legal or an error.

    The variant is the pinned one, else the first that may run on `where` (pick_variant). A default
    that is illegal for this spec (say block_h=64 for 3 heads) moves to the nearest legal grid
    point; pinned knobs never move: an illegal pinned point is an error naming the constraint.
    """
    op = as_op(kernel)
    kernel = op.name
    pinned = dict(override) if override is not None else spec.pinned(kernel)
    where_label = "override" if override is not None else f"schedule.{kernel}"
    name, pinned = split_variant(op, backend, pinned)
    variant = pick_variant(op, backend, name, where, where_label)
    space = load_space(backend, op, variant.name)
    problem = problem_symbols(spec, op, gpu)
    if name is not None and variant.name != name:  # the CPU rendering of a GPU-only variant: its knobs this one has
        pinned = {k: v for k, v in pinned.items() if k in space.knobs}
    space.check_names(pinned, where_label)
    point = space.default_point() | pinned
    broken = space.violations(point, problem)
    if not broken:
        asked = bool(pinned) or name is not None  # a pinned variant is a pin too
        source = "pinned" if len(pinned) == len(space.knobs) else ("pinned+default" if asked else "default")
        return Choice(kernel, point, source, variant.name)
    candidates = [p for p in space.legal_points(problem) if all(p[k] == v for k, v in pinned.items())]
    if not candidates:
        shown = pinned if variant.name is None else {VARIANT_KEY: variant.name, **pinned}
        raise ScheduleError(
            f"{where_label} {shown} is illegal for this spec on {gpu.name}: breaks {'; '.join(broken)}")
    best = min(candidates, key=lambda p: _distance(p, point))
    asked = bool(pinned) or name is not None
    return Choice(kernel, best, "pinned+nearest legal" if asked else "default (nearest legal)", variant.name)
