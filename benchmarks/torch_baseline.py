"""The PyTorch side of the train-step comparisons (baselines, not library code).

`HFStep`: transformers' SFT step. `TorchRegularizedStep`: the regularised LLM update the way
the authors' code does it — full `[B, T, V]` logits of the student, the frozen reference
and the NADO are materialised; the teacher is q = softmax(ref + α·logsigmoid(nado)) (the
NADO before this update); the student gets KL(q ‖ p_θ) per token over the vocabulary, and,
with `train_nado`, the NADO gets its BCE on the logit of the realised next token against the
sequence label (the joint / parallel-scheme step).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import transformers

from benchmarks._batches import GPT2_SMALL, LR, NADO_LAYERS


def gpt2_models(*, nado: bool, seed: int = 0) -> tuple[Any, Any, Any]:
    """Random GPT-2 small (train mode, dropout off) and, with `nado`, a NADO of
    `NADO_LAYERS` GPT-2 layers + `Linear(768, V)` head with bias (the authors' NADOInd)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**GPT2_SMALL)
    lm = transformers.GPT2LMHeadModel(config).train()
    if not nado:
        return lm, None, None
    body = transformers.GPT2Model(transformers.GPT2Config(**{**GPT2_SMALL, "n_layer": NADO_LAYERS}))
    head = torch.nn.Linear(GPT2_SMALL["n_embd"], GPT2_SMALL["vocab_size"])
    return lm, body.train(), head


class HFStep:
    """transformers' SFT step: loss.backward(), clip 1.0, AdamW.step(), zero_grad()."""

    def __init__(self, hf: Any, stream: dict) -> None:
        self.hf = hf
        self.opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0)
        self.ids = torch.tensor(stream["tokens_bt"], dtype=torch.long)

    def __call__(self) -> float:
        """One step; returns the loss."""
        loss = self.hf(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach().item()


class TorchRegularizedStep:
    """One regularised update in the authors' form (see the module docstring)."""

    def __init__(
        self,
        hf: Any,
        nado_body: Any,
        nado_head: Any,
        stream: dict,
        *,
        train_nado: bool,
        alpha: float = 1.0,
        kl_weight: float = 1.0,
    ) -> None:
        self.hf, self.nado_body, self.nado_head = hf, nado_body, nado_head
        self.ref = copy.deepcopy(hf).eval().requires_grad_(False)
        self.train_nado, self.alpha, self.kl_weight = train_nado, alpha, kl_weight
        self.opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0)
        self.nado_params = [*nado_body.parameters(), *nado_head.parameters()]
        for p in self.nado_params:
            p.requires_grad_(train_nado)
        self.nado_opt = torch.optim.AdamW(self.nado_params, lr=LR, weight_decay=0.0)
        self.ids = torch.tensor(stream["tokens_bt"], dtype=torch.long)
        self.targets = torch.tensor(stream["targets_bt"], dtype=torch.long)
        self.mask = torch.tensor(stream["loss_mask_bt"])
        self.labels = torch.tensor(stream.get("labels_b", [0.0] * len(self.ids)))

    def __call__(self) -> float:
        """One step; returns the total loss."""
        with torch.no_grad():
            ref_logits = self.ref(input_ids=self.ids).logits  # [B, T, V]
        with torch.set_grad_enabled(self.train_nado):
            h = self.nado_body(input_ids=self.ids).last_hidden_state
            nado_logits = self.nado_head(h)  # [B, T, V]: log R = logsigmoid(nado_logits)
        # Guided teacher q ∝ p_ref · R^α (normalised by the softmax), a constant for θ.
        guided = ref_logits + self.alpha * torch.nn.functional.logsigmoid(nado_logits.detach())
        log_q = torch.log_softmax(guided, -1)
        log_p = torch.log_softmax(self.hf(input_ids=self.ids).logits, -1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(q ‖ p_θ) per token
        loss = self.kl_weight * (kl * self.mask).sum() / self.mask.sum()
        if self.train_nado:  # BCE of σ(h[y_t]) against the sequence label, per position
            picked = nado_logits.gather(-1, self.targets[..., None])[..., 0]
            bce = torch.nn.functional.binary_cross_entropy_with_logits(
                picked, self.labels[:, None].expand_as(picked), reduction="none"
            )
            loss = loss + (bce * self.mask).sum() / self.mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.train_nado:
            torch.nn.utils.clip_grad_norm_(self.nado_params, 1.0)
            self.nado_opt.step()
            self.nado_opt.zero_grad(set_to_none=True)
        return loss.detach().item()
