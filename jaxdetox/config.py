"""Typed run configuration: YAML + dotted `key=value` overrides, validated by pydantic.

Why pydantic: strict nested models with `extra="forbid"` give, for free, the checks a run
needs before it spends hours (unknown keys, wrong types, out-of-range values) with the path
of the offending field; its JSON schema documents the file; and it is already a dependency
of the stack we install. Every section is frozen: a resolved config is a value.

    config = load_config("experiments/tiny/pr_sequential.yaml", ["finetune.kl_weight=0.5"])

An error names the field and, for an unknown key, lists the valid keys of that section
(`ConfigError`; the CLI prints it without a traceback).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jaxdetox.errors import JaxdetoxError
from jaxdetox.losses.nado import CONSISTENCY_KINDS
from jaxdetox.models.nado import HEAD_INITS, HEADS, VARIANTS
from jaxdetox.train.optimizer import SCHEDULES

# The kinds of the enumerated options the code below the config dispatches on (those of
# other modules are imported from them: CONSISTENCY_KINDS, HEADS, SCHEDULES, ...).
TRAIN_DTYPES = ("float32", "bfloat16")  # of `models.config.DTYPES`, the ones to train in
NADO_INITS = ("lm", "random")  # `pipeline.context.load_context` (the NADO body's start)
BIAS_INITS = ("zeros", "label_mean")  # `pipeline.train_nado.train_nado_stage`
KL_PREFIXES = ("samples", "corpus")  # `pipeline.recipe.finetune_step_config`
REFERENCES = ("base", "previous")  # `pipeline.finetune.finetune_stage`
PROMPT_MODES = ("raw", "chat")  # `pipeline.evaluation.prompt_modes`
SCHEMES = ("sequential", "parallel")  # `pipeline.flow.plan_stages`
PLACEMENTS = ("colocated", "split", "jobs", "joint")  # `pipeline.placement.run_placed`
ROLES = ("sampler", "nado", "lm")  # `pipeline.flow.ROLE_OF`


class ConfigError(JaxdetoxError, ValueError):
    """A configuration file or override is invalid; the message names the field."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    """The LLM to fine-tune."""

    path: str = Field("default", description="HF checkpoint dir, .gguf file, hub id or 'default'")
    dtype: Literal[TRAIN_DTYPES] = Field("float32", description="compute dtype")
    param_dtype: Literal[TRAIN_DTYPES] = Field(
        "float32", description="master weights (keep float32 for training)"
    )
    remat: bool = Field(
        False, description="recompute each layer in the backward pass (remat_policy full)"
    )
    remat_policy: Literal["none", "dots_saveable", "full"] | None = Field(
        None,
        description="what each layer keeps for the backward pass: none (no remat), "
        "dots_saveable (matmul outputs; elementwise ops recomputed) or full (its input only); "
        "default: full if remat else none. Sets remat to (remat_policy != none)",
    )
    attention: Literal["auto", "einsum", "xla", "cudnn"] = Field(
        "auto",
        description="attention kernel: auto = cuDNN flash on CUDA GPUs where it applies, the "
        "einsum reference on CPU, jax.nn.dot_product_attention (XLA) elsewhere",
    )

    @model_validator(mode="after")
    def _remat_policy(self) -> ModelSection:
        policy = self.remat_policy
        if policy is None:  # the on/off switch alone
            object.__setattr__(self, "remat_policy", "full" if self.remat else "none")
        elif "remat" in self.model_fields_set and self.remat != (policy != "none"):
            raise ValueError(
                f"model.remat={self.remat} contradicts model.remat_policy={policy!r}; "
                "set model.remat_policy alone"
            )
        object.__setattr__(self, "remat", self.remat_policy != "none")
        return self


class NadoSection(Section):
    """The auxiliary model R_φ."""

    variant: Literal[VARIANTS] = "separate"
    num_layers: int = Field(2, ge=1, description="layers of a separate NADO body")
    init: Literal[NADO_INITS] = Field("lm", description="body from the LM's first layers")
    head: Literal[HEADS] = Field(
        "linear",
        description="linear: a free [V, D] head (the authors'); factored: a shared value term "
        "plus the LM's frozen output embedding E times a learned map W of the features "
        "(docs/method.md, NADO heads)",
    )
    head_rank: int = Field(0, ge=0, description="factored: rank of W (0 = full D×D)")
    head_init: Literal[HEAD_INITS] = Field(
        "zeros", description="linear head's weight (zeros: R = σ(bias) everywhere at the start)"
    )
    bias_init: Literal[BIAS_INITS] = Field(
        "zeros",
        description="the head's bias when NADO_1 starts from the initial NADO: zeros (R = 0.5 "
        "for every token never sampled) or logit of the mean training label (the base rate)",
    )


class PromptsSection(Section):
    """Where prompts come from and how they are cut into evaluation and iteration blocks."""

    source: str = Field("builtin", description="'builtin' or a prompt file (RTP jsonl, ...)")
    kind: str | None = Field(None, description="builtin only: toxic | neutral | None (all)")
    block_size: int = Field(88, ge=1, description="prompts sampled per iteration")
    eval_size: int = Field(
        0, ge=0, description="file sources: held-out prompts (builtin: its eval split)"
    )
    max_tokens: int = Field(30, ge=1, description="prompt tokens kept (the paper: 30)")
    chat_template: bool = Field(
        False, description="instruct models: each prompt is the user turn of the chat template"
    )
    system: str | None = Field(
        None, description="chat_template: the system message (None: the template's default)"
    )
    seed: int = 0


class LabelSection(Section):
    """Oracle score -> NADO target: `1 - toxicity^tau`, or `1[toxicity < threshold]`."""

    tau: float = Field(1.0, gt=0)
    threshold: float | None = Field(None, gt=0, lt=1)


class OracleSection(Section):
    """The sequence-level oracle."""

    name: str = Field("default", description="oracle name (see `jaxdetox score --help`)")
    args: dict[str, Any] = Field(default_factory=dict)
    label: LabelSection = LabelSection()
    batch_size: int = Field(256, ge=1)


class ConstraintSection(Section):
    """A further sequence-level constraint: one more NADO, trained on its own labels, whose
    guidance term joins the teacher: log q ∝ log p_ref + Σ_c α_c·log σ(h_c)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="label and metric key")
    oracle: OracleSection = Field(description="its oracle (a violation score in [0, 1])")
    alpha: float = Field(1.0, ge=0, description="its guidance strength α_c")
    satisfied_below: float = Field(
        0.5, gt=0, le=1, description="eval: a text satisfies it when its score is below this"
    )


