"""The data flow of a run as data: every stage, the role that runs it, the versions it
consumes and the one it produces. Both schemes are a list of `Stage`s; the placements only
differ in who executes which stages and how a consumer learns that its inputs exist.

Versions: `lm` j is LLM_j (0 = the base model), `nado` k is NADO_k (0 = the initial NADO),
`samples` s is the sample store S_s (drawn) and `labels` s the same store labelled.

    sequential, iteration i:  S_i ← LLM_{i−1};  NADO_i ← (NADO_{i−1}, S_i, LLM_{i−1});
                              LLM_i ← (LLM_{i−1}, NADO_i, S_i)
    parallel, iteration i≥2:  S_{i−1} ← LLM_{i−1};  NADO_i ← (NADO_{i−1}, S_{i−2}, LLM_{i−2});
                              LLM_i ← (LLM_{i−1}, NADO_{i−1}, S_{i−2})
    parallel, iteration 1 (warm-up, sequential on S_0): S_0 ← LLM_0;
                              NADO_1 ← (NADO_0, S_0, LLM_0); LLM_1 ← (LLM_0, NADO_1, S_0)

A NADO's `lm` input is the LLM that drew its samples: R decomposes that model (the Bellman
term's p, the `shared` variant's features), so it is the NADO stage's reference.

Before a stage runs, `check_inputs` verifies that the record of every stage it depends on is
done *and consumed what this flow says it should* — a role handed an artefact made from
other versions stops with an error naming them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdetox.config import RunConfig
from jaxdetox.errors import JaxdetoxError

ROLE_OF = {
    "sample": "sampler",
    "label": "sampler",
    "eval": "sampler",
    "train_nado": "nado",
    "finetune": "lm",
    "export": "lm",
}
NAMES = {"lm": "LLM", "nado": "NADO", "samples": "S", "labels": "labelled S", "eval": "eval"}


class VersionError(JaxdetoxError, RuntimeError):
    """An input was made from other versions than the data flow prescribes."""


class InputFailed(RuntimeError):
    """The stage that makes an input failed (its record says so, with the error)."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the flow: `inputs` as the manifest records them, `output` = (kind, version)."""

    iteration: int
    name: str
    inputs: tuple[tuple[str, int], ...]
    output: tuple[str, int] | None
    block: int | None = None  # sample: its prompt block (0-based)

    @property
    def role(self) -> str:
        """The role that runs this stage."""
        return ROLE_OF[self.name]

    @property
    def input_versions(self) -> dict[str, int]:
        """`inputs` as the manifest's dict."""
        return dict(self.inputs)

    def needs(self) -> list[tuple[str, int]]:
        """The artefacts (kind, version) this stage waits for (base LLM / initial NADO: none)."""
        out = []
        for kind, version in self.inputs:
            if kind in ("lm", "nado") and version == 0:
                continue
            if kind == "samples" and self.name != "label":
                kind = "labels"  # training consumes labelled samples
            out.append((kind, version))
        return out

    def __str__(self) -> str:
        return f"{self.name} of iteration {self.iteration}"


def version_name(kind: str, version: int) -> str:
    """`LLM_3`, `NADO_2`, `S_1`, ..."""
    return f"{NAMES[kind]}_{version}"


def describe(inputs: dict[str, int]) -> str:
    """`{lm: 1, nado: 2}` -> `LLM_1, NADO_2`."""
    return ", ".join(version_name(k, v) for k, v in inputs.items()) or "nothing"


def make_stage(iteration: int, name: str, output: tuple[str, int] | None, **inputs: int) -> Stage:
    """A `Stage` whose inputs are the keyword arguments, in their order (the manifest's)."""
    return Stage(iteration, name, tuple(inputs.items()), output)


def sample_stages(iteration: int, lm: int, samples: int, block: int) -> list[Stage]:
    """S_samples drawn from LLM_lm on prompt block `block` (0-based), then labelled."""
    drawn = dataclasses.replace(
        make_stage(iteration, "sample", ("samples", samples), lm=lm), block=block
    )
    return [drawn, make_stage(iteration, "label", ("labels", samples), samples=samples)]


def nado_stage(iteration: int, lm: int, nado: int, samples: int) -> Stage:
    """NADO_iteration from NADO_nado on S_samples; `lm`: the LLM that drew the samples, the
    model the NADO decomposes (its reference)."""
    return make_stage(
        iteration, "train_nado", ("nado", iteration), lm=lm, nado=nado, samples=samples
    )


def lm_stage(
    iteration: int, lm: int, *, nado: int | None = None, samples: int | None = None
) -> Stage:
    """LLM_iteration from LLM_lm (with teacher NADO_nado, on S_samples, when given)."""
    inputs = {"lm": lm} | ({} if nado is None else {"nado": nado})
    inputs |= {} if samples is None else {"samples": samples}
    return make_stage(iteration, "finetune", ("lm", iteration), **inputs)


def eval_stage(version: int, *, lm: int | None = None, nado: int | None = None) -> Stage:
    """The eval of LLM_version (recorded under iteration `version`), or with `nado` of the
    LLM_lm ⊕ NADO_nado guided sampler."""
    inputs = {"lm": version if lm is None else lm} | ({} if nado is None else {"nado": nado})
    return make_stage(version, "eval", ("eval", version), **inputs)


