"""DSA split across GPUs (context parallelism) on torch.distributed: NCCL on GPUs, gloo on CPUs.

The generated kernels run unchanged on each rank's shard; this package maps windows and positions
between global and local rows, exchanges what the math needs (int32 indices, int64 top-k
candidates, partial attention outputs and their LSEs, KV rows and their gradients) and merges it
exactly. docs/distributed.md describes the API and the bytes each step puts on the wire.

- prefill, query rows split: row_sharded_select (indices all-gathered);
- prefill, keys split (contiguous or round robin): key_sharded_select (exact global top-k) and
  key_sharded_attention (partial attention per rank, LSE merge);
- decode, paged caches split round robin: sharded_decode (and sharded_decode_select);
- training, the sequence split: sharded_sparse_attention and sharded_indexer_loss (autograd:
  KV all-gathered, its gradient reduce-scattered);
- merge_attention: the LSE merge of partial attention outputs from any source.
"""
from .attention import key_sharded_attention, merge_attention_over_ranks
from .comm import WireBytes, all_gather_rows, all_gather_stacked, count_wire_bytes, reduce_scatter_rows
from .decode import ShardedDecodeOutput, sharded_decode, sharded_decode_select
from .merge import merge_attention
from .select import (KeySelection, RowSelection, key_sharded_select, local_topk, merge_topk, row_sharded_select,
                     selection_keys)
from .sharding import Sharding, round_robin_count
from .training import GatherRows, gather_rows, sharded_indexer_loss, sharded_sparse_attention

__all__ = [
    "GatherRows", "KeySelection", "RowSelection", "Sharding", "ShardedDecodeOutput", "WireBytes", "all_gather_rows",
    "all_gather_stacked", "count_wire_bytes", "gather_rows", "key_sharded_attention", "key_sharded_select",
    "local_topk", "merge_attention", "merge_attention_over_ranks", "merge_topk", "reduce_scatter_rows",
    "round_robin_count", "row_sharded_select", "selection_keys", "sharded_decode", "sharded_decode_select",
    "sharded_indexer_loss", "sharded_sparse_attention",
]
