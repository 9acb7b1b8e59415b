"""Stages 3 and 4 of an iteration: train NADO_i on S_i, then fine-tune LLM_i.

Both run `fit`: a step loop over a resumable data iterator that checkpoints the trained part
of the state together with the iterator's position every `checkpoint_every` steps (orbax,
async). A killed stage restarts from its last checkpoint, drops the metrics it had logged
past it, and — the steps being deterministic — ends with the same weights and metrics as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdetox.data.sample_batches import batches_per_epoch
from jaxdetox.loop import recipe
from jaxdetox.loop.experiment import Experiment
from jaxdetox.loop.rundir import CHECKPOINTS
from jaxdetox.train import flops as flops_lib
from jaxdetox.train.checkpoint import Checkpointer
from jaxdetox.train.runner import StepRunner
from jaxdetox.train.setup import Training, make_training
from jaxdetox.train.state import abstract_like
from jaxdetox.train.steps import StepConfig, lm_step, nado_step

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StageResult:
    """What a training stage produced."""

    params: Any
    steps: int
    last_metrics: dict[str, float]
    resumed_from: int
    compile_count: int
    # With a `Validation`: best value, its step, evaluations without improvement, stopped early.
    validation: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None  # train_nado: `evaluate.nado_quality` figures
    state: Any = None  # the final train state (the stage's input state was donated)


@dataclasses.dataclass(frozen=True)
class Validation:
    """A held-out evaluation of a training stage every `every` steps (an epoch) and after its
    last step; with `patience` the stage stops once that many evaluations in a row did not
    improve on the best, and its result is the best evaluation's parameters."""

    every: int
    evaluate: Callable[[Any], float]  # train state -> held-out loss (lower is better)
    metric: str
    patience: int | None = None


