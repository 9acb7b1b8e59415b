"""The joint step as one SPMD program over two real JAX processes (gloo, 4 CPU devices each):
each process feeds its own half of the batch and the result equals a single-process run."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _jax_processes import run_jax_processes

from jaxdetox.train import joint_step
from tests._train_fixtures import batch, mesh_of, runner, training

_HOST_SCRIPT = r"""
import json, os, sys
pid, port, out_path = sys.argv[1:]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from jax.experimental import multihost_utils
from jaxdetox import sharding
from jaxdetox.train import joint_step
from tests._train_fixtures import batch, runner, training

mesh = sharding.make_mesh((4, 1, 2))  # data x fsdp x tensor over both processes
tr = training(mesh, eps=1e-3)
run = runner(joint_step, tr, mesh, donate=True)
half = lambda b: jax.tree.map(lambda x: x[4 * int(pid): 4 * int(pid) + 4], b)  # this host's rows
state, losses = tr.state, []
for seed in (10, 11, 12):
    state, metrics = run(state, half(batch(seed)))
    losses.append({k: float(v) for k, v in metrics.items()})
params = multihost_utils.process_allgather(state.lm.params, tiled=True)
nado = multihost_utils.process_allgather(state.nado.params, tiled=True)
json.dump({"metrics": losses, "lm": jax.tree.map(lambda x: np.asarray(x).tolist(), params),
           "nado": jax.tree.map(lambda x: np.asarray(x).tolist(), nado),
           "compiles": run.compile_count}, open(out_path, "w"))
"""


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    hosts = run_jax_processes(_HOST_SCRIPT, tmp_path, [])
    mesh = mesh_of((4, 1, 2))
    tr = training(mesh, eps=1e-3)
    run = runner(joint_step, tr, mesh, donate=True)
    state, ref = tr.state, []
    for seed in (10, 11, 12):
        state, metrics = run(state, batch(seed))
        ref.append({k: float(v) for k, v in metrics.items()})
    lm, nado = jax.device_get(state.lm.params), jax.device_get(state.nado.params)
    for host in hosts:
        assert host["compiles"] == 1
        for got, want in zip(host["metrics"], ref):
            for key in want:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
        for name, want in (("lm", lm), ("nado", nado)):
            got = jax.tree.leaves(host[name], is_leaf=lambda x: isinstance(x, list))
            assert len(got) == len(jax.tree.leaves(want))
            for g, w in zip(got, jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(g), w, atol=1e-5)
