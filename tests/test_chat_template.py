"""Chat-templated prompts: the template around the user turn, the end-of-turn stop token, and
training masks that cover exactly the assistant's tokens."""

import numpy as np
import pytest

from jaxdetox.data import SampleStore
from jaxdetox.data.prompt_sets import PromptSet
from jaxdetox.data.prompts import chat_template_parts, tokenize_prompts
from jaxdetox.train import steps
from tests._tokenizer import make_chat_tokenizer, make_tokenizer

USER = ["Tell me about the river", "the old mill"]
REPLY = ["The bridge over the river is old.", "Thanks!"]


def prompt_set(texts):
    return PromptSet(
        ids=np.arange(len(texts), dtype=np.int64),
        keys=tuple(texts),
        texts=tuple(texts),
        toxicity=np.full(len(texts), np.nan, np.float32),
        challenging=np.zeros(len(texts), bool),
        meta={},
        source="test",
    )


def render(tok, messages, generation_prompt=False):
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return tok(text, add_special_tokens=False)["input_ids"]


def test_template_parts_and_prompts_equal_the_rendered_template():
    tok = make_chat_tokenizer()
    parts = chat_template_parts(tok)
    assert tok.convert_ids_to_tokens(list(parts.stop)) == ["<|end|>"]
    prompts = tokenize_prompts(prompt_set(USER), tok, max_tokens=30, chat=parts)
    for text, tokens in zip(USER, prompts.tokens):
        assert tokens.tolist() == render(tok, [{"role": "user", "content": text}], True)
    # max_tokens limits the user text only; the template tokens come on top.
    short = tokenize_prompts(prompt_set(USER), tok, max_tokens=2, chat=parts)
    assert {len(t) for t in short.tokens} == {2 + parts.overhead}
    system = chat_template_parts(tok, system="Be kind.")
    assert tok.decode(list(system.prefix)).startswith("<s><|system|>\nBe kind.<|end|>")
    with pytest.raises(ValueError, match="no chat template"):
        chat_template_parts(make_tokenizer())


def test_chat_batch_masks_cover_exactly_the_assistant_tokens(tmp_path):
    tok = make_chat_tokenizer()
    parts = chat_template_parts(tok)
    prompts = tokenize_prompts(prompt_set(USER), tok, max_tokens=30, chat=parts)
    completions = []
    for user, reply, prompt in zip(USER, REPLY, prompts.tokens):
        full = render(
            tok, [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        )
        assert full[: len(prompt)] == prompt.tolist()
        # The assistant's turn: its text and the end-of-turn token (not the template's "\n").
        turn = full[len(prompt) :]
        completions.append(turn[: turn.index(parts.stop[0]) + 1])
    width = max(map(len, completions))
    store = SampleStore(tmp_path / "store")
    store.write_samples(
        1, "chunk",
        prompt_ids=prompts.ids, sample_index=np.zeros(2, np.int32),
        prompt_tokens=list(prompts.tokens),
        completion_tokens=np.array([c + [0] * (width - len(c)) for c in completions], np.int32),
        completion_lengths=np.array([len(c) for c in completions], np.int32),
        prompt_texts=list(USER), completion_texts=list(REPLY),
        sampling_logprobs=np.zeros((2, width), np.float32),
        model_logprobs=np.zeros((2, width), np.float32),
    )  # fmt: skip
    (batch,) = store.batches(1, 2, shuffle=False, num_epochs=1, prompt_len=32, completion_len=24)
    # The weights of both the NLL and the KL term (lm_sums) are the sequence-weighted mask.
    weights = np.asarray(steps._sequence_weights({k: batch[k] for k in ("loss_mask_bt",)}))
    for b, completion in enumerate(completions):
        (where,) = np.nonzero(weights[b])
        assert batch["targets_bt"][b, where].tolist() == completion
        assert tok.decode(completion[:-1]) == REPLY[b]
    denominators = steps.lm_denominators(
        {"samples": {"loss_mask_bt": batch["loss_mask_bt"]}}, steps.StepConfig()
    )
    assert float(denominators["samples"]) == sum(map(len, completions))


def test_experiment_uses_the_template_its_stop_token_and_evaluates_both_forms(tmp_path):
    from jaxdetox.config import config_from_dict
    from jaxdetox.pipeline.evaluation import prompt_modes
    from jaxdetox.pipeline.experiment import Experiment
    from jaxdetox.pipeline.rundir import RunDir
    from tests._tiny import tiny_chat_llama
    from tests._tiny_run import tiny_config

    tiny_chat_llama().save_pretrained(tmp_path / "model")
    raw = config_from_dict(tiny_config(tmp_path / "model"))
    chat = config_from_dict(tiny_config(tmp_path / "model", prompts={"chat_template": True}))
    exp_raw, exp = Experiment(raw, RunDir(tmp_path / "a")), Experiment(chat, RunDir(tmp_path / "b"))
    parts = exp.prompts.chat
    end = parts.stop[0]
    assert (
        exp_raw.prompts.chat is None and end not in exp_raw.prompts.sampling_config(1).eos_token_ids
    )
    assert end in exp.prompts.sampling_config(1).eos_token_ids
    prompts = exp.prompts.train_prompts(0)
    assert all(t[: len(parts.prefix)].tolist() == list(parts.prefix) for t in prompts.tokens)
    assert all(t[-len(parts.suffix) :].tolist() == list(parts.suffix) for t in prompts.tokens)
    assert exp.prompts.prompt_len >= max(map(len, prompts.tokens))
    assert exp.prompts.prompt_len % 8 == 0
    # An instruct tokenizer: both forms are evaluated, the configured one first.
    assert prompt_modes(exp) == ["chat", "raw"] and prompt_modes(exp_raw) == ["raw", "chat"]
    assert end in exp_raw.prompts.sampling_config(0, chat=True).eos_token_ids
    assert (
        exp_raw.prompts.eval_prompts(chat=True).tokens[0].tolist()
        == exp.prompts.eval_prompts().tokens[0].tolist()
    )