def export_stage(iteration: int, lm: int, nado: int | None = None) -> Stage:
    """Writing LLM_lm (and NADO_nado) into the run's `final/` (not a manifest record)."""
    return make_stage(iteration, "export", None, lm=lm, **({} if nado is None else {"nado": nado}))


def eval_due(config: RunConfig, iteration: int) -> bool:
    """Whether LLM_iteration is evaluated (every `eval.every` iterations and the last)."""
    cfg = config.eval
    if not cfg.enabled:
        return False
    if iteration == 0:
        return cfg.base
    last = iteration == config.loop.iterations
    return last or (cfg.every > 0 and iteration % cfg.every == 0)


def plan_stages(config: RunConfig) -> list[Stage]:
    """Every stage of the run in an order that runs it on one mesh (the `colocated` order)."""
    n = config.loop.iterations
    stages: list[Stage] = []

    def evaluate(version: int) -> None:
        if eval_due(config, version):
            stages.append(eval_stage(version))

    evaluate(0)
    drawn_by: dict[int, int] = {}  # S_s -> the LLM its sample stage draws it from

    def sample(i: int, lm: int, samples: int) -> None:
        stages.extend(sample_stages(i, lm=lm, samples=samples, block=i - 1))
        drawn_by[samples] = lm

    for i in range(1, n + 1):
        if config.loop.scheme == "sequential" or i == 1:
            s = i if config.loop.scheme == "sequential" else 0
            sample(i, lm=i - 1, samples=s)
            stages.append(nado_stage(i, lm=drawn_by[s], nado=i - 1, samples=s))
            stages.append(lm_stage(i, lm=i - 1, nado=i, samples=s))
        else:  # (C), (A), (B): nothing consumes an artefact of its own iteration
            sample(i, lm=i - 1, samples=i - 1)
            stages.append(nado_stage(i, lm=drawn_by[i - 2], nado=i - 1, samples=i - 2))
            stages.append(lm_stage(i, lm=i - 1, nado=i - 1, samples=i - 2))
        evaluate(i)
    stages.append(export_stage(n, lm=n, nado=n))
    return stages


def not_done(stages: list[Stage], records: dict[tuple[int, str], dict[str, Any]]) -> list[Stage]:
    """The stages whose manifest record is not `done` (export writes files, no record: the
    caller checks its output)."""
    return [
        s for s in stages
        if s.name != "export" and records.get((s.iteration, s.name), {}).get("status") != "done"
    ]  # fmt: skip


def producers(stages: list[Stage]) -> dict[tuple[str, int], Stage]:
    """The stage that makes each artefact."""
    return {s.output: s for s in stages if s.output is not None}


def check_inputs(
    stage: Stage,
    made_by: dict[tuple[str, int], Stage],
    records: dict[tuple[int, str], dict[str, Any]],
) -> list[Stage]:
    """The dependencies of `stage` not done yet; raises `VersionError` when a done one
    consumed other versions than the flow says, `InputFailed` when one failed."""
    pending = []
    for need in stage.needs():
        producer = made_by[need]
        record = records.get((producer.iteration, producer.name))
        if record is None or record["status"] == "running":
            # not made yet: fail now if it never can be (an input of it failed upstream)
            check_inputs(producer, made_by, records)
            pending.append(producer)
            continue
        if record["status"] == "failed":
            raise InputFailed(
                f"{stage} (role {stage.role}) needs {version_name(*need)}, but {producer} "
                f"failed in role {record.get('role') or producer.role}: "
                f"{record['outputs'].get('error', 'no message')}"
            )
        if record["inputs"] != producer.input_versions:
            raise VersionError(
                f"{stage} (role {stage.role}) needs {version_name(*need)} made by {producer} "
                f"from {describe(producer.input_versions)}, but the run directory's "
                f"{version_name(*need)} was made from {describe(record['inputs'])}; "
                "refusing to mix versions (was the run directory reused with another scheme?)"
            )
    return pending


def describe_flow(config: RunConfig, stages: list[Stage] | None = None) -> str:
    """The data flow of `stages` (default: the scheme's, `plan_stages`) as text, one line
    per iteration and role (for `--dry-run`)."""
    loop = config.loop
    where = {
        "colocated": "every role on the whole mesh, one after another",
        "split": f"roles concurrently on sub-meshes of this host's devices {dict(loop.roles)}",
        "jobs": "one program per role (`jaxdetox run CONFIG --out RUN --role ROLE`)",
        "joint": "the whole mesh, each iteration's train_nado + finetune on S_(i-2) as one "
        "joint stage",
    }[loop.placement]
    lines = [f"data flow ({loop.scheme} scheme; placement {loop.placement}: {where}):"]
    by_iteration: dict[int, list[Stage]] = {}
    for stage in plan_stages(config) if stages is None else stages:
        if stage.name not in ("label", "export"):
            by_iteration.setdefault(stage.iteration, []).append(stage)
    for iteration, group in sorted(by_iteration.items()):
        parts = []
        for s in group:
            made = version_name(*s.output) if s.name != "eval" else f"eval of LLM_{s.iteration}"
            parts.append(f"{s.role}: {made} <- {describe(s.input_versions)}")
        lines.append(f"  iteration {iteration}: " + "; ".join(parts))
    return "\n".join(lines)
