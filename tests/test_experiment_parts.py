"""The parts `Experiment` composes, one at a time and without a model: the artefact table
(one keep policy, hand-over, save / restore and its version-check refusal), the prompts
(blocks, chat template, sampling settings) and the constraints (order, oracles, labels)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdetox.config import config_from_dict
from jaxdetox.pipeline.artefacts import (
    ARTIFACT,
    LM,
    NADO,
    ArtefactTable,
    Handover,
    location,
    slot_of,
    stale,
)
from jaxdetox.pipeline.context import Initial
from jaxdetox.pipeline.rundir import RunDir
from jaxdetox.train.checkpoint import CheckpointError
from jaxdetox.train.state import abstract_like
from tests._tokenizer import make_chat_tokenizer, make_tokenizer

LEXICON = {
    "name": "no_the",
    "alpha": 2.0,
    "oracle": {"name": "lexicon", "args": {"words": ["the"]}},
}


def _params(value: float) -> dict:
    return {"w": jnp.full((4,), value, jnp.float32)}


class _Context:
    """What the artefact table reads of a `RunContext`: one-device shardings, no LoRA."""

    lora = None

    def __init__(self) -> None:
        self.shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}

    def output_shardings(self, kind: str) -> dict:
        return self.shardings

    def restore_target(self, kind: str) -> dict:
        return abstract_like(_params(0.0), self.shardings)


def _table(tmp_path, constraints=("default",), handover=None, run=None) -> ArtefactTable:
    run = run or RunDir(tmp_path / "run")
    initial = Initial(_params(0.0), _params(0.0), _params(-1.0))
    return ArtefactTable(_Context(), run, initial, list(constraints), handover)


def _value(params: dict) -> float:
    return float(params["w"][0])


def test_keep_policy_holds_the_base_and_newest_llm_and_the_two_newest_nados():
    assert [v for v in range(5) if not stale(LM, v, 4)] == [0, 4]
    assert [v for v in range(5) if not stale(NADO, v, 4)] == [3, 4]
    assert not stale(NADO, 0, 1) and stale(NADO, 0, 2)


def test_the_table_applies_one_policy_to_every_artefact(tmp_path):
    table = _table(tmp_path, constraints=("default", "no_the"))
    for v in (1, 2, 3):
        table.keep("lm", v, _params(v))
        table.keep("nado", v, _params(10 + v))
        table.keep("nado", v, _params(20 + v), constraint="no_the")
    assert table.held_versions("lm") == [0, 3]
    assert table.held_versions("nado") == [2, 3]
    assert table.held_versions("nado", "no_the") == [2, 3]
    # The first constraint's NADO is `nado` itself, under either name.
    assert table.held_versions("nado", "default") == [2, 3]
    assert _value(table.nado_params(3, "default")) == _value(table.nado_params(3)) == 13
    assert _value(table.nado_params(3, "no_the")) == 23 and _value(table.lm_params(0)) == 0
    with pytest.raises(ValueError, match="kind 'llm'"):
        table.keep("llm", 1, _params(1))


def test_a_version_not_held_is_restored_and_the_restore_is_held_by_the_same_policy(tmp_path):
    table = _table(tmp_path, constraints=("default", "no_the"))
    inputs = {"lm": 0, "nado": 0, "samples": 0}
    for v in (1, 2, 3):
        table.save("nado", v, _params(20 + v), inputs, constraint="no_the")
        table.keep("nado", v, _params(20 + v), constraint="no_the")
    assert (tmp_path / "run" / "iter_001" / "train_nado" / f"{ARTIFACT}_no_the").is_dir()
    assert _value(table.nado_params(1, "no_the")) == 21  # dropped, read back from disk
    assert table.held_versions("nado", "no_the") == [1, 2, 3]
    assert table.handover_seconds > 0
    with pytest.raises(CheckpointError, match="missing; the manifest says finetune of iter"):
        table.lm_params(5)


def test_a_restore_made_from_other_versions_than_the_manifest_records_is_refused(tmp_path):
    from jaxdetox.pipeline.flow import VersionError

    run = RunDir(tmp_path / "run")
    table = _table(tmp_path, run=run)
    table.save("lm", 2, _params(2), {"lm": 1, "nado": 2, "samples": 1})
    run.update_record(2, "finetune", status="done", inputs={"lm": 1, "nado": 2, "samples": 1})
    assert _value(_table(tmp_path, run=run).lm_params(2)) == 2
    run.update_record(2, "finetune", status="done", inputs={"lm": 1, "nado": 1, "samples": 1})
    with pytest.raises(VersionError, match=r"made from LLM_1, NADO_2, S_1, but the manifest's "
                       r"finetune of iteration 2 consumed LLM_1, NADO_1, S_1"):  # fmt: skip
        _table(tmp_path, run=run).lm_params(2)


def test_a_kept_version_reaches_the_other_roles_table_through_the_handover(tmp_path):
    handover = Handover()
    made, used = _table(tmp_path, handover=handover), _table(tmp_path, handover=handover)
    for v in (1, 2, 3):
        made.keep("nado", v, _params(v))
    assert _value(used.nado_params(3)) == 3 and _value(used.nado_params(2)) == 2
    assert handover.get(("nado", None), 1) is None  # the hand-over keeps the two newest
    with pytest.raises(CheckpointError, match="missing"):  # neither held nor published
        used.nado_params(1)


def test_with_lora_the_llm_versions_are_adapters_merged_into_the_base(tmp_path):
    table = _table(tmp_path)
    table.context.lora = SimpleNamespace(merge=lambda base, a: {"w": base["w"] + a["w"]})
    base = table.base
    assert table.lm_params(0) is base and _value(table.adapters(0)) == 0
    for v in (1, 2):
        table.keep("lm", v, _params(v))
    assert _value(table.lm_params(2)) == 2 and table.held_versions("lm") == [0, 2]
    assert table.lm_params(0) is base  # the base is never an adapter version


def test_artefact_locations_and_their_inverse():
    assert location(("lm", None)) == ("finetune", "artifact")
    assert location(("nado", "no_the")) == ("train_nado", "artifact_no_the")
    for slot in [("lm", None), ("nado", None), ("nado", "no_the")]:
        assert slot_of(*location(slot)) == slot


# ---------------------------------------------------------------------- prompts


def _prompts(chat: bool = False, tokenizer=None, **section):
    from jaxdetox.config import PromptsSection, SamplingSection
    from jaxdetox.pipeline.prompts import Prompts

    s = PromptsSection(block_size=8, max_tokens=12, chat_template=chat, **section)
    lm_config = SimpleNamespace(eos_token_id=2, pad_token_id=0)
    return Prompts(s, SamplingSection(max_new_tokens=6), tokenizer or make_tokenizer(), lm_config)


def test_prompt_blocks_are_disjoint_and_held_out_from_evaluation():
    prompts = _prompts()
    blocks = [set(prompts.train_prompts(b).ids.tolist()) for b in range(3)]
    assert all(len(b) == 8 for b in blocks) and not blocks[0] & blocks[1]
    held_out = set(prompts.eval_prompt_set().ids.tolist())
    assert held_out and not held_out & set().union(*blocks)
    assert prompts.prompt_len == 16 and prompts.completion_len == 8  # rounded up to 8
    assert all(len(t) <= 12 for t in prompts.train_prompts(0).tokens)


def test_the_chat_template_wraps_prompts_and_stops_completions():
    raw, chat = _prompts(tokenizer=make_chat_tokenizer()), _prompts(True, make_chat_tokenizer())
    template = chat.chat
    assert raw.chat is None and template is not None and raw.chat_for(True) == template
    tokens = chat.train_prompts(0).tokens[0].tolist()
    assert tokens[: len(template.prefix)] == list(template.prefix)
    assert tokens[-len(template.suffix) :] == list(template.suffix)
    assert raw.eval_prompts(chat=True).tokens[0].tolist() == chat.eval_prompts().tokens[0].tolist()
    end = template.stop[0]
    assert end not in raw.sampling_config(1).eos_token_ids
    assert end in chat.sampling_config(1).eos_token_ids
    assert end in raw.sampling_config(1, chat=True).eos_token_ids
    assert end not in chat.sampling_config(1, chat=False).eos_token_ids
    assert chat.sampling_config(2).seed == chat.sampling_config(0).seed + 2000
    assert chat.prompt_len % 8 == 0 and chat.prompt_len >= max(map(len, chat.eval_prompts().tokens))


# ---------------------------------------------------------------------- constraints


def _config(tmp_path, **extra):
    from tests._tiny_run import tiny_config

    return config_from_dict({**tiny_config(tmp_path), **extra})


def test_constraints_are_the_oracle_first_then_the_further_ones(tmp_path):
    from jaxdetox.pipeline.constraints import Constraints

    cs = Constraints(_config(tmp_path, constraints=[LEXICON]), tmp_path)
    first, second = cs
    assert len(cs) == 2 and cs[0] is first and cs[1:] == [second]
    assert first.name == cs.label_name == "default" and second.label_name == "no_the"
    assert second.alpha == 2.0
    oracle = cs.oracle(second)
    assert cs.oracle(second) is oracle  # loaded once, with its own score cache
    toxicity, ok = oracle.score(["the cat", "a cat"])
    assert toxicity.tolist() == [1.0, 0.0] and ok.all()
    assert (tmp_path / "oracle_cache_no_the.sqlite").exists()
    clash = {**LEXICON, "name": "default"}
    with pytest.raises(ValueError, match="main oracle's label key"):
        Constraints(_config(tmp_path, constraints=[clash]), tmp_path)


def test_labels_use_the_constraint_label_transform(tmp_path):
    from jaxdetox.pipeline.constraints import Constraints

    hard = {**LEXICON, "oracle": {**LEXICON["oracle"], "label": {"threshold": 0.5}}}
    cs = Constraints(_config(tmp_path, constraints=[hard]), tmp_path)
    batch = {
        "toxicity_b": np.array([0.2, 0.9, 0.4], np.float32),
        "ok_b": np.array([True, True, False]),
        "valid_b": np.array([True, True, True]),
    }
    soft, thresholded = cs.labels(batch), cs.labels(batch, cs[1])
    assert soft["label_mask_b"].tolist() == thresholded["label_mask_b"].tolist() == [1, 1, 0]
    np.testing.assert_allclose(soft["labels_b"][:2], [0.8, 0.1], rtol=1e-6)
    assert thresholded["labels_b"][:2].tolist() == [1.0, 0.0]
    assert soft["toxicity_b"] is batch["toxicity_b"]  # the batch's own columns pass through


# ---------------------------------------------------------------------- context caches


def test_the_fluency_model_is_loaded_once_into_the_context_model_cache(monkeypatch):
    import jaxdetox.models
    from jaxdetox.pipeline.context import Memo
    from jaxdetox.pipeline.evaluation import fluency_lm

    loads = []

    def fake_load(path, **kw):
        loads.append(path)
        return SimpleNamespace(tokenizer=None if path == "bare" else object())

    monkeypatch.setattr(jaxdetox.models, "load_pretrained", fake_load)
    context = SimpleNamespace(mesh=None, models=Memo(), programs=Memo())
    exp = SimpleNamespace(context=context, config=_config_section("big"))
    assert fluency_lm(exp) is fluency_lm(exp) and loads == ["big"]
    assert not context.programs  # compiled programs and loaded models are kept apart
    with pytest.raises(ValueError, match="no tokenizer files"):
        fluency_lm(SimpleNamespace(context=context, config=_config_section("bare")))


def _config_section(fluency_model: str):
    return SimpleNamespace(
        eval=SimpleNamespace(fluency_model=fluency_model), model=SimpleNamespace(dtype="float32")
    )
