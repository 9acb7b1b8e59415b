"""Launch helpers: the recommended XLA flags and environment per platform (`xla_flags`) and
the device-memory figures the planner uses (`devices`)."""
