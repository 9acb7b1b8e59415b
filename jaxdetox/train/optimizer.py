"""Optimizers for the LLM and the NADO: AdamW with warmup + decay, global-norm clipping and a
trainable-parameter filter, all from optax.

Frozen parameters get `optax.set_to_zero()` through `optax.multi_transform`, so they hold no
Adam moments (a frozen embedding of a 7B model costs no optimizer memory) and their updates
are constant zeros, which lets XLA drop the unused parts of their gradients.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters, the learning-rate schedule and which parameters train."""

    learning_rate: float = 3e-5
    warmup_steps: int = 0
    schedule: str = "constant"  # after warmup: constant | cosine | linear decay
    decay_steps: int | None = None  # steps of the decay phase (None: the stage's step count)
    end_learning_rate_ratio: float = 0.0  # lr at the end of the decay / peak lr
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # Regexes over dotted parameter paths ("layers.mlp.up"); empty = everything trains.
    trainable: tuple[str, ...] = ()
    # Paths that never train whatever `trainable` says (a module's constants, e.g. the NADO's
    # copy of the LM's output embedding: `models.nado.FROZEN_PARAMS`).
    frozen: tuple[str, ...] = ()
    # Parameter groups `(regex, learning_rate, weight_decay)`: matching trainable leaves get
    # their own peak learning rate and weight decay (same schedule shape); first match wins.
    groups: tuple[tuple[str, float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule = {self.schedule!r}; expected one of {SCHEDULES}")
        if self.learning_rate < 0 or self.warmup_steps < 0:
            raise ValueError("optimizer: learning_rate and warmup_steps must be >= 0")
        patterns = [("trainable", p) for p in self.trainable]
        patterns += [("frozen", p) for p in self.frozen]
        patterns += [("groups", g[0]) for g in self.groups]
        for field, pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"optimizer.{field}: bad regex {pattern!r}: {e}") from e
        if any(lr < 0 or wd < 0 for _, lr, wd in self.groups):
            raise ValueError(f"optimizer.groups: learning rates and weight decays must be >= 0, "
                             f"got {self.groups}")  # fmt: skip


def learning_rate_schedule(
    config: OptimizerConfig, total_steps: int, peak: float | None = None
) -> optax.Schedule:
    """Linear warmup to `learning_rate` (or `peak`), then constant / cosine / linear decay to
    the end ratio."""
    peak = config.learning_rate if peak is None else peak
    end = peak * config.end_learning_rate_ratio
    decay = config.decay_steps or max(total_steps - config.warmup_steps, 1)
    if config.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=config.end_learning_rate_ratio)
    else:
        after = optax.linear_schedule(peak, end, decay)
    if config.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, after], [config.warmup_steps])


def param_paths(params: Any) -> Any:
    """The dotted path of every leaf of a params pytree ("layers.attn.wq"), same structure."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path),
        params,
    )


def trainable_mask(params: Any, patterns: Sequence[str], frozen: Sequence[str] = ()) -> Any:
    """Bool pytree: True where a leaf's dotted path matches one of `patterns` (all if none)
    and none of `frozen`."""
    compiled = [re.compile(p) for p in patterns]
    never = [re.compile(p) for p in frozen]

    def trains(path: str) -> bool:
        wanted = not compiled or any(c.search(path) for c in compiled)
        return wanted and not any(c.search(path) for c in never)

    return jax.tree.map(trains, param_paths(params))


def _group_of(path: str, groups: Sequence[tuple[str, float, float]]) -> int | None:
    for i, (pattern, _, _) in enumerate(groups):
        if re.search(pattern, path):
            return i
    return None


def make_optimizer(
    config: OptimizerConfig, total_steps: int, params: Any
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """`(optimizer, schedule)`: clip → AdamW(schedule) on trainable leaves, zero on the rest.

    `params` (concrete or abstract) fixes which leaves train; raises if none does.
    """
    schedule = learning_rate_schedule(config, total_steps)
    mask = trainable_mask(params, config.trainable, config.frozen)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"optimizer.trainable {list(config.trainable)} matches no parameter; paths look like "
            f"{jax.tree.leaves(param_paths(params))[:4]}"
        )

    def adamw(lr: Any, weight_decay: float) -> optax.GradientTransformation:
        return optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=weight_decay)  # fmt: skip

    clip = None
    if config.max_grad_norm is not None:
        clip = optax.clip_by_global_norm(config.max_grad_norm)
    if config.groups:
        # Clip by the norm of every trainable gradient (frozen ones are zero), then one
        # AdamW per group.
        def label(path: str, trains: bool) -> str:
            group = _group_of(path, config.groups)
            return "freeze" if not trains else "train" if group is None else f"group{group}"

        labels = jax.tree.map(label, param_paths(params), mask)
        transforms = {"train": adamw(schedule, config.weight_decay),
                      "freeze": optax.set_to_zero()}  # fmt: skip
        for i, (_, lr, wd) in enumerate(config.groups):
            transforms[f"group{i}"] = adamw(learning_rate_schedule(config, total_steps, lr), wd)
        grouped = optax.multi_transform(transforms, labels)
        return (grouped if clip is None else optax.chain(clip, grouped)), schedule
    optimizer = adamw(schedule, config.weight_decay)
    if clip is not None:
        optimizer = optax.chain(clip, optimizer)
    if all(jax.tree.leaves(mask)):
        return optimizer, schedule
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    frozen = optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
    return frozen, schedule
