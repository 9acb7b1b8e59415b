"""Losses of NADO-regularised fine-tuning (docs/method.md): small pure per-token functions.

`from jaxdetox import losses` exposes everything below; the submodules group them:
`token` (vocabulary-level NLL, guided teacher, closed-form KL), `nado` (the auxiliary
model's BCE, consistency and importance weights), `teacher` (heads and the `Teacher` type:
the guided teacher's hidden states and heads), `chunked` (the memory-lean LM and NADO
losses computed from hidden states and head weights, for 128k vocabularies), `fused` (the
train steps' LM loss, its gradient formed chunk by chunk in the forward pass) and `policy`
(the sequence-level REINFORCE and DPO losses of the baselines). The full-logit reference
forms the tests compare with live in `jaxdetox.losses.reference`, which is not imported
here and which library code never imports.
"""

from jaxdetox.losses.chunked import (
    NadoLoss,
    RegularizedLoss,
    chunked_guided_nll,
    chunked_nll,
    default_chunk_size,
    nado_losses,
    regularized_lm_loss,
    regularized_lm_loss_terms,
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
from jaxdetox.losses.teacher import Head, Teacher, head_logits
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
    "Head",
    "NadoLoss",
    "RegularizedLoss",
    "ReinforceTerms",
    "Teacher",
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
    "nado_bce",
    "nado_losses",
    "nado_consistency",
    "one_step_expectation",
    "regularized_lm_loss",
    "regularized_lm_loss_terms",
    "reinforce_loss",
    "selected_head_logits",
    "select_logits",
    "self_normalized_weights",
    "soft_cross_entropy",
    "tempered_importance_weights",
    "token_kl",
    "token_nll",
    "upcast",
]
