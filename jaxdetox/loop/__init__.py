"""The iteration schemes: run directory and manifest, shared experiment state, the stages,
the sequential loop and `--dry-run` planning."""
