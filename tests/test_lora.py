"""LoRA: zero-initialised adapters are the base model exactly; a step trains only adapters
with the base shared as the reference; merged export equals the adapted model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdetox.models import NadoConfig, build_model, init_nado, lora
from jaxdetox.train import OptimizerConfig, lm_step, make_training
from tests._train_fixtures import CONFIG, batch, max_diff, mesh_of, runner

RANK = 4
TARGETS = ("wq", "wv", "mlp/down", "wo")


def adapted(seed=0, targets=TARGETS, mesh=None):
    model = build_model(CONFIG, seed, mesh=mesh)
    return lora.add_adapters(model, lora.LoraConfig(RANK, 8.0, targets), seed=3)


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def set_params(model, params):
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def perturb(adapters, seed=1, scale=0.1):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noise)


TOKENS = jnp.array([[3, 9, 27, 17, 50, 2, 11], [5, 5, 8, 60, 1, 40, 33]], jnp.int32)


def test_zero_initialised_adapters_give_the_base_model_exactly():
    base = build_model(CONFIG, 0)
    want = base(TOKENS)[0]
    model = adapted()
    _, adapters = lora.split_adapters(params_of(model))
    shapes = jax.tree.map(lambda x: x.shape, adapters)["layers"]
    # [L, *in, r] and [L, r, *out]: wq [L, D, N, H] has in = D; wo [L, N, H, D] has out = D.
    assert shapes["attn"]["wq_lora_a"] == (2, 16, RANK)
    assert shapes["attn"]["wq_lora_b"] == (2, RANK, 2, 8)
    assert shapes["attn"]["wo_lora_a"] == (2, 2, 8, RANK)
    assert shapes["mlp"]["down_lora_b"] == (2, RANK, 16)
    assert "wk_lora_a" not in shapes["attn"] and "gate_lora_a" not in shapes["mlp"]
    assert bool(jnp.all(model(TOKENS)[0] == want))  # bit for bit
    with pytest.raises(ValueError, match="match no layer kernel"):
        adapted(targets=("nothing",))


def test_merged_export_equals_the_adapted_model(tmp_path):
    from jaxdetox.lm import load_pretrained

    model = adapted()
    base, adapters = lora.split_adapters(params_of(model))
    set_params(model, lora.combine(base, perturb(adapters)))
    logits = model(TOKENS)[0]
    assert float(jnp.max(jnp.abs(logits - build_model(CONFIG, 0)(TOKENS)[0]))) > 1e-2
    merged = lora.merged_model(model)
    assert not any("lora" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(merged)))
    np.testing.assert_allclose(merged(TOKENS)[0], logits, atol=1e-5)
    # save_pretrained merges the adapters into a plain HF checkpoint.
    from jaxdetox.models.hf import save_pretrained

    save_pretrained(model, tmp_path / "hf")
    loaded = load_pretrained(str(tmp_path / "hf"))
    np.testing.assert_allclose(loaded.model(TOKENS)[0], logits, atol=1e-5)


def test_adapters_round_trip_with_a_pointer_to_the_base(tmp_path):
    model = adapted()
    _, adapters = lora.split_adapters(params_of(model))
    adapters = perturb(adapters)
    config = lora.LoraConfig(RANK, 8.0, TARGETS)
    lora.save_adapters(tmp_path / "ad", adapters, config, base="some/base")
    back, config2, base = lora.load_adapters(tmp_path / "ad")
    assert config2 == config and base == "some/base"
    assert max_diff(back, adapters) == 0.0


def test_a_step_changes_only_the_adapters_and_shares_the_base_as_reference():
    mesh = mesh_of((2, 2, 2))
    model = adapted(mesh=mesh)
    base_params, _ = lora.split_adapters(params_of(model))
    nado = init_nado(NadoConfig.for_lm(CONFIG, "separate", num_layers=1, head_init="normal"), 1)
    opt = OptimizerConfig(learning_rate=1e-2)
    tr = make_training(model, nado, mesh, lm_optimizer=opt, nado_optimizer=None)
    state = tr.state
    assert tr.models.lora and tr.models.ref is not None
    # The state holds the base once (as the reference) and the adapters as the LM's params.
    names = [str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(state.lm.params)[0]]
    assert names and all("_lora_" in n for n in names)
    assert max_diff(state.ref_params, base_params) == 0.0
    adapter_size = sum(x.size for x in jax.tree.leaves(state.lm.params))
    assert sum(x.size for x in jax.tree.leaves(state.lm.opt_state)) <= 2 * adapter_size + 16
    run = runner(lm_step, tr, mesh)
    before = state
    for seed in range(2):
        state, metrics = run(state, batch(seed))
        assert np.isfinite(float(metrics["lm/loss"]))
    assert max_diff(state.ref_params, before.ref_params) == 0.0  # the base never moves
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.lm.params, before.lm.params
    )
    assert all(jax.tree.leaves(changed))  # every A and B moved (B at step 1, A from step 2)
    with pytest.raises(ValueError, match="reference"):
        make_training(adapted(), nado, mesh, lm_optimizer=opt, nado_optimizer=None, reference=model)


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_and_exports_merged(tmp_path):
    from safetensors.numpy import load_file

    from jaxdetox.commands.session import execute
    from jaxdetox.config import config_from_dict
    from jaxdetox.lm import load_pretrained
    from tests._tiny_run import save_tiny_model, tiny_config

    model_dir = save_tiny_model(tmp_path / "model")
    lora_cfg = {"rank": 2, "alpha": 4.0, "targets": ["wq", "wv"]}
    config = tiny_config(
        model_dir,
        finetune={
            "batch_size": 8,
            "epochs": 1,
            "lora": lora_cfg,
            "optimizer": {"learning_rate": 1e-2},
        },
        loop={"iterations": 1, "checkpoint_every": 1},
        eval={"enabled": False},
    )
    out = tmp_path / "run"
    execute(config_from_dict(config), out, progress=False)
    # The stage checkpoints and the artefact hold only adapters (+ their Adam moments).
    stage = out / "iter_001" / "finetune"
    for meta in [*stage.glob("ckpt/*/state/_METADATA"), *stage.glob("artifact/*/state/_METADATA")]:
        paths = list(json.loads(meta.read_text())["tree_metadata"])
        params = [p for p in paths if "'params'" in p or "opt_state" not in p and "step" not in p]
        assert params and all("_lora_" in p for p in params), paths
    adapters, cfg, base = lora.load_adapters(out / "final" / "adapters")
    assert base == str(model_dir) and cfg.rank == 2
    assert set(adapters["layers"]["attn"]) == {"wq_lora_a", "wq_lora_b", "wv_lora_a", "wv_lora_b"}
    assert np.any(adapters["layers"]["attn"]["wq_lora_b"] != 0)
    # final/model is the merged HF checkpoint: base + adapters.
    final = load_pretrained(str(out / "final" / "model"))
    base_lm = load_pretrained(str(model_dir))
    lora_model = lora.add_adapters(base_lm.model, cfg)
    b, _ = lora.split_adapters(params_of(lora_model))
    set_params(lora_model, lora.combine(b, adapters))
    tokens = jnp.array([[1, 40, 41, 42, 43]], jnp.int32)
    np.testing.assert_allclose(final.model(tokens)[0], lora_model(tokens)[0], atol=1e-5)
    assert "model.embed_tokens.weight" in load_file(
        str(out / "final" / "model" / "model.safetensors")
    )