class SamplingSection(Section):
    """Sampling of completions (training samples and evaluation)."""

    num_samples: int = Field(4, ge=1, description="completions per prompt (k)")
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, ge=1, description="prompts per sampler call")
    seed: int = 0


class OptimizerSection(Section):
    """AdamW with warmup and decay (jaxdetox.train.optimizer.OptimizerConfig)."""

    learning_rate: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal[SCHEDULES] = "constant"
    end_learning_rate_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    trainable: list[str] = Field(
        default_factory=list, description="regexes over parameter paths; empty = all train"
    )


class CorpusSection(Section):
    """A fine-tuning corpus D for the NLL term (jaxdetox.data.CorpusConfig)."""

    source: str = Field(
        description="a corpus path / tfds:NAME / hf:DIR, or 'builtin' (the built-in "
        "training prompts' texts, offline)"
    )
    split: str = "train"
    data_dir: str | None = None
    text_field: str = "text"
    prompt_field: str | None = None
    seq_len: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1, description="global corpus rows per step")
    seed: int = 0


class TrainNadoSection(Section):
    """Stage 3: train NADO_i on S_i (LLMs frozen)."""

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1, description="global samples per step")
    micro_batches: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    consistency: Literal[CONSISTENCY_KINDS] | None = Field(
        None,
        description="Bellman consistency regulariser (docs/method.md): kl = KL(Bern(r) ‖ "
        "Bern(s)), squared = (r − s)², ratio = (s/r − 1)²; None = BCE alone",
    )
    consistency_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the consistency term in the NADO loss; must be > 0 when "
        "`consistency` is set (and is not read without it)",
    )
    consistency_reverse: bool = Field(
        False,
        description="consistency: kl only: KL(Bern(s) ‖ Bern(r)) (the authors' LCG code) "
        "instead of KL(Bern(r) ‖ Bern(s)) (their MT code)",
    )
    importance_weights: bool = Field(
        False,
        description="weigh each sample by p(y)/π(y), self-normalised over its prompt's samples "
        "(p: the LLM that drew them, π: the sampling distribution; docs/method.md)",
    )
    optimizer: OptimizerSection = OptimizerSection()
    head_learning_rate: float | None = Field(
        None, ge=0, description="peak learning rate of the head's parameters (None: optimizer's)"
    )
    head_weight_decay: float | None = Field(
        None, ge=0, description="weight decay of the head's parameters (None: optimizer's)"
    )
    heldout_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of the iteration's prompts (all their samples) held out of NADO "
        "training to measure its quality (nado_quality) and to stop early; 0: none",
    )
    early_stopping: bool = Field(
        False, description="stop when the held-out BCE has not improved for `patience` epochs"
    )
    patience: int = Field(1, ge=1, description="early_stopping: epochs without improvement")

    @model_validator(mode="after")
    def _early_stopping_needs_heldout(self) -> TrainNadoSection:
        if self.early_stopping and self.heldout_fraction == 0:
            raise ValueError("train_nado.early_stopping needs train_nado.heldout_fraction > 0")
        return self

    @model_validator(mode="after")
    def _consistency_is_used(self) -> TrainNadoSection:
        # A consistency kind at weight 0 (or a weight / direction without a kind) would run
        # and silently change nothing.
        if self.consistency is not None and self.consistency_weight == 0:
            raise ValueError(
                f"train_nado.consistency {self.consistency!r} with consistency_weight 0 does "
                "nothing; set train_nado.consistency_weight > 0"
            )
        if self.consistency is None and self.consistency_weight != 0:
            raise ValueError(
                f"train_nado.consistency_weight {self.consistency_weight} needs "
                f"train_nado.consistency (one of {', '.join(CONSISTENCY_KINDS)})"
            )
        if self.consistency_reverse and self.consistency != "kl":
            raise ValueError("train_nado.consistency_reverse needs train_nado.consistency: kl")
        return self


