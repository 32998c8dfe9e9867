"""dsagen: a compiler for DeepSeek Sparse Attention kernels.

spec (TOML) -> plan (sympy) -> resolve a schedule -> lower -> render (Jinja) -> compile/load (Triton,
TVM) -> run (torch, through the dsagen::<kernel> ops). Every kernel is an op of `dsagen.ops`.
"""
from .__version__ import __version__
from .errors import BackendError, DsagenError, ScheduleError, SpecError
from . import ops, varlen
from .kernels import DSAKernels, DSAOutput, build
from .spec import AttentionSpec, CacheSpec, IndexerSpec, Spec, TopKSpec, load_spec, spec_from_dict
from .ops.indexer_loss import dense_window_indices

__all__ = [
    "__version__", "AttentionSpec", "BackendError", "CacheSpec", "DSAKernels", "DSAOutput", "DsagenError",
    "IndexerSpec", "ScheduleError", "dense_window_indices", "Spec", "SpecError", "TopKSpec", "build", "load_spec", "ops", "spec_from_dict",
    "varlen",
]
