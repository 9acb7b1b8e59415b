"""Stage 3, train_nado: NADO_i trained on the labelled S_s (the LLM that drew them frozen, the
reference R decomposes), with a held-out BCE every epoch and the NADO's quality figures; one
NADO per constraint. The step loop, its checkpoints and resume: `pipeline.training.fit`."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import numpy as np

from jaxdetox.pipeline import flow, recipe
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.record import run_stage
from jaxdetox.pipeline.rundir import CHECKPOINTS
from jaxdetox.pipeline.sample import sampled_by
from jaxdetox.pipeline.training import (
    StageResult,
    Streams,
    Validation,
    fit,
    sample_stream,
    stage_steps,
    training_outputs,
)
from jaxdetox.train import flops as flops_lib
from jaxdetox.train.runner import StepRunner
from jaxdetox.train.setup import Training, make_training
from jaxdetox.train.steps import nado_step

logger = logging.getLogger(__name__)


def train_nado_stage(
    exp: Experiment,
    iteration: int,
    *,
    nado_version: int,
    samples: int,
    lm_version: int,
    constraint: Any = None,
) -> StageResult:
    """NADO_iteration ← train(init NADO_{nado_version}, samples S_{samples}); LLMs frozen, the
    reference (the model R decomposes: the Bellman term's p and the `shared` variant's
    features) is LLM_{lm_version}, the LLM that drew S_{samples}. `constraint` (an
    `Experiment.constraints` entry; default the first) picks the labels and the NADO.

    `train_nado.heldout_fraction` of the prompts (all their samples) is held out: the NADO's
    held-out BCE is evaluated after every epoch (and stops the stage with `early_stopping`),
    and its quality figures (`evaluate.nado_quality`) are the result's `quality`.
    """
    cfg, conf = exp.config.train_nado, exp.config
    constraint = constraint or exp.constraints[0]
    first = constraint.name == exp.constraints[0].name
    arrays, train_rows, heldout_rows = nado_rows(exp, iteration, samples, constraint)
    label_mean = training_label_mean(exp, arrays, constraint, train_rows)
    epoch_steps = stage_steps(len(train_rows), cfg.batch_size, 1, None)
    total = stage_steps(len(train_rows), cfg.batch_size, cfg.epochs, cfg.max_steps)
    start_params = exp.artefacts.nado_params(nado_version, constraint.name)
    if nado_version == 0 and conf.nado.bias_init == "label_mean":
        start_params = _with_bias(start_params, label_mean)
    training = make_training(
        exp.context.lm_module(exp.artefacts.lm_params(lm_version)),
        exp.context.nado_module(start_params),
        exp.context.mesh,
        lm_optimizer=None,
        nado_optimizer=recipe.nado_optimizer_config(cfg),
        nado_steps=total,
        seed=conf.seed + iteration,
    )
    training = dataclasses.replace(training, state=training.state.replace(lm=None))
    training = dataclasses.replace(training, shardings=training.shardings.replace(lm=None))
    step_config = recipe.nado_step_config(cfg)
    batches = sample_stream(
        exp, samples, cfg.batch_size, cfg.epochs, conf.seed + iteration,
        constraint.label_name, rows=train_rows,
    )  # fmt: skip
    streams = Streams(
        {"samples": iter(batches)},
        lambda b: {"samples": exp.constraints.labels(b["samples"], constraint)},
    )
    seq = exp.prompts.prompt_len + exp.prompts.completion_len
    tokens = cfg.batch_size * seq
    body = exp.context.nado_config.body if exp.context.nado_config.variant == "separate" else None
    fl = flops_lib.nado_step_flops(
        exp.context.lm_config,
        body,
        tokens=tokens,
        seq_len=seq,
        consistency=cfg.consistency is not None,
    )
    validation, heldout = None, None
    if len(heldout_rows):  # (`heldout_fraction: 0` holds none out)
        heldout = HeldOut(exp, training, arrays, heldout_rows, cfg.batch_size, constraint)
        validation = Validation(
            every=epoch_steps, evaluate=heldout.bce, metric="nado/heldout_bce",
            patience=cfg.patience if cfg.early_stopping else None,
        )  # fmt: skip
    initial = training.state  # before any update: the reference for the rows training moves
    initial_probe = heldout.probe_logits(initial) if len(heldout_rows) else None
    result = fit(
        exp, iteration=iteration, stage="train_nado", training=training, step_fn=nado_step,
        step_config=step_config, streams=streams, total_steps=total, trained="nado",
        tokens_per_step=tokens, flops_per_step=fl.total,
        checkpoint=CHECKPOINTS if first else f"{CHECKPOINTS}_{constraint.name}",
        validation=validation,
    )  # fmt: skip
    if len(heldout_rows):
        trained_state = result.state.replace(nado=result.state.nado.replace(params=result.params))
        result.quality = heldout.checked_quality(
            trained_state, initial_probe, label_mean, f"iteration {iteration}: NADO "
            f"({constraint.name})"
        )  # fmt: skip
    return result


def nado_rows(
    exp: Experiment, iteration: int, samples: int, constraint: Any
) -> tuple[Any, np.ndarray, np.ndarray]:
    """`(arrays, train_rows, heldout_rows)` of S_{samples} for a NADO stage of `iteration`:
    its `SampleArrays` with `constraint`'s labels and the rows `train_nado.heldout_fraction`
    of the prompts (all their samples) hold out."""
    from jaxdetox.evaluate.nado_quality import heldout_split

    arrays = exp.store.arrays(
        samples, oracle=constraint.label_name, prompt_len=exp.prompts.prompt_len,
        completion_len=exp.prompts.completion_len,
    )  # fmt: skip
    fraction = exp.config.train_nado.heldout_fraction
    return arrays, *heldout_split(arrays.prompt_ids, fraction, seed=exp.config.seed + iteration)


def training_label_mean(exp: Experiment, arrays: Any, constraint: Any, rows: np.ndarray) -> float:
    """The token-weighted mean NADO label over `rows` of an iteration's samples (the
    constant predictor's rate, and the initial NADO's bias with `bias_init: label_mean`)."""
    labels_b, label_mask_b = _all_labels(exp, arrays, constraint)
    tokens_b = arrays.completion_lengths * label_mask_b  # the BCE's positions per row
    return float(np.sum((labels_b * tokens_b)[rows]) / max(np.sum(tokens_b[rows]), 1.0))


def _with_bias(params: Any, rate: float) -> Any:
    """`models.nado.with_uniform_bias`, the new bias placed like the old one."""
    from jaxdetox.models.nado import with_uniform_bias

    new = with_uniform_bias(params, rate)
    old_b = params["head"]["b"]
    new["head"]["b"] = jax.device_put(new["head"]["b"], old_b.sharding)
    return new


def _all_labels(exp: Experiment, arrays: Any, constraint: Any) -> tuple[np.ndarray, np.ndarray]:
    """NADO labels and label mask of every row of an iteration's `SampleArrays`."""
    n = arrays.num_rows
    ok = np.asarray(arrays.ok, bool)
    batch = {"ok_b": ok, "valid_b": np.ones(n, bool),
             "toxicity_b": np.where(ok, arrays.toxicity, 0.0).astype(np.float32)}  # fmt: skip
    out = exp.constraints.labels(batch, constraint)
    return out["labels_b"], out["label_mask_b"]


