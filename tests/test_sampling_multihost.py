"""Sampling as one SPMD program over two real JAX processes (4 CPU devices each, gloo)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _jax_processes import run_jax_processes
from test_models_helpers import make_hf_model

from jaxdetox.lm import lm_sampler
from jaxdetox.models import load_pretrained
from jaxdetox.sampling import SamplingConfig, sample_prompts

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46], [7, 8, 90], [11], [3, 4, 5, 6]]
CONFIG = dict(max_new_tokens=5, temperature=0.9, top_k=20, num_samples=2, seed=3)

_HOST_SCRIPT = r"""
import json, os, sys
pid, port, out_path, model_dir, prompts, config = sys.argv[1:]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from jaxdetox import sharding
from jaxdetox.models import load_pretrained
from jaxdetox.lm import lm_sampler
from jaxdetox.sampling import SamplingConfig, sample_prompts

mesh = sharding.make_mesh((4, 1, 2))  # data x fsdp x tensor over both processes
lm = load_pretrained(model_dir, mesh=mesh, tokenizer=False)
sampler, params, _ = lm_sampler(lm)
out = sample_prompts(sampler, params, json.loads(prompts), SamplingConfig(**json.loads(config)),
                     batch_size=4, progress=False)
greedy = lm.generate(np.array([[5, 17, 33, 2]] * 4), max_new_tokens=4, eos_token_ids=())
json.dump({"tokens": out.tokens.tolist(), "logprobs": out.logprobs.tolist(),
           "lengths": out.lengths.tolist(), "greedy": np.asarray(greedy).tolist()},
          open(out_path, "w"))
"""


@pytest.mark.slow
def test_two_processes_sample_like_one(tmp_path):
    """Every host gets the full, input-ordered output (`sample_prompts`, `lm.generate`),
    equal to a single-process run."""
    model = make_hf_model("gpt2", seed=4)
    model.save_pretrained(str(tmp_path / "model"))
    args = [str(tmp_path / "model"), json.dumps(PROMPTS), json.dumps(CONFIG)]
    hosts = run_jax_processes(_HOST_SCRIPT, tmp_path, args)

    lm = load_pretrained(str(tmp_path / "model"), tokenizer=False)
    sampler, params, _ = lm_sampler(lm)
    ref = sample_prompts(
        sampler, params, PROMPTS, SamplingConfig(**CONFIG), batch_size=4, progress=False
    )
    greedy = lm.generate(np.array([[5, 17, 33, 2]] * 4), max_new_tokens=4, eos_token_ids=())
    for host in hosts:
        np.testing.assert_array_equal(host["greedy"], greedy)
        np.testing.assert_array_equal(host["tokens"], ref.tokens)
        np.testing.assert_array_equal(host["lengths"], ref.lengths)
        np.testing.assert_allclose(host["logprobs"], ref.logprobs, atol=1e-5)
