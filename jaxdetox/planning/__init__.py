"""Planning a run from its config alone: the per-device memory planner (`memory.py`), the
`--dry-run` / `jaxdetox plan` plan (`plan.py`) and the start-up checks (`preflight.py`)."""