def _record_validation(progress: dict[str, Any], value: float, step: int) -> bool:
    """Update `progress` (best, best_step, bad) with an evaluation; True if it improved."""
    if progress["best"] is None or value < progress["best"]:
        progress.update(best=value, best_step=step, bad=0)
        return True
    progress["bad"] += 1
    return False


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps up to `until` (exclusive) of a training stage, run by one step function (a
    joint stage: the shared steps, then the longer schedule's own)."""

    until: int
    step_fn: Callable
    step_config: StepConfig
    tokens_per_step: int
    flops_per_step: float


Trained = str | tuple[str, ...]
"""The part(s) of the train state a stage trains and checkpoints (`"lm"`, `("lm", "nado")`)."""


def trained_part(state: Any, trained: Trained) -> Any:
    """`state.<trained>`; several parts: a dict of them by name."""
    if isinstance(trained, str):
        return getattr(state, trained)
    return {name: getattr(state, name) for name in trained}


def trained_params(part: Any) -> Any:
    """The parameters of `trained_part`'s result (a dict by name for several parts)."""
    return part.params if not isinstance(part, dict) else {k: v.params for k, v in part.items()}


class StreamEnded(RuntimeError):
    """A training stage's data stream ran out before its planned steps."""


class Streams:
    """Several resumable host-batch iterators advanced together; one dict per step."""

    def __init__(self, iterators: dict[str, Any], transform: Callable[[dict], dict]) -> None:
        """`iterators`: grain iterators by stream name; `transform` maps each step's dict."""
        self.iterators = iterators
        self.transform = transform

    def __next__(self) -> dict[str, dict[str, np.ndarray]]:
        return self.transform({name: next(it) for name, it in self.iterators.items()})

    def __iter__(self) -> Iterator:
        return self

    def next_step(self, stage: str, step: int, total_steps: int) -> dict[str, dict]:
        """The batch of step `step` (0-based) of `stage`; a stream that ends before the
        planned `total_steps` is an error naming the stage (not a bare StopIteration)."""
        try:
            return next(self)
        except StopIteration:
            raise StreamEnded(
                f"{stage}: the data stream ended after {step} of its {total_steps} planned "
                "steps (the steps must be planned by `stage_steps` from the stream's rows, "
                "batch size and epochs)"
            ) from None

    def get_state(self) -> dict[str, Any]:
        """Positions of every stream (JSON-able)."""
        return {name: it.get_state() for name, it in self.iterators.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue every stream from `get_state()` output."""
        for name, it in self.iterators.items():
            it.set_state(state[name])


def fit(
    exp: Experiment,
    *,
    iteration: int,
    stage: str,
    training: Training,
    step_fn: Callable,
    step_config: StepConfig,
    streams: Streams,
    total_steps: int,
    trained: Trained,
    tokens_per_step: int,
    flops_per_step: float,
    checkpoint: str = CHECKPOINTS,
    validation: Validation | None = None,
    phases: tuple[Phase, ...] | None = None,
) -> StageResult:
    """Run `total_steps` steps of `step_fn`, checkpointing `state.<trained>` + data position
    (into the stage directory's `checkpoint` folder); `validation` evaluates (and may stop)
    the stage at every epoch's end. `phases` (in place of `step_fn`, `step_config` and the
    per-step figures): consecutive step ranges, each run by its own step function."""
    run, loop = exp.run, exp.config.loop
    state = training.state
    if phases is None:
        phases = (Phase(total_steps, step_fn, step_config, tokens_per_step, flops_per_step),)
    runners = [_runner(exp, stage, training, p, total_steps) for p in phases]
    runner_of = [next(k for k, p in enumerate(phases) if t < p.until) for t in range(total_steps)]
    ckpt = Checkpointer(
        run.stage_dir(iteration, stage) / checkpoint,
        keep=loop.keep_checkpoints,
        async_save=loop.async_checkpoints,
    )
    stage_dir = run.stage_dir(iteration, stage)
    early_stopping = validation is not None and validation.patience is not None
    # The best parameters so far (early stopping), saved whenever an evaluation improves.
    best = Checkpointer(stage_dir / f"{checkpoint}_best", keep=1, async_save=False) if (
        early_stopping) else None  # fmt: skip
    progress: dict[str, Any] = {"best": None, "best_step": None, "bad": 0, "stopped": False}
    start = 0
    if ckpt.latest_step() is not None:
        target = abstract_like(
            trained_part(state, trained), trained_part(training.shardings, trained)
        )
        part, data_state, meta = ckpt.restore(target)
        state = state.replace(**(part if isinstance(trained, tuple) else {trained: part}))
        streams.set_state(data_state)
        start = int(meta["step"])
        progress = meta.get("validation", progress)
        run.truncate_metrics(iteration, stage, start)
    peak, _ = flops_lib.device_peak_flops()
    if exp.mesh.devices.flat[0].platform != "cpu":  # a CPU's measured peak is all its cores
        peak *= exp.mesh.size
    last: dict[str, float] = {}
    done = start
    bar = tqdm(
        total=total_steps, initial=start, desc=f"iter {iteration} {stage}", unit="step",
        disable=not exp.progress,
    )  # fmt: skip
    with bar:
        for step in range(start, total_steps):
            if progress["stopped"]:
                break
            batch = streams.next_step(f"iteration {iteration} {stage}", step, total_steps)
            runner, phase = runners[runner_of[step]], phases[runner_of[step]]
            t0, compile_before = time.perf_counter(), runner.compile_seconds
            state, metrics = runner(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - t0 - (runner.compile_seconds - compile_before)
            tokens_per_step = phase.tokens_per_step
            metrics |= {
                "step_seconds": seconds,
                "tokens_per_second": tokens_per_step / seconds,
                "mfu": phase.flops_per_step / seconds / peak,
            }
            done = step + 1
            evaluated = validation is not None and (
                done % validation.every == 0 or done == total_steps
            )
            if evaluated:
                value = float(validation.evaluate(state))
                metrics[validation.metric] = value
                if _record_validation(progress, value, done) and best is not None:
                    best.save(done, trained_params(trained_part(state, trained)))
                if early_stopping and progress["bad"] >= validation.patience:
                    progress["stopped"] = True
            run.log(iteration, stage, done, metrics)
            last = {**last, **metrics}  # each metric's latest value (phases log their own)
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens_per_step / seconds:.0f}", **_headline(metrics))
            # Early stopping checkpoints every evaluation: a resume must know the best so far.
            if (
                done % loop.checkpoint_every == 0
                or done == total_steps
                or (early_stopping and evaluated)
            ):
                ckpt.save(
                    done,
                    trained_part(state, trained),
                    data_state=streams.get_state(),
                    meta={"step": done, "iteration": iteration, "stage": stage,
                          "validation": progress},
                )  # fmt: skip
    ckpt.close()
    params = trained_params(trained_part(state, trained))
    if best is not None and progress["best_step"] not in (None, done):
        shardings = trained_params(trained_part(training.shardings, trained))
        params = best.restore(abstract_like(params, shardings))[0]
    if best is not None:
        best.close()
    return StageResult(
        params, done, last, start, sum(r.compile_count for r in runners),
        validation=None if validation is None else dict(progress), state=state,
    )  # fmt: skip


def _runner(
    exp: Experiment, stage: str, training: Training, phase: Phase, total_steps: int
) -> StepRunner:
    # One runner per stage kind and shape of work: later iterations reuse its executables
    # (their models and optimizers are built from the same config, so the programs match;
    # a joint stage's state may hold a NADO reference of its own: another program).
    structure = jax.tree.structure(training.state)
    key = (stage, phase.step_fn, phase.step_config, total_steps, phase.until, structure)
    runner = exp.runners.get(key)
    if runner is None:
        runner = exp.runners[key] = StepRunner(
            functools.partial(phase.step_fn, models=training.models, config=phase.step_config),
            exp.mesh,
            training.shardings,
            name=stage,
        )
    return runner


def _headline(metrics: dict[str, float]) -> dict[str, str]:
    keys = ("nado/bce", "lm/samples/kl", "lm/corpus/nll")
    return {k.split("/")[-1]: f"{metrics[k]:.4f}" for k in keys if k in metrics}


def host_batch_size(batch_size: int, process_count: int | None = None) -> int:
    """Each host's share of a global `batch_size` (an error unless the hosts split it evenly)."""
    hosts = jax.process_count() if process_count is None else process_count
    if batch_size % hosts:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {hosts} hosts")
    return batch_size // hosts


def stage_steps(
    num_rows: int,
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    process_count: int | None = None,
) -> int:
    """Steps of a training stage over `num_rows` items at global `batch_size`: `epochs`
    whole epochs of the stream every host reads (`sample_batches.row_batches`), capped at
    `max_steps` — the one count every stage plans its steps (and LR schedule) by."""
    hosts = jax.process_count() if process_count is None else process_count
    local = host_batch_size(batch_size, hosts)
    steps = epochs * batches_per_epoch(num_rows, local, process_count=hosts)
    return min(steps, max_steps) if max_steps else steps


def sample_stream(
    exp: Experiment,
    iteration: int,
    batch_size: int,
    epochs: int,
    seed: int,
    label_name: str | None = None,
    rows: np.ndarray | None = None,
) -> Any:
    """This host's batches of S_iteration (`rows` of it; labels of `label_name`, default the
    oracle's): a resumable grain dataset of `epochs` shuffled passes."""
    return exp.store.batches(
        iteration,
        host_batch_size(batch_size),
        oracle=label_name or exp.label_name,
        seed=seed,
        num_epochs=epochs,
        prompt_len=exp.prompt_len,
        completion_len=exp.completion_len,
        rows=rows,
    )


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
    start_params = exp.nado_params(nado_version, constraint.name)
    if nado_version == 0 and conf.nado.bias_init == "label_mean":
        start_params = _with_bias(start_params, label_mean)
    training = make_training(
        exp.lm_module(exp.lm_params(lm_version)),
        exp.nado_module(start_params),
        exp.mesh,
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
        {"samples": iter(batches)}, lambda b: {"samples": exp.labels(b["samples"], constraint)}
    )
    seq = exp.prompt_len + exp.completion_len
    tokens = cfg.batch_size * seq
    body = exp.nado_config.body if exp.nado_config.variant == "separate" else None
    fl = flops_lib.nado_step_flops(
        exp.lm_config, body, tokens=tokens, seq_len=seq, consistency=cfg.consistency is not None
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
        samples, oracle=constraint.label_name, prompt_len=exp.prompt_len,
        completion_len=exp.completion_len,
    )  # fmt: skip
    fraction = exp.config.train_nado.heldout_fraction
    return arrays, *heldout_split(arrays.prompt_ids, fraction, seed=exp.config.seed + iteration)


def training_label_mean(exp: Experiment, arrays: Any, constraint: Any, rows: np.ndarray) -> float:
    """The token-weighted mean NADO label over `rows` of an iteration's samples (the
    constant predictor's rate, and the initial NADO's bias with `bias_init: label_mean`)."""
    labels_b, label_mask_b = _all_labels(exp, arrays, constraint)
    tokens_b = arrays.completion_lengths * label_mask_b  # the BCE's positions per row
    return float(np.sum((labels_b * tokens_b)[rows]) / max(np.sum(tokens_b[rows]), 1.0))


def student_and_reference(exp: Experiment, lm_version: int) -> tuple[Any, Any]:
    """The LLM module fine-tuned from LLM_{lm_version} and its teacher's reference
    (`finetune.reference`; LoRA: None, the frozen base is the reference)."""
    if exp.lora is not None:  # adapters train; the base is the student's and the reference
        return exp.lora_module(lm_version), None
    reference = exp.lm_params(0 if exp.config.finetune.reference == "base" else lm_version)
    return exp.lm_module(exp.lm_params(lm_version)), reference


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
    out = exp.labels(batch, constraint)
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
            exp.labels(arrays.batch(rows[i : i + batch_size], batch_size), constraint)
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
            functools.partial(nado_outputs, models=training.models), exp.mesh,
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


def with_all_nados(exp: Experiment, training: Training, nado_version: int) -> Training:
    """`training` whose frozen NADO is every constraint's NADO_{nado_version} (a dict by
    name; the teacher sums their guidance terms), when the run has several constraints."""
    if len(exp.constraints) == 1:
        return training
    names = tuple(c.name for c in exp.constraints)
    params = {name: jax.tree.map(jnp.copy, exp.nado_params(nado_version, name)) for name in names}
    shard = training.shardings.nado.params
    state = training.state.replace(nado=training.state.nado.replace(params=params))
    shardings = training.shardings.replace(
        nado=training.shardings.nado.replace(params=dict.fromkeys(names, shard))
    )
    models = dataclasses.replace(training.models, nado_names=names)
    return Training(state, models, shardings)


def finetune_stage(
    exp: Experiment, iteration: int, *, lm_version: int, nado_version: int, samples: int
) -> StageResult:
    """LLM_iteration ← LLM_{lm_version} trained on NLL(corpus) + λ·KL(q ‖ LLM) on S_{samples},
    q = reference ⊕ NADO_{nado_version} (reference: the base LLM or LLM_{lm_version})."""
    cfg, conf = exp.config.finetune, exp.config
    num_rows = exp.store.read(samples, exp.label_name).num_rows
    total = stage_steps(num_rows, cfg.batch_size, cfg.epochs, cfg.max_steps)
    lm_module, reference = student_and_reference(exp, lm_version)
    training = make_training(
        lm_module,
        exp.nado_module(exp.nado_params(nado_version)),
        exp.mesh,
        lm_optimizer=recipe.optimizer_config(cfg.optimizer),
        nado_optimizer=None,
        lm_steps=total,
        reference=reference,
        reference_dtype=cfg.reference_dtype,
        seed=conf.seed + iteration,
    )
    training = with_all_nados(exp, training, nado_version)
    batches = sample_stream(exp, samples, cfg.batch_size, cfg.epochs, conf.seed + iteration)
    iterators = {"samples": iter(batches)}
    seq = exp.prompt_len + exp.completion_len
    tokens, kl_tokens = cfg.batch_size * seq, cfg.batch_size * seq
    if conf.corpus is not None:
        iterators["corpus"] = iter(corpus_stream(exp))
        corpus_tokens = conf.corpus.batch_size * conf.corpus.seq_len
        tokens += corpus_tokens
        kl_tokens += corpus_tokens if "corpus" in cfg.kl_on else 0
    step_config = recipe.finetune_step_config(conf)
    streams = Streams(iterators, lambda b: b)
    body = exp.nado_config.body if exp.nado_config.variant == "separate" else None
    fl = flops_lib.lm_step_flops(
        exp.lm_config, body, tokens=tokens, kl_tokens=kl_tokens, seq_len=seq
    )
    return fit(
        exp, iteration=iteration, stage="finetune", training=training, step_fn=lm_step,
        step_config=step_config, streams=streams, total_steps=total, trained="lm",
        tokens_per_step=tokens, flops_per_step=fl.total,
    )  # fmt: skip


def corpus_stream(exp: Experiment) -> Any:
    """This host's batches of the `corpus:` section's corpus (endless, resumable)."""
    from jaxdetox.data.corpora import corpus_dataset

    c = exp.config.corpus
    source = builtin_corpus(exp) if c.source == "builtin" else c.source
    return corpus_dataset(recipe.corpus_config(c, source), exp.tokenizer)


def builtin_corpus(exp: Experiment) -> str:
    """`corpus.source: builtin`: the built-in *training* prompts' texts (both kinds; never
    the evaluation prompts) as a jsonl in the run directory, for offline corpus NLL."""
    import json

    from jaxdetox.loop.experiment import builtin_prompt_set

    path = exp.run.root / "corpus" / "builtin_train_prompts.jsonl"
    if not path.exists():  # every host writes the same file atomically: no wait on another
        import os

        path.parent.mkdir(parents=True, exist_ok=True)
        texts = builtin_prompt_set("train", None).texts
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(path)
    return str(path)
