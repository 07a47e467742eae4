"""Evaluation: a split encoded once through the feature cache (encode), scored under one of
the EMCL modes (scoring), the engine's per-epoch validation (validation), and a run's
checkpoints evaluated into metrics.json / metrics.md (run)."""
