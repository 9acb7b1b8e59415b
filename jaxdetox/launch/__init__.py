"""Launch helpers: the recommended XLA flags and environment per platform (`xla_flags`),
applied by gpu_scripts/launch.sh. The TPU and GPU scripts themselves live in tpu_scripts/
and gpu_scripts/ (docs/scaling.md)."""
