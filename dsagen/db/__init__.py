"""The per-GPU tuning database, as builds read it at run time: one JSON file per GPU type
(autotune_db/nvidia-h200.json, ...) holding the fastest schedule measured per (kernel, backend,
spec hash, shape bucket).

- schema.py: Entry, the file format, parsing and validation (TuningDBError, FORMAT, VERSION)
- store.py: the folders and files (user's, shipped), load/save, and the locked writers record,
  merge, prune and annotate
- lookup.py: lookup (what a build asks), Found, stale_fields, running_versions, effective_entries
- buckets.py: shape buckets (bucket_of, parse_bucket, bucket_distance) and named SHAPE_SETS

The offline side (Optuna studies, worker processes, `dsagen db`) lives in dsagen.tuning and
writes through record/merge/prune; nothing here imports it, Optuna or typer.

Note: `lookup` here is the function; the module of the same name is dsagen.db.lookup in
sys.modules (importlib.import_module("dsagen.db.lookup") returns it).
"""
from .buckets import SHAPE_SETS, bucket_distance, bucket_of, parse_bucket
from .schema import (FORMAT, KERNEL_NAME, NULLABLE_VERSIONS, VERSION, VERSION_KEYS, Entry, Key, TuningDB,
                     TuningDBError, check_gpu_type, dump, parse, recordable_semantics)
from .store import (annotate, check_writable, db_files, db_path, default_dirs, load, lock_for, merge, prune, record,
                    save, shipped_db_dir, user_db_dir)
from .lookup import Found, effective_entries, lookup, running_versions, stale_fields  # rebinds `lookup`

__all__ = [
    "FORMAT", "KERNEL_NAME", "NULLABLE_VERSIONS", "SHAPE_SETS", "VERSION", "VERSION_KEYS", "Entry", "Found", "Key",
    "TuningDB", "TuningDBError", "annotate", "bucket_distance", "bucket_of", "check_gpu_type", "check_writable",
    "db_files", "db_path", "default_dirs", "dump", "effective_entries", "load", "lock_for", "lookup", "merge", "parse",
    "parse_bucket", "prune", "record", "recordable_semantics", "running_versions", "save", "shipped_db_dir",
    "stale_fields", "user_db_dir",
]
