"""Losses of NADO-regularised fine-tuning (docs/method.md): small pure per-token functions.

`from jaxdetox import losses` exposes everything below; the submodules group them:
`token` (vocabulary-level NLL, guided teacher, closed-form KL), `nado` (the auxiliary
model's BCE, consistency and importance weights) and `chunked` (the memory-lean LM and
NADO losses computed from hidden states and head weights, for 128k vocabularies) and
`policy` (the sequence-level REINFORCE and DPO losses of the baselines).
"""

from jaxdetox.losses.chunked import (
    NadoLoss,
    RegularizedLoss,
    chunked_guided_nll,
    chunked_nll,
    default_chunk_size,
    head_logits,
    nado_losses,
    nado_losses_naive,
    naive_nll,
    regularized_lm_loss,
    regularized_lm_loss_naive,
    selected_head_logits,
)
from jaxdetox.losses.fused import FusedLoss, fused_lm_loss
from jaxdetox.losses.nado import (
    CONSISTENCY_KINDS,
    bce_of_selected,
    bernoulli_kl,
    consistency_of,
    nado_bce,
    nado_consistency,
    one_step_expectation,
    select_logits,
    self_normalized_weights,
    tempered_importance_weights,
)
from jaxdetox.losses.policy import (
    DpoTerms,
    ReinforceTerms,
    dpo_loss,
    moving_average,
    reinforce_loss,
)
from jaxdetox.losses.token import (
    apply_mask,
    guided_log_probs,
    log_softmax,
    soft_cross_entropy,
    token_kl,
    token_nll,
    upcast,
)

__all__ = [
    "CONSISTENCY_KINDS",
    "DpoTerms",
    "FusedLoss",
    "NadoLoss",
    "RegularizedLoss",
    "ReinforceTerms",
    "apply_mask",
    "bce_of_selected",
    "bernoulli_kl",
    "consistency_of",
    "chunked_guided_nll",
    "chunked_nll",
    "default_chunk_size",
    "dpo_loss",
    "fused_lm_loss",
    "guided_log_probs",
    "head_logits",
    "log_softmax",
    "moving_average",
    "naive_nll",
    "nado_bce",
    "nado_losses",
    "nado_losses_naive",
    "nado_consistency",
    "one_step_expectation",
    "regularized_lm_loss",
    "reinforce_loss",
    "regularized_lm_loss_naive",
    "selected_head_logits",
    "select_logits",
    "self_normalized_weights",
    "soft_cross_entropy",
    "tempered_importance_weights",
    "token_kl",
    "token_nll",
    "upcast",
]
