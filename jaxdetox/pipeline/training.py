"""The step loop every training stage runs (train_nado, finetune, the baselines' LLM updates):
`fit` over resumable data streams, the planned step count (`stage_steps`) and the streams of
the sample store and the corpus.

`fit` checkpoints the trained part of the state together with the streams' position every
`checkpoint_every` steps (orbax, async). A killed stage restarts from its last checkpoint,
drops the metrics it had logged past it, and — the steps being deterministic — ends with the
same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxdetox.data.store_batches import batches_per_epoch
from jaxdetox.pipeline import recipe
from jaxdetox.pipeline.experiment import Experiment
from jaxdetox.pipeline.rundir import CHECKPOINTS
from jaxdetox.train import flops as flops_lib
from jaxdetox.train.checkpoint import Checkpointer
from jaxdetox.train.runner import StepRunner
from jaxdetox.train.setup import Training
from jaxdetox.train.state import abstract_like
from jaxdetox.train.steps import StepConfig


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
    if exp.context.mesh.devices.flat[0].platform != "cpu":  # a CPU's measured peak is all its cores
        peak *= exp.context.mesh.size
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
    return exp.context.programs.get_or_make(
        key,
        lambda: StepRunner(
            functools.partial(phase.step_fn, models=training.models, config=phase.step_config),
            exp.context.mesh,
            training.shardings,
            name=stage,
        ),
    )


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
    whole epochs of the stream every host reads (`store_batches.row_batches`), capped at
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
        oracle=label_name or exp.constraints.label_name,
        seed=seed,
        num_epochs=epochs,
        prompt_len=exp.prompts.prompt_len,
        completion_len=exp.prompts.completion_len,
        rows=rows,
    )


def corpus_stream(exp: Experiment) -> Any:
    """This host's batches of the `corpus:` section's corpus (endless, resumable)."""
    from jaxdetox.data.corpora import corpus_dataset

    c = exp.config.corpus
    source = builtin_corpus(exp) if c.source == "builtin" else c.source
    return corpus_dataset(recipe.corpus_config(c, source), exp.context.tokenizer)


def builtin_corpus(exp: Experiment) -> str:
    """`corpus.source: builtin`: the built-in *training* prompts' texts (both kinds; never
    the evaluation prompts) as a jsonl in the run directory, for offline corpus NLL."""
    import json

    from jaxdetox.pipeline.prompts import builtin_prompt_set

    path = exp.run.root / "corpus" / "builtin_train_prompts.jsonl"
    if not path.exists():  # every host writes the same file atomically: no wait on another
        import os

        path.parent.mkdir(parents=True, exist_ok=True)
        texts = builtin_prompt_set("train", None).texts
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(path)
    return str(path)


def training_outputs(result: StageResult, artifact: str) -> dict[str, Any]:
    """The manifest outputs of a training stage: steps, resume point, artefact, last metrics."""
    keep = ("nado/bce", "nado/consistency", "lm/samples/kl", "lm/corpus/nll", "mfu")
    return {
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "compiles": result.compile_count,
        "artifact": artifact,
        **{k: result.last_metrics[k] for k in keep if k in result.last_metrics},
        **({"validation": result.validation} if result.validation is not None else {}),
        **({"nado_quality": result.quality} if result.quality is not None else {}),
    }
