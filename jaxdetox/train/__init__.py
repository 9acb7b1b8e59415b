"""Training: `TrainState`, the pure steps (`lm_step`, `nado_step`, `joint_step`, `sft_step`; the
policy baselines' `reinforce_step`, `dpo_step`),
optimizers, the jitted step runner, orbax checkpoints and FLOP counts (docs/method.md)."""

from jaxdetox.train.checkpoint import Checkpointer, CheckpointError
from jaxdetox.train.optimizer import OptimizerConfig, make_optimizer
from jaxdetox.train.policy import PolicyConfig, dpo_step, reinforce_step
from jaxdetox.train.runner import StepRunner, place_batch
from jaxdetox.train.setup import Training, make_training
from jaxdetox.train.state import Models, ModelState, TrainState
from jaxdetox.train.steps import StepConfig, StreamLoss, joint_step, lm_step, nado_step, sft_step

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ModelState",
    "Models",
    "OptimizerConfig",
    "PolicyConfig",
    "StepConfig",
    "StepRunner",
    "StreamLoss",
    "TrainState",
    "Training",
    "dpo_step",
    "joint_step",
    "lm_step",
    "make_optimizer",
    "make_training",
    "nado_step",
    "place_batch",
    "reinforce_step",
    "sft_step",
]
