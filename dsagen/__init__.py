"""dsagen: a compiler for DeepSeek Sparse Attention kernels.

spec (TOML) -> plan (sympy) -> schedule -> render (Jinja) -> compile/load (Triton) -> run (torch).
"""
from .__version__ import __version__
from .errors import BackendError, DsagenError, ScheduleError, SpecError
from .kernels import DSAKernels, DSAOutput, build
from .spec import AttentionSpec, IndexerSpec, Spec, TopKSpec, load_spec, spec_from_dict

__all__ = [
    "__version__", "AttentionSpec", "BackendError", "DSAKernels", "DSAOutput", "DsagenError",
    "IndexerSpec", "ScheduleError", "Spec", "SpecError", "TopKSpec", "build", "load_spec", "spec_from_dict",
]
