"""Autotuning: shape buckets, the per-GPU tuning database, Optuna studies."""
