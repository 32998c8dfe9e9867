"""What a kernel takes and gives, declared once: its arguments (name, torch schema type, default),
the outputs it returns, the optional outputs a caller may also pass as buffers, and what it writes
in place.

Everything else is derived from it: the torch.library schemas (`dsagen::<kernel>` and, where the
kernel has outputs, its mutating variant `dsagen::<kernel>_out`), the `inspect.Signature` of the
build's method, binding a call's arguments by name, and the spec defaults filled in by name.
"""
from __future__ import annotations

import inspect
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

REQUIRED = inspect.Parameter.empty
KINDS = ("Tensor", "Tensor?", "float", "int")


@dataclass(frozen=True)
class Arg:
    """One argument. `kind` is what the launcher receives (a torch schema type). `from_spec`
    declares a spec default: the public default is None, and the value launched is
    from_spec(spec, given) (the spec's when None, else the given one, checked)."""

    name: str
    kind: str = "Tensor"
    default: Any = REQUIRED
    from_spec: Callable[[Any, Any], Any] | None = None
    mutated: bool = False  # written in place (the kernel's output lives in this input)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"argument {self.name!r}: kind={self.kind!r}, allowed {', '.join(KINDS)}")
        if self.from_spec is not None and self.default is REQUIRED:
            object.__setattr__(self, "default", None)


@dataclass(frozen=True)
class Signature:
    """A kernel's arguments, the outputs it returns (in order) and its extra optional outputs:
    buffers written only when the caller passes one (say, sparse attention's max_logits)."""

    args: tuple[Arg, ...]
    returns: tuple[str, ...] = ("out",)
    extra_outputs: tuple[str, ...] = ()
    _python: inspect.Signature = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_python", self._make_python_signature())

    # -- names ----------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)

    @property
    def buffers(self) -> tuple[str, ...]:
        """Every output a caller may pass as a buffer, by keyword."""
        return self.returns + self.extra_outputs

    @property
    def mutated(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args if a.mutated)

    def arg(self, name: str) -> Arg:
        return next(a for a in self.args if a.name == name)

    # -- Python -----------------------------------------------------------------------------
    def _make_python_signature(self) -> inspect.Signature:
        params = [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=a.default)
                  for a in self.args]
        params += [inspect.Parameter(b, inspect.Parameter.KEYWORD_ONLY, default=None) for b in self.buffers]
        return inspect.Signature(params)

    def python(self) -> inspect.Signature:
        """The signature a build's method shows (help(), inspect.signature)."""
        return self._python

    def method(self) -> inspect.Signature:
        """The same, with `self` first (what a method defined in a class shows unbound)."""
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return self._python.replace(parameters=[self_param, *self._python.parameters.values()])

    def bind(self, kernel: str, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Every argument and buffer by name (defaults applied), or TypeError naming the kernel."""
        try:
            bound = self._python.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"dsagen.{kernel}: {exc} (signature: {kernel}{self._python})") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def inputs(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        return {a.name: bound[a.name] for a in self.args}

    def given_buffers(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        return {b: bound[b] for b in self.buffers if bound.get(b) is not None}

    def fill(self, spec, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs as the launcher takes them: each spec default filled in (by name)."""
        return {a.name: a.from_spec(spec, inputs[a.name]) if a.from_spec is not None else inputs[a.name]
                for a in self.args}

    # -- torch.library ----------------------------------------------------------------------
    def schema(self, name: str) -> str:
        """dsagen::<name>: the inputs, then the build handle; the outputs returned."""
        letters = iter(string.ascii_lowercase)
        params = [self._schema_arg(a, letters) for a in self.args]
        returns = "Tensor" if len(self.returns) == 1 else "(" + ", ".join("Tensor" for _ in self.returns) + ")"
        returns = "()" if not self.returns else returns
        return f"{name}({', '.join(params + ['str build'])}) -> {returns}"

    def out_schema(self, name: str) -> str:
        """dsagen::<name>_out: the same inputs, then every output as a buffer written in place (the
        returned ones always given, the extra ones optional); returns nothing."""
        letters = iter(string.ascii_lowercase)
        params = [self._schema_arg(a, letters) for a in self.args]
        params += [f"Tensor({next(letters)}!) {b}" for b in self.returns]
        params += [f"Tensor({next(letters)}!)? {b}" for b in self.extra_outputs]
        return f"{name}_out({', '.join(params + ['str build'])}) -> ()"

    @staticmethod
    def _schema_arg(a: Arg, letters) -> str:
        kind = f"Tensor({next(letters)}!)" if a.mutated else a.kind
        return f"{kind} {a.name}"


def tensor(name: str, optional: bool = False, mutated: bool = False) -> Arg:
    return Arg(name, "Tensor?" if optional else "Tensor", mutated=mutated)
