"""What every stage of a run shares: the mesh, the base LLM, the NADO architecture, prompt
blocks, the sample store, the oracle, and the versioned artefacts (LLM_j, NADO_k).

Artefacts are versioned by iteration: `lm_params(j)` is LLM_j (0 = the base model),
`nado_params(k)` is NADO_k (0 = the initial NADO). Each is kept in memory once made and
otherwise restored from the stage checkpoint that produced it (`iter_00j/finetune/artifact`,
`iter_00k/train_nado/artifact`), so a restarted run never recomputes a finished stage. With
the `split` placement each role has its own `Experiment` on its own sub-mesh, and a version
another role made is taken from their shared `Handover` by `jax.device_put` (a resharding
copy between sub-meshes) instead of from disk.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from functools import cached_property
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxdetox import fileio, sharding
from jaxdetox.config import RunConfig
from jaxdetox.data import SampleStore, load_prompt_records, load_prompts, split_blocks
from jaxdetox.data.prompts import (
    ChatTemplate,
    PromptSet,
    TokenizedPrompts,
    chat_template_parts,
    tokenize_prompts,
)
from jaxdetox.loop.rundir import RunDir
from jaxdetox.models import NadoConfig, init_nado, load_pretrained
from jaxdetox.models.config import ModelConfig
from jaxdetox.models.registry import abstract_model
from jaxdetox.sampling import SamplingConfig, special_tokens
from jaxdetox.train.checkpoint import Checkpointer, CheckpointError
from jaxdetox.train.state import (
    Params,
    abstract_like,
    param_shardings,
    split_params,
    to_nnx_state,
)

logger = logging.getLogger(__name__)

ARTIFACT = "artifact"


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One constraint of the run: its oracle section, guidance strength and store label key
    (the first is `oracle`, the rest `constraints`; each has its own NADO)."""

    name: str
    oracle: Any  # config.OracleSection
    alpha: float
    label_name: str
    satisfied_below: float = 0.5


def mesh_for(config: RunConfig, devices: list[Any] | None = None) -> jax.sharding.Mesh:
    """The run's device mesh (on `devices`, default all)."""
    m = config.mesh
    return sharding.make_mesh((m.data, m.fsdp, m.tensor), devices)


class Handover:
    """Finished artefacts of the role threads of one program, by (kind, version)."""

    def __init__(self) -> None:
        """An empty hand-over table."""
        self._items: dict[tuple[str, int], Params] = {}
        self._lock = threading.Lock()

    def put(self, kind: str, version: int, params: Params) -> None:
        """Publish `kind` (lm | nado) `version`; drops versions two or more older."""
        with self._lock:
            self._items[kind, version] = params
            for old in [k for k in self._items if k[0] == kind and k[1] < version - 1]:
                del self._items[old]

    def get(self, kind: str, version: int) -> Params | None:
        """The published params, or None."""
        with self._lock:
            return self._items.get((kind, version))


def builtin_prompt_set(split: str, kind: str | None) -> PromptSet:
    """The built-in prompts of `split` (train | eval), optionally one `kind`."""
    from jaxdetox import assets

    prompts = load_prompt_records(
        assets.asset_path("prompts.jsonl"), id_field="id", meta_fields=("split", "kind")
    )
    meta = {"split": split} | ({"kind": kind} if kind else {})
    return prompts.filter(meta=meta)


