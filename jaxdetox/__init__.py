"""jaxdetox: attribute-controlled (NADO-regularised) fine-tuning of LLMs in JAX/Flax."""

__version__ = "0.1.0"
