"""The NADO's outputs on labelled samples, for its held-out quality (no update).

`nado_outputs(state, batch)` is a pure function run by a `StepRunner(returns_state=False)`
on the training stage's mesh: per sample row the NADO logits of the realised next tokens
(what the BCE reads) and the full vocabulary logits at the row's last completion position
(the probe `evaluate.nado_quality` uses for the rows training moved).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdetox import losses
from jaxdetox.train.state import Models, TrainState, bind
from jaxdetox.train.steps import lm_hidden


def nado_outputs(
    state: TrainState, batch: dict[str, dict[str, jax.Array]], *, models: Models
) -> dict[str, jax.Array]:
    """`{"token_logit_bt": h_φ(y_≤t)[y_t+1], "probe_logits_bv": h_φ(y_≤t_last)[·]}` of the
    samples stream (t_last: the row's last loss-mask position; rows without one: position 0)."""
    stream = batch["samples"]
    nado = bind(models.nado, state.nado.params)
    lm_features = None
    if nado.config.variant == "shared":  # the head reads the LM's final hidden states
        ref_graph = models.lm if models.ref is None else models.ref
        lm_features, _ = lm_hidden(ref_graph, state.nado_reference, stream)
    f_btd, _ = nado.hidden_states(
        stream["tokens_bt"],
        positions_bt=stream["positions_bt"],
        segment_ids_bt=stream["segment_ids_bt"],
        lm_hidden_btd=lm_features,
    )
    head = nado.unembed_weights()
    mask_bt = stream["loss_mask_bt"] != 0
    targets_bt = jnp.where(mask_bt, stream["targets_bt"], 0)
    token_logit_bt = losses.selected_head_logits(f_btd, head, targets_bt)
    t = jnp.arange(mask_bt.shape[1])
    last_b = jnp.max(jnp.where(mask_bt, t[None, :], 0), axis=1)
    f_bd = jnp.take_along_axis(f_btd, last_b[:, None, None], axis=1)[:, 0]
    return {
        "token_logit_bt": token_logit_bt,
        "probe_logits_bv": losses.head_logits(f_bd, head),
    }