class LoraSection(Section):
    """LoRA for the LLM (jaxdetox.models.lora): ΔW = (alpha/rank)·A·B on the target kernels."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(
        default_factory=lambda: ["wq", "wk", "wv", "wo"],
        description="layer kernels (names or regexes over e.g. attn/wq, mlp/down)",
    )
    seed: int = 0


class FinetuneSection(Section):
    """Stage 4: LLM_i = argmin NLL(corpus) + λ·Σ_t KL(q_t ‖ p_θ,t), q = reference ⊕ NADO_i."""

    kl_weight: float = Field(1.0, ge=0, description="λ")
    alpha: float = Field(1.0, ge=0, description="guidance strength α of the teacher")
    kl_on: list[Literal[KL_PREFIXES]] = Field(
        default_factory=lambda: ["samples"], description="which prefixes get the KL term"
    )
    nll_weight: float = Field(1.0, ge=0, description="weight of the corpus NLL")
    epochs: int = Field(1, ge=1, description="passes over S_i")
    batch_size: int = Field(16, ge=1, description="global samples per step")
    micro_batches: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    reference: Literal[REFERENCES] = Field(
        "base", description="teacher LM: the base model (authors' code) or LLM_{i-1}"
    )
    reference_dtype: Literal[TRAIN_DTYPES] | None = None
    chunk_size: int | None = Field(None, ge=1)
    lora: LoraSection | None = Field(
        None, description="train LoRA adapters only; the frozen base is also the reference"
    )
    optimizer: OptimizerSection = OptimizerSection()

    @model_validator(mode="after")
    def _lora_reference(self) -> FinetuneSection:
        if self.lora is not None and self.reference != "base":
            raise ValueError("finetune.lora needs finetune.reference: base (the frozen base)")
        return self


class DetectionEvalSection(Section):
    """Toxicity detection with the LM as a zero-/few-shot classifier (jsonl text + label)."""

    path: str = Field(description="labelled jsonl (ToxiGen annotations, civil_comments rows)")
    shots_path: str | None = Field(None, description="split the few-shot examples come from")
    num_shots: int = Field(0, ge=0)
    text_field: str = "text"
    label_field: str = "label"
    label_threshold: float = Field(0.5, description="a float label >= this counts as toxic")
    limit: int | None = Field(None, ge=1)


class LmEvalSection(Section):
    """Utility benchmarks through lm-evaluation-harness (any task name it knows)."""

    tasks: list[str] = Field(description="e.g. [hellaswag, piqa, arc_easy]")
    include_path: str | None = Field(None, description="a directory of local task YAMLs")
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1, description="documents per task")
    batch_size: int = Field(8, ge=1)


class EvalSection(Section):
    """Evaluation on the held-out prompts (RealToxicityPrompts protocol) and held-out text."""

    enabled: bool = True
    base: bool = Field(True, description="also evaluate the base model (iteration 0)")
    every: int = Field(0, ge=0, description="evaluate every n iterations (0: the last only)")
    num_samples: int = Field(25, ge=1, description="completions per prompt (RTP: 25)")
    max_new_tokens: int = Field(20, ge=1)
    max_prompts: int | None = Field(None, ge=1, description="first n held-out prompts")
    batch_size: int = Field(8, ge=1, description="prompts per sampler call")
    fluency_model: str = Field(
        "base", description="LM scoring the generations' perplexity: base | none | a path"
    )
    text_seq_len: int = Field(128, ge=8, description="window of the held-out text perplexity")
    group_by: str | None = Field(
        None,
        description="prompt metadata column to report toxicity per group (ToxiGen: "
        "target_groups); default: the built-in prompts' kind / RTP's challenging flag",
    )
    detection: DetectionEvalSection | None = None
    lm_eval: LmEvalSection | None = None
    prompt_modes: list[Literal[PROMPT_MODES]] | None = Field(
        None,
        description="prompt forms to evaluate (the first is the headline); default: the "
        "configured form, plus the other one when the tokenizer has a chat template",
    )
    seed: int = 1234


def check_method(config: RunConfig) -> None:
    """Raise `ConfigError` unless `config.method` is a method of the registry
    (`jaxdetox.methods`; a config loaded with `executes=False` may carry any row label)."""
    from jaxdetox.methods import method_of

    method_of(config.method)


class BaselineSection(Section):
    """Settings of the baselines (docs/baselines.md); the LLM's optimizer, batch size, epochs
    and step budget come from `finetune:` so every method trains on the same budget."""

    alpha: float = Field(1.0, ge=0, description="nado_decoding: guidance strength α")
    keep_quantile: float = Field(
        0.5, gt=0, le=1, description="filter_sft: keep samples with toxicity <= this quantile"
    )
    baseline_momentum: float = Field(
        0.9, ge=0, lt=1, description="reinforce: moving-average baseline b <- m·b + (1-m)·r̄"
    )
    kl_coef: float = Field(
        0.0, ge=0, description="reinforce: β of the sampled KL-to-reference penalty"
    )
    dpo_beta: float = Field(0.1, gt=0, description="dpo: β")
    dpo_min_gap: float = Field(
        0.0, ge=0, description="dpo: least toxicity gap between a pair's two samples"
    )
    lambdas: list[float] = Field(
        default_factory=lambda: [0.1, 0.3, 1.0, 3.0],
        description="lambda_sweep: the λ (finetune.kl_weight) of each pr_sequential run",
    )

    @model_validator(mode="after")
    def _lambdas(self) -> BaselineSection:
        if any(lam < 0 for lam in self.lambdas) or len(set(self.lambdas)) != len(self.lambdas):
            raise ValueError(f"baseline.lambdas: distinct values >= 0 expected, got {self.lambdas}")
        return self


class MeshSection(Section):
    """Device mesh `data × fsdp × tensor` (one -1 takes the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @model_validator(mode="after")
    def _one_fill(self) -> MeshSection:
        dims = [self.data, self.fsdp, self.tensor]
        if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
            raise ValueError("mesh: sizes must be >= 1, with at most one -1")
        return self


class LoopSection(Section):
    """The iteration scheme and where its roles (sampler, NADO trainer, LLM trainer) run."""

    scheme: Literal[SCHEMES] = "sequential"
    placement: Literal[PLACEMENTS] = Field(
        "colocated",
        description="colocated: the roles one after another on the whole mesh; split: "
        "concurrently on disjoint sub-meshes of this host (`roles`); jobs: one program per "
        "role (`jaxdetox run --role ...`), coordinating through the run directory; joint "
        "(parallel scheme): colocated, each iteration's train_nado and finetune run as one "
        "joint stage (`joint_step`: one program per step)",
    )
    roles: dict[Literal[ROLES], int | list[int]] = Field(
        default_factory=dict,
        description="split: each role's local devices, as indices into jax.devices() or a "
        "count (counted off in the order sampler, nado, lm); each role's mesh is `mesh` "
        "with its -1 filled from the role's devices",
    )
    iterations: int = Field(2, ge=1)
    checkpoint_every: int = Field(50, ge=1, description="train steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    keep_stage_checkpoints: bool = Field(
        False,
        description="keep a finished training stage's resume checkpoints (optimizer state "
        "included; the stage's output is its artefact): off, they are deleted once it is done",
    )
    async_checkpoints: bool = True
    wait_timeout: float = Field(
        86400.0, gt=0, description="split/jobs: seconds a role waits for another's output"
    )
    poll_seconds: float = Field(5.0, gt=0, description="jobs: manifest polling interval")

    @model_validator(mode="after")
    def _roles_fit_placement(self) -> LoopSection:
        if self.placement == "split":
            missing = [r for r in ROLES if r not in self.roles]
            if missing:
                raise ValueError(f"placement 'split' needs devices for roles {missing}")
            lists = [v for v in self.roles.values() if isinstance(v, list)]
            if lists and len(lists) != len(ROLES):
                raise ValueError("roles: give every role a device list, or every role a count")
            flat = [d for v in lists for d in v]
            if len(flat) != len(set(flat)):
                raise ValueError(f"roles: the device lists must be disjoint, got {self.roles}")
            if any(v < 1 for v in self.roles.values() if isinstance(v, int)) or any(
                not v for v in lists
            ):
                raise ValueError(f"roles: every role needs at least one device, got {self.roles}")
        elif self.roles:
            raise ValueError(f"roles are for placement 'split' (placement is {self.placement!r})")
        if self.placement == "joint" and self.scheme != "parallel":
            raise ValueError(
                "placement 'joint' fuses the parallel scheme's stages; set scheme: parallel"
            )
        return self


class RunConfig(Section):
    """A whole experiment: what `jaxdetox run CONFIG.yaml` executes."""

    name: str = "run"
    method: str = Field(
        "pr_sequential",
        description="what runs and the row it fills in a report: a method of the registry "
        "(`jaxdetox.methods`, docs/baselines.md; e.g. pr_sequential, dpo)",
    )
    seed: int = 0
    model: ModelSection = ModelSection()
    nado: NadoSection = NadoSection()
    prompts: PromptsSection = PromptsSection()
    oracle: OracleSection = OracleSection()
    constraints: list[ConstraintSection] = Field(
        default_factory=list, description="constraints besides `oracle`, one NADO each"
    )
    sampling: SamplingSection = SamplingSection()
    corpus: CorpusSection | None = None
    train_nado: TrainNadoSection = TrainNadoSection()
    finetune: FinetuneSection = FinetuneSection()
    eval: EvalSection = EvalSection()
    mesh: MeshSection = MeshSection()
    loop: LoopSection = LoopSection()
    baseline: BaselineSection = BaselineSection()

    @model_validator(mode="after")
    def _corpus_when_needed(self) -> RunConfig:
        if "corpus" in self.finetune.kl_on and self.corpus is None:
            raise ValueError("finetune.kl_on includes 'corpus' but no `corpus:` section is set")
        return self

    @model_validator(mode="after")
    def _constraints(self) -> RunConfig:
        names = [c.name for c in self.constraints]
        if len(set(names)) != len(names):
            raise ValueError(f"constraints: names must be unique, got {names}")
        if names and self.loop.scheme != "sequential":
            raise ValueError("constraints: several NADOs run with loop.scheme: sequential only")
        return self

    @model_validator(mode="after")
    def _joint_batches(self) -> RunConfig:
        # The joint stage feeds one batch of samples to both halves (`pipeline.joint.joint_stage`).
        if self.loop.placement != "joint":
            return self
        nado, lm = self.train_nado, self.finetune
        for key in ("batch_size", "micro_batches"):
            if getattr(nado, key) != getattr(lm, key):
                raise ValueError(
                    f"loop.placement joint: train_nado.{key} ({getattr(nado, key)}) must equal "
                    f"finetune.{key} ({getattr(lm, key)}): both halves of a joint step read "
                    "the same batch"
                )
        if nado.early_stopping:
            raise ValueError("loop.placement joint: train_nado.early_stopping is not supported")
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str, info: ValidationInfo) -> str:
        # `executes=False` (`jaxdetox eval`): the method is only the row's label.
        if _executes(info):
            from jaxdetox.methods import REGISTRY, unknown_method

            if method not in REGISTRY:
                raise ValueError(unknown_method(method))
        return method

    @model_validator(mode="after")
    def _method_fits(self, info: ValidationInfo) -> RunConfig:
        from jaxdetox.methods import REGISTRY

        method = REGISTRY.get(self.method)
        if method is not None and _executes(info):
            method.check(self)
        return self


