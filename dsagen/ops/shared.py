"""Constants and small facts more than one op needs, kept here so that no op imports another's."""
from __future__ import annotations

import torch

from ..cache_formats import MLA_FORMATS, MLACacheFormat
from .checks import softmax_scale
from .signature import Arg

TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp32": torch.float32}
ELEM_BYTES = {"fp8_e4m3": 1, "bf16": 2, "fp32": 4}

# the run-time softmax scale every attention op takes: None (or left out) means the spec's
SM_SCALE = Arg("sm_scale", "float", from_spec=softmax_scale)

# query tokens each request brings per decode step in the decode ops' workloads and costs
# (multi-token prediction's usual 2): the cache write, the paged indexer, its top-k and the sparse
# decode agree
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


def mla_format(spec) -> MLACacheFormat:
    """The MLA cache row layout a decode spec names."""
    return MLA_FORMATS[spec.cache.mla_format]
