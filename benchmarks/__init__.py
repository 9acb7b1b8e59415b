"""jaxdetox benchmarks: each module is a suite usable alone; `python -m benchmarks.run` runs them all."""
