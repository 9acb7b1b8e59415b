"""Sharded train steps equal the 1-device step; checkpoints restore onto another mesh."""

import jax
import numpy as np
import pytest

from jaxdetox.train import Checkpointer, CheckpointError, joint_step
from jaxdetox.train.state import abstract_like
from tests._train_fixtures import batch, max_diff, mesh_of, runner, training

MESHES = [(8, 1, 1), (1, 4, 2), (2, 2, 2)]
EPS = 1e-3  # see tests._train_fixtures.training


@pytest.fixture(scope="module")
def reference():
    """Two joint steps on one device: (state after 1, metrics 1, state after 2, metrics 2)."""
    mesh = mesh_of((1, 1, 1))
    tr = training(mesh, eps=EPS)
    run = runner(joint_step, tr, mesh, donate=True)
    s1, m1 = run(tr.state, batch(10))
    s1 = jax.device_get(s1)
    s2, m2 = run(jax.device_put(s1, tr.shardings), batch(11))
    return s1, jax.device_get(m1), jax.device_get(s2), jax.device_get(m2)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES[:2])
def test_sharded_joint_step_equals_one_device(shape, reference):
    mesh = mesh_of(shape)
    tr = training(mesh, eps=EPS)
    # The state really is sharded the way the rules table says.
    wq = tr.state.lm.params["layers"]["attn"]["wq"]
    assert wq.sharding.mesh.shape == mesh.shape
    assert len({d for d in wq.sharding.device_set}) == mesh.size
    run = runner(joint_step, tr, mesh, donate=True)
    s1, m1 = run(tr.state, batch(10))
    s2, m2 = run(s1, batch(11))
    assert run.compile_count == 1  # the second step reuses the executable
    ref1, ref_m1, ref2, ref_m2 = reference
    assert max_diff(s2, ref2) < 1e-5
    for key in ref_m2:
        np.testing.assert_allclose(float(m2[key]), float(ref_m2[key]), rtol=1e-5, atol=1e-6)
    for key in ref_m1:
        np.testing.assert_allclose(float(m1[key]), float(ref_m1[key]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path, reference):
    ref1, _, _, ref_m2 = reference
    save_mesh, load_mesh = mesh_of(MESHES[0]), mesh_of(MESHES[2])
    saved = training(save_mesh, eps=EPS)
    state = jax.device_put(ref1, saved.shardings)
    with Checkpointer(tmp_path / "ckpt", async_save=True) as ckpt:
        ckpt.save(1, state, data_state={"pos": 3}, meta={"step": 1})
    target = training(load_mesh, eps=EPS)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored, data, meta = ckpt.restore(abstract_like(target.state, target.shardings))
    assert data == {"pos": 3} and meta == {"step": 1}
    leaf = restored.lm.params["layers"]["mlp"]["up"]
    assert leaf.sharding == target.shardings.lm.params["layers"]["mlp"]["up"]
    assert max_diff(restored, ref1) == 0.0
    _, m2 = runner(joint_step, target, load_mesh)(restored, batch(11))
    np.testing.assert_allclose(float(m2["lm/loss"]), float(ref_m2["lm/loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["nado/loss"]), float(ref_m2["nado/loss"]), rtol=1e-5)


def test_restore_names_what_differs(tmp_path):
    mesh = mesh_of((1, 1, 1))
    tr = training(mesh)
    with Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
        ckpt.save(5, tr.state.nado)
    other = jax.tree.map(lambda x: x, tr.state.nado)
    other = other.replace(params={**other.params, "extra": np.zeros(3, np.float32)})
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        with pytest.raises(CheckpointError, match=r"missing in checkpoint: params\.extra"):
            ckpt.restore(abstract_like(other))
        head = {**other.params["head"], "b": np.zeros(65, np.float32)}
        wrong = other.replace(params={**tr.state.nado.params, "head": head})
        with pytest.raises(
            CheckpointError,
            match=r"params\.head\.b: checkpoint has \(64,\) float32, expected \(65,\)",
        ):
            ckpt.restore(abstract_like(wrong))
        with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
            ckpt.restore(abstract_like(tr.state.nado), step=7)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(tmp_path / "empty").restore(abstract_like(tr.state.nado))
