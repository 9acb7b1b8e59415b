"""A run: the experiment's parts (context, artefacts, samplers, prompts, constraints), the
run directory and manifest, the data flow as data, the stages and the one executor that
runs them under every placement."""
