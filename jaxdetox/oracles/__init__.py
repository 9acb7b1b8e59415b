"""Toxicity oracles behind one protocol: `load(name).score(texts) -> (toxicity, ok)`."""
