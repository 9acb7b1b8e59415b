"""The parallel scheme (the paper's Fig. 2), colocated placement.

In iteration i ≥ 2 three roles consume only artefacts of earlier iterations:

    (A) train_nado: NADO_i ← train(init NADO_{i−1}, samples S_{i−2})
    (B) finetune:   LLM_i  ← finetune(LLM_{i−1}, teacher reference ⊕ NADO_{i−1}, S_{i−2})
    (C) sample:     S_{i−1} ← sample(LLM_{i−1}) on a fresh prompt block, then label

so no role waits for another inside an iteration; S_j is sampled from LLM_j. Iteration 1 is
the warm-up, run as the sequential scheme would (there is no S_{−1}): S_0 from the base
model, NADO_1 on S_0, LLM_1 with NADO_1 on S_0. Iteration 2 then trains on S_0 once more
(S_{i−2} = S_0) while S_1 is sampled.

The flow is `flow.plan_stages`; `loop.placement` says where the roles run (placement.py):
`colocated` runs them one after another on the whole mesh — the data flow (and so every
result) of the parallel scheme without the concurrency — `split` concurrently on disjoint
sub-meshes of one host, `jobs` as separate programs. The manifest's `inputs` record exactly
which versions each stage consumed.
"""

from __future__ import annotations

from jaxdetox.loop.experiment import Experiment


def run_parallel(exp: Experiment) -> None:
    """All iterations of the parallel scheme on one mesh (colocated), then the export."""
    from jaxdetox.loop.placement import run_colocated

    run_colocated(exp)