class Experiment:
    """Shared state of one run (built once per process)."""

    def __init__(
        self,
        config: RunConfig,
        run: RunDir,
        *,
        progress: bool = True,
        devices: list[Any] | None = None,
        handover: Handover | None = None,
    ) -> None:
        """Load the base LLM onto the mesh (over `devices`, default all) and open the sample
        store; `handover`: the table shared with other roles' experiments of this program."""
        self.config = config
        self.run = run
        self.progress = progress
        self.handover = handover
        self.mesh = mesh_for(config, devices)
        logger.info("loading %s onto mesh %s", config.model.path, dict(self.mesh.shape))
        base = load_pretrained(
            config.model.path,
            mesh=self.mesh,
            dtype=config.model.dtype,
            param_dtype=config.model.param_dtype,
        )
        if base.tokenizer is None:
            raise ValueError(f"model.path {config.model.path!r}: no tokenizer files found")
        self.tokenizer = base.tokenizer
        self.lm_config: ModelConfig = dataclasses.replace(
            base.config, remat=config.model.remat_policy, attention=config.model.attention
        )
        # The graph of the configured model (remat as configured); the loaded weights fit it.
        self.lm_graph = nnx.split(abstract_model(self.lm_config), nnx.Param)[0]
        _, self.lm_abstract, base_params = split_params(base.model)
        self.lm_shardings = param_shardings(self.lm_abstract, self.mesh)
        self.nado_config = NadoConfig.from_section(self.lm_config, config.nado)
        initial_nado = init_nado(
            self.nado_config,
            config.seed,
            lm_model=base.model if config.nado.init == "lm" else None,
            output_embedding=base.model.unembed_weights()[0],
            mesh=self.mesh,
        )
        self.nado_graph, self.nado_abstract, nado_params = split_params(initial_nado)
        self.nado_shardings = param_shardings(self.nado_abstract, self.mesh)
        self.handover_seconds = 0.0  # spent bringing in other stages' LLM / NADO versions
        self._lm: dict[int, Params] = {0: base_params}
        self._nado: dict[int, Params] = {0: nado_params}
        # Further constraints' NADOs by (name, version); all start from the initial NADO.
        self._extra_nado: dict[tuple[str, int], Params] = {
            (c.name, 0): nado_params for c in self.constraints[1:]
        }
        self.lora = None  # LoRA: LLM_j is the base plus adapters_j (`adapters(j)`)
        if config.finetune.lora is not None:
            self._init_lora(self.lm_module(base_params))
        self.store = SampleStore(run.samples)
        # compiled train steps (and the eval fluency model), reused across iterations
        self.runners: dict[tuple, Any] = {}

    def _init_lora(self, base_model: nnx.Module) -> None:
        from jaxdetox.models import lora

        c = self.config.finetune.lora
        self.lora = lora.LoraConfig(c.rank, c.alpha, tuple(c.targets))
        model = lora.add_adapters(base_model, self.lora, seed=c.seed)
        self.lora_graph, self.lora_abstract, params = split_params(model)
        self._adapters: dict[int, Params] = {0: lora.split_adapters(params)[1]}
        shardings = param_shardings(self.lora_abstract, self.mesh)
        self.adapter_shardings = lora.split_adapters(shardings)[1]
        scale = self.lora.scale  # base and adapters are arguments (a closure would embed them)
        self._merge_fn = jax.jit(
            lambda base, a: lora.merge_params(base, a, scale), out_shardings=self.lm_shardings
        )

    # ------------------------------------------------------------------ artefacts

    def lm_params(self, iteration: int) -> Params:
        """LLM_iteration (0 = base), from memory, another role, or its finetune artefact
        (LoRA: the base with adapters_iteration merged in)."""
        if self.lora is not None and iteration > 0:  # merged anew: no full copy is held
            return self._merged(self.adapters(iteration))
        if iteration not in self._lm:
            params = self._fetch("lm", iteration, self.lm_abstract, self.lm_shardings)
            self._hold("lm", iteration, params)
        return self._lm[iteration]

    def adapters(self, iteration: int) -> Params:
        """LoRA adapters of LLM_iteration (0 = the initial ones, B = 0)."""
        if iteration not in self._adapters:
            shared = self.handover.get("lm", iteration) if self.handover else None
            if shared is not None:  # made by another role on its sub-mesh
                params = jax.device_put(shared, self.adapter_shardings)
            else:
                target = abstract_like(self._adapters[0], self.adapter_shardings)
                params = self._restore_artifact(iteration, "finetune", None, None, target=target)
            self._adapters[iteration] = params
        return self._adapters[iteration]

    def _merged(self, adapters: Params) -> Params:
        return self._merge_fn(self._lm[0], adapters)

    def lora_module(self, iteration: int) -> nnx.Module:
        """The LoRA LLM module: base weights (no copy) plus adapters_iteration."""
        from jaxdetox.models import lora

        params = lora.combine(self._lm[0], self.adapters(iteration))
        return nnx.merge(self.lora_graph, to_nnx_state(self.lora_abstract, params))

    def nado_params(self, iteration: int, constraint: str | None = None) -> Params:
        """NADO_iteration (0 = initial) of the first constraint or of `constraint`, from
        memory, another role, or its train_nado artefact."""
        if constraint is not None and constraint != self.constraints[0].name:
            key = (constraint, iteration)
            if key not in self._extra_nado:
                self._extra_nado[key] = self._restore_artifact(
                    iteration, "train_nado", self.nado_abstract, self.nado_shardings,
                    name=f"{ARTIFACT}_{constraint}",
                )  # fmt: skip
            return self._extra_nado[key]
        if iteration not in self._nado:
            params = self._fetch("nado", iteration, self.nado_abstract, self.nado_shardings)
            self._hold("nado", iteration, params)
        return self._nado[iteration]

    def all_nado_params(self, iteration: int) -> dict[str, Params]:
        """NADO_iteration of every constraint, by name (in `constraints` order)."""
        return {c.name: self.nado_params(iteration, c.name) for c in self.constraints}

    def _fetch(self, kind: str, iteration: int, abstract: Any, shardings: Params) -> Params:
        start = time.perf_counter()
        shared = self.handover.get(kind, iteration) if self.handover else None
        if shared is not None:  # made by another role on its sub-mesh: reshard onto ours
            params = jax.block_until_ready(jax.device_put(shared, shardings))
        else:
            stage = "finetune" if kind == "lm" else "train_nado"
            params = self._restore_artifact(iteration, stage, abstract, shardings)
        self.handover_seconds += time.perf_counter() - start
        return params

    def _hold(self, kind: str, iteration: int, params: Params) -> None:
        """Keep a version in memory, dropping the ones no later stage of the sequential
        scheme reads (one asked for again is restored): once LLM_i exists no stage reads
        LLM_{i−1} (the base LLM stays; the parallel scheme's train_nado i+1 restores the
        LLM_{i−1} that drew its samples), while the parallel scheme's finetune i still reads
        NADO_{i−1} after NADO_i is made. So at most two versions of each."""
        if kind == "lm":
            table, drop = self._lm, lambda k: 0 < k < iteration
        else:
            table, drop = self._nado, lambda k: k < iteration - 1
        table[iteration] = params
        for old in [k for k in table if drop(k)]:
            del table[old]

    def keep(
        self, kind: str, iteration: int, params: Params, constraint: str | None = None
    ) -> None:
        """Hold a finished artefact in memory and publish it to the other roles (a further
        constraint's NADO: held only; several constraints run colocated)."""
        if kind == "nado" and constraint not in (None, self.constraints[0].name):
            self._extra_nado[(constraint, iteration)] = params
            for old in [k for k in self._extra_nado if k[0] == constraint and k[1] < iteration - 1]:
                del self._extra_nado[old]
            return
        if kind == "lm" and self.lora is not None:  # params are adapters; merged on demand
            self._adapters[iteration] = params
            for old in [k for k in self._adapters if 0 < k < iteration]:
                del self._adapters[old]
        else:
            self._hold(kind, iteration, params)
        if self.handover is not None:
            self.handover.put(kind, iteration, params)

    def save_artifact(
        self,
        iteration: int,
        stage: str,
        params: Params,
        inputs: dict[str, int],
        name: str = ARTIFACT,
    ) -> str:
        """Write a stage's output parameters (orbax, atomic) with the versions they were made
        from, into the stage's `name` folder; returns the directory."""
        directory = self.run.stage_dir(iteration, stage) / name
        with Checkpointer(directory, keep=1, async_save=False) as ckpt:
            ckpt.save(0, params, meta={"iteration": iteration, "stage": stage, "inputs": inputs})
        return str(directory)

    def _restore_artifact(
        self,
        iteration: int,
        stage: str,
        abstract: Any,
        shardings: Params,
        target: Any = None,
        name: str = ARTIFACT,
    ) -> Params:
        directory = self.run.stage_dir(iteration, stage) / name
        if not directory.exists():
            raise CheckpointError(
                f"{directory}: missing; the manifest says {stage} of iteration {iteration} is "
                "done but its output is gone (delete that manifest record to redo the stage)"
            )
        if target is None:
            target = abstract_like(nnx.to_pure_dict(abstract), shardings)
        with Checkpointer(directory, keep=1, async_save=False) as ckpt:
            params, _, meta = ckpt.restore(target, step=0)
        record = self.run.record(iteration, stage)
        made_from = meta.get("inputs")
        if record is not None and made_from is not None and made_from != record["inputs"]:
            from jaxdetox.loop.flow import VersionError, describe

            raise VersionError(
                f"{directory}: made from {describe(made_from)}, but the manifest's {stage} of "
                f"iteration {iteration} consumed {describe(record['inputs'])}"
            )
        return params

    def lm_module(self, params: Params) -> nnx.Module:
        """The LLM module for params (no copy), with its variables' metadata."""
        return nnx.merge(self.lm_graph, to_nnx_state(self.lm_abstract, params))

    def nado_module(self, params: Params) -> nnx.Module:
        """The NADO module for params (no copy), with its variables' metadata."""
        return nnx.merge(self.nado_graph, to_nnx_state(self.nado_abstract, params))

    def language_model(self, params: Params) -> Any:
        """A `LanguageModel` view of LLM params (for export)."""
        from jaxdetox.lm import LanguageModel

        return LanguageModel(self.lm_config, self.lm_module(params), self.tokenizer, self.mesh)

    @cached_property
    def sampler(self) -> Any:
        """One sampler for every LLM version (its compiled programs are reused)."""
        from jaxdetox.lm import lm_sampler

        return lm_sampler(self.language_model(self.lm_params(0)))[0]

    def sampler_params(self, version: int) -> Any:
        """LLM_version's parameters in the form the sampler takes."""
        return to_nnx_state(self.lm_abstract, self.lm_params(version))

    @cached_property
    def guided_sampler(self) -> Any:
        """One NADO-guided sampler (LLM ⊕ NADO) for every version of both."""
        from jaxdetox.lm import lm_sampler

        lm = self.language_model(self.lm_params(0))
        # The module gives the structure only (parameters come with each call), so any held
        # version serves: NADO_0 is never saved and is dropped once NADO_2 exists.
        held = next(iter(self._nado.values()))
        return lm_sampler(lm, self.nado_module(held))[0]

    def nado_sampler_params(self, version: int) -> Any:
        """NADO_version's parameters in the form the guided sampler takes."""
        return to_nnx_state(self.nado_abstract, self.nado_params(version))

    # ------------------------------------------------------------------ prompts

    @cached_property
    def _blocks(self) -> tuple[Any, PromptSet]:
        p = self.config.prompts
        if p.source == "builtin":
            train = builtin_prompt_set("train", p.kind)
            blocks = split_blocks(train, seed=p.seed, block_size=p.block_size, eval_size=0)
            # Evaluation covers both kinds (reported per kind), whatever the training kind.
            return blocks, builtin_prompt_set("eval", None)
        blocks = split_blocks(
            load_prompts(p.source), seed=p.seed, block_size=p.block_size, eval_size=p.eval_size
        )
        return blocks, blocks.eval_block()

    @cached_property
    def chat(self) -> ChatTemplate | None:
        """The chat template around each prompt (`prompts.chat_template`), else None."""
        p = self.config.prompts
        return chat_template_parts(self.tokenizer, p.system) if p.chat_template else None

    def _tokenize(self, prompts: PromptSet, chat: bool | None = None) -> TokenizedPrompts:
        template = self.chat if chat is None else self.chat_for(chat)
        return tokenize_prompts(
            prompts, self.tokenizer, max_tokens=self.config.prompts.max_tokens, chat=template
        )

    def chat_for(self, chat: bool) -> ChatTemplate | None:
        """The chat template when `chat` (even if the run's prompts are raw), else None."""
        if not chat:
            return None
        return self.chat or chat_template_parts(self.tokenizer, self.config.prompts.system)

    def train_prompts(self, block: int) -> TokenizedPrompts:
        """Training prompt block `block` (0-based; blocks are disjoint)."""
        return self._tokenize(self._blocks[0].train_block(block))

    def eval_prompt_set(self) -> PromptSet:
        """Held-out prompts (texts and metadata), disjoint from every training block."""
        return self._blocks[1]

    def eval_prompts(self, chat: bool | None = None) -> TokenizedPrompts:
        """Held-out prompts, tokenised (`chat`: force the chat / raw form; None: the run's)."""
        return self._tokenize(self._blocks[1], chat)

    def sampling_config(self, samples: int, chat: bool | None = None) -> SamplingConfig:
        """Sampling settings of sample version `samples` (its own seed); with a chat template
        its end-of-turn token also stops a completion."""
        s = self.config.sampling
        eos, pad = special_tokens(self.lm_config)
        template = self.chat if chat is None else self.chat_for(chat)
        if template is not None:
            eos = eos + tuple(t for t in template.stop if t not in eos)
        return SamplingConfig(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            num_samples=s.num_samples,
            eos_token_ids=eos,
            pad_token_id=pad,
            seed=s.seed + 1000 * samples,
        )

    @property
    def prompt_len(self) -> int:
        """Fixed prompt width of training batches (max tokens + special prefix or chat template
        tokens, rounded)."""
        from jaxdetox.data.packing import round_up
        from jaxdetox.data.prompts import special_prefix

        extra = self.chat.overhead if self.chat else len(special_prefix(self.tokenizer))
        return round_up(self.config.prompts.max_tokens + extra, 8)

    @property
    def completion_len(self) -> int:
        """Fixed completion width of training batches."""
        from jaxdetox.data.packing import round_up

        return round_up(self.config.sampling.max_new_tokens, 8)

    # ------------------------------------------------------------------ oracle

    @cached_property
    def oracle(self) -> Any:
        """The configured oracle with a score cache in the run directory."""
        from jaxdetox import oracles

        o = self.config.oracle
        cache = fileio.local_file(self.run.root / "oracle_cache.sqlite")
        return oracles.load(o.name, cache=cache, **o.args)

    @property
    def label_name(self) -> str:
        """The sample-store label key of the configured oracle."""
        from jaxdetox.stages import oracle_label_name

        return oracle_label_name(self.config.oracle.name)

    @cached_property
    def constraints(self) -> list[Constraint]:
        """Every constraint: `oracle` first (key: its label name), then `constraints`."""
        first = Constraint(
            self.label_name, self.config.oracle, self.config.finetune.alpha, self.label_name
        )
        rest = [
            Constraint(c.name, c.oracle, c.alpha, c.name, c.satisfied_below)
            for c in self.config.constraints
        ]
        if any(c.name == first.name for c in rest):
            raise ValueError(
                f"constraints: name {first.name!r} is the main oracle's label key; rename it"
            )
        return [first, *rest]

    def constraint_oracle(self, constraint: Constraint) -> Any:
        """A constraint's oracle (the first: `oracle`), with its own score cache."""
        from jaxdetox import oracles

        if constraint.name == self.constraints[0].name:
            return self.oracle
        cache = self.__dict__.setdefault("_constraint_oracles", {})
        if constraint.name not in cache:
            o = constraint.oracle
            path = self.run.root / f"oracle_cache_{constraint.name}.sqlite"
            cache[constraint.name] = oracles.load(o.name, cache=path, **o.args)
        return cache[constraint.name]

    def labels(
        self, batch: dict[str, np.ndarray], constraint: Constraint | None = None
    ) -> dict[str, np.ndarray]:
        """NADO targets for a sample batch: `labels_b` and `label_mask_b` (host side), with
        the label transform of `constraint` (default: the first)."""
        from jaxdetox.oracles import make_labels

        lab = (constraint or self.constraints[0]).oracle.label
        ok = batch["ok_b"] & batch["valid_b"]
        labels, mask = make_labels(batch["toxicity_b"], ok, tau=lab.tau, threshold=lab.threshold)
        return {
            **batch,
            "labels_b": labels.astype(np.float32),
            "label_mask_b": mask.astype(np.float32),
        }