def _executes(info: ValidationInfo) -> bool:
    """Whether the config being validated is for a run (not `executes=False`)."""
    return (info.context or {}).get("executes", True)


# ----------------------------------------------------------------------------- loading


def _section_fields(path: Sequence[str | int]) -> list[str] | None:
    """Valid keys of the section at `path` (for unknown-key errors)."""
    model: Any = RunConfig
    for key in path:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, Section)), None
        )
        if model is None:
            return None
    return sorted(model.model_fields)


def _format(error: ValidationError, source: str) -> str:
    """One line per invalid field (one line in all when only one is wrong)."""
    issues = []
    for e in error.errors():
        loc = [p for p in e["loc"] if not isinstance(p, int)]
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _section_fields(loc[:-1])
            hint = f"; valid keys: {', '.join(valid)}" if valid else ""
            issues.append(f"{where}: unknown key{hint}")
            continue
        # A rule over several fields (a model validator) states them in its message; its
        # input is the whole section, not worth echoing.
        message = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        got = "" if isinstance(value, dict) else f" (got {value!r})"
        issues.append(f"{where}: {message}{got}" if where else f"{message}{got}")
    if len(issues) == 1:
        return f"{source}: invalid configuration: {issues[0]}"
    return "\n  ".join([f"{source}: invalid configuration ({len(issues)} problems)", *issues])


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. finetune.kl_weight=0.5)")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with dotted overrides applied (sections created as needed)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def config_from_dict(
    data: dict[str, Any], source: str = "config", *, executes: bool = True
) -> RunConfig:
    """Validate a plain dict into a `RunConfig` (raises `ConfigError`). `executes=False`:
    the config is not run (`jaxdetox eval`), its `method` is only a row label."""
    try:
        return RunConfig.model_validate(data, context={"executes": executes})
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the
    last one silently: a second `loop:` section would replace the first)."""


class _DuplicateKey(Exception):
    """A key given twice in one YAML mapping (`read_yaml` names the file)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise _DuplicateKey(
                f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first on line "
                f"{seen[key] + 1}); merge the two into one"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file with duplicate keys refused; errors name the file (`ConfigError`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *, executes: bool = True
) -> RunConfig:
    """Read a YAML config (None: all defaults), apply `key=value` overrides, validate
    (`executes=False`: see `config_from_dict`)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides), source, executes=executes)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (what the run directory keeps)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