class HeldOut:
    """The held-out samples of a NADO stage, batched once; evaluates a NADO state on them."""

    def __init__(
        self,
        exp: Experiment,
        training: Training,
        arrays: Any,
        rows: np.ndarray,
        batch_size: int,
        constraint: Any,
    ) -> None:
        """Cut `rows` of `arrays` into labelled host batches of `batch_size` (last padded)."""
        from jaxdetox.train.nado_eval import nado_outputs

        self.batches = [
            exp.constraints.labels(arrays.batch(rows[i : i + batch_size], batch_size), constraint)
            for i in range(0, len(rows), batch_size)
        ]
        # Fixed for the stage: labels, BCE weights and labelled rows of the held-out batches.
        self.labels_b = np.concatenate([b["labels_b"] for b in self.batches])
        self.weight_bt = np.concatenate(
            [
                (b["loss_mask_bt"] * b["label_mask_b"][:, None]).astype(np.float64)
                for b in self.batches
            ]
        )
        self.labelled_b = np.concatenate([b["label_mask_b"] > 0 for b in self.batches])
        self.prompt_ids_b = np.concatenate([b["prompt_ids_b"] for b in self.batches])
        self.runner = StepRunner(
            functools.partial(nado_outputs, models=training.models), exp.context.mesh,
            training.shardings, name="nado_heldout", returns_state=False,
        )  # fmt: skip

    def _outputs(self, state: Any) -> list[dict[str, np.ndarray]]:
        # Each host feeds its contiguous share of every batch (the global batch is the hosts'
        # shares in process order); the outputs come back replicated, for the whole batch.
        hosts, me = jax.process_count(), jax.process_index()
        outs = []
        for b in self.batches:
            share = len(b["valid_b"]) // hosts
            mine = {k: v[me * share : (me + 1) * share] for k, v in b.items()}
            out = jax.device_get(self.runner(state, {"samples": mine}))
            outs.append({k: np.asarray(v) for k, v in out.items()})
        return outs

    def bce(self, state: Any) -> float:
        """Token-weighted held-out BCE of the NADO in `state`."""
        from jaxdetox.evaluate.nado_quality import weighted_bce

        logit = np.concatenate([o["token_logit_bt"] for o in self._outputs(state)])
        labels_bt = np.broadcast_to(self.labels_b[:, None], logit.shape)
        return weighted_bce(logit, labels_bt, self.weight_bt)

    def probe_logits(self, state: Any) -> np.ndarray:
        """Full-vocabulary NADO logits at each held-out row's last completion position."""
        return np.concatenate([o["probe_logits_bv"] for o in self._outputs(state)])

    def checked_quality(
        self, state: Any, initial_probe: np.ndarray, label_mean: float, name: str
    ) -> dict[str, Any]:
        """`quality`, with a warning naming `name` when the NADO does not beat the constant
        predictor."""
        quality = self.quality(state, initial_probe, label_mean)
        if not quality["beats_constant"]:
            logger.warning(
                "%s held-out BCE %.4f does not beat the constant predictor's %.4f: its "
                "guidance is no better than none (more samples, epochs or another nado.head "
                "may help)", name, quality["heldout_bce"], quality["constant_bce"],
            )  # fmt: skip
        return quality

    def quality(self, state: Any, initial_probe: np.ndarray, label_mean: float) -> dict[str, Any]:
        """`evaluate.nado_quality` figures of the NADO in `state` (JSON-able)."""
        from jaxdetox.evaluate.nado_quality import nado_quality

        outs = self._outputs(state)
        probe = np.concatenate([o["probe_logits_bv"] for o in outs])
        rows = self.labelled_b
        moved = np.any(~np.isclose(probe[rows], initial_probe[rows], rtol=1e-5, atol=1e-6), axis=0)
        return nado_quality(
            np.concatenate([o["token_logit_bt"] for o in outs]),
            self.labels_b, self.weight_bt, label_mean, moved,
            groups_b=self.prompt_ids_b,  # the gain's error is over prompts
        ).to_json()  # fmt: skip


