"""The parallel scheme (the paper's Fig. 2), colocated placement.

In iteration i ≥ 2 three roles consume only artefacts of earlier iterations:

    (A) train_nado: NADO_i ← train(init NADO_{i−1}, samples S_{i−2})
    (B) finetune:   LLM_i  ← finetune(LLM_{i−1}, teacher reference ⊕ NADO_{i−1}, S_{i−2})
    (C) sample:     S_{i−1} ← sample(LLM_{i−1}) on a fresh prompt block, then label

so no role waits for another inside an iteration; S_j is sampled from LLM_j. Iteration 1 is
the warm-up, run as the sequential scheme would (there is no S_{−1}): S_0 from the base
model, NADO_1 on S_0, LLM_1 with NADO_1 on S_0. Iteration 2 then trains on S_0 once more
(S_{i−2} = S_0) while S_1 is sampled.

`colocated` runs the three roles one after another on the whole mesh: the data flow (and so
every result) of the parallel scheme, without the concurrency; the manifest's `inputs`
record exactly which versions each stage consumed.
"""

from __future__ import annotations

from jaxdetox.loop.experiment import Experiment
from jaxdetox.loop.sequential import (
    eval_due,
    evaluate,
    export_final,
    finetune,
    sample_and_label,
    train_nado,
)


def run_parallel(exp: Experiment) -> None:
    """All iterations of the parallel scheme (colocated), evaluations, then the export."""
    n = exp.config.loop.iterations
    if eval_due(exp, 0):
        evaluate(exp, 0)
    # Warm-up (iteration 1): sequential on S_0.
    sample_and_label(exp, 1, lm_version=0, samples=0, block=0)
    train_nado(exp, 1, nado_version=0, samples=0)
    finetune(exp, 1, lm_version=0, nado_version=1, samples=0)
    if eval_due(exp, 1):
        evaluate(exp, 1)
    for i in range(2, n + 1):
        sample_and_label(exp, i, lm_version=i - 1, samples=i - 1, block=i - 1)  # (C)
        train_nado(exp, i, nado_version=i - 1, samples=i - 2)  # (A)
        finetune(exp, i, lm_version=i - 1, nado_version=i - 1, samples=i - 2)  # (B)
        if eval_due(exp, i):
            evaluate(exp, i)
    export_final(exp, n)
