"""Drop-in entry points with the signatures and semantics of the kernels serving engines call
today, so that an engine switches by changing one import:

- `dsagen.compat.deep_gemm`: `fp8_fp4_mqa_logits`, `fp8_fp4_paged_mqa_logits`, `get_num_sms`,
  `set_num_sms`, `get_paged_mqa_logits_metadata`, and the older `fp8_mqa_logits`,
  `fp8_paged_mqa_logits` (DeepGEMM's DSA indexer).
- `dsagen.compat.flash_mla`: `get_mla_metadata`, `FlashMLASchedMeta`, `flash_mla_with_kvcache` on
  its sparse FP8 path (decode over the V3.2 or MODEL1 cache, with sinks, the window cache and
  per-request top-k lengths), `flash_mla_sparse_fwd` (sparse bf16 prefill: out, max_logits, lse).

The spec is inferred from the tensors (head counts, dims, top-k, page size), each inferred spec
is built once per process, and the tuned schedules come from the tuning database. Where the peers
refuse a shape (head counts, next_n), these accept it. Every argument is checked before anything
is built or launched, and an error names the function and the caller's argument (TypeError for a
value of the wrong type, ValueError for a wrong dtype, shape or value, RuntimeError for inputs
that require grad: like the peers, these have no backward).
"""
