"""Flax NNX model families (Llama, GPT-2), the NADO auxiliary model and HF/GGUF interop."""