def train_nado(
    exp: Experiment,
    iteration: int,
    nado_version: int,
    samples: int,
    lm_version: int | None = None,
) -> None:
    """Stage 3: NADO_iteration from NADO_{nado_version} on S_{samples}, decomposing
    LLM_{lm_version}: the LLM that drew S_{samples} (None: the one the store records)."""
    if lm_version is None:
        lm_version = sampled_by(exp, samples)
        if lm_version is None:
            raise ValueError(
                f"train_nado of iteration {iteration}: the sample store {exp.store.root} does "
                f"not record which LLM drew S_{samples} (its sampled.done.json has no "
                "versions.lm); the NADO must decompose that LLM"
            )
    kw = {"nado_version": nado_version, "samples": samples, "lm_version": lm_version}

    def body() -> dict[str, Any]:
        result = train_nado_stage(exp, iteration, **kw)
        artifact = exp.artefacts.save("nado", iteration, result.params, inputs)
        exp.artefacts.keep("nado", iteration, result.params)
        outputs = training_outputs(result, artifact)
        for c in exp.constraints[1:]:  # one NADO per further constraint, on its own labels
            result = train_nado_stage(exp, iteration, **kw, constraint=c)
            exp.artefacts.save("nado", iteration, result.params, inputs, constraint=c.name)
            exp.artefacts.keep("nado", iteration, result.params, constraint=c.name)
            outputs[f"nado/bce/{c.name}"] = result.last_metrics.get("nado/bce")
            if result.quality is not None:
                outputs[f"nado_quality_{c.name}"] = result.quality
        return outputs

    inputs = {"lm": lm_version, "nado": nado_version, "samples": samples}
    run_stage(exp, iteration, "train_nado", inputs, body)


def run_train_nado(exp: Experiment, stage: flow.Stage) -> None:
    """Stage 3: NADO_iteration trained on the stage's samples (decomposing its LLM)."""
    v = stage.input_versions
    train_nado(
        exp, stage.iteration, nado_version=v["nado"], samples=v["samples"], lm_version=v["lm"]
    )
