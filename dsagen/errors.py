"""Errors users see. Each names the field or argument at fault and what is allowed."""


class DsagenError(Exception):
    """Base of every error dsagen raises on purpose (the CLI prints these as one line)."""


class SpecError(DsagenError, ValueError):
    """A spec file or Spec object is invalid."""


class ScheduleError(DsagenError, ValueError):
    """A schedule knob is unknown, out of its allowed values, or illegal for the spec."""


class BackendError(DsagenError, RuntimeError):
    """A backend is missing or cannot compile/load a generated module."""
