"""The defects of the NADO path found in review (issue 22, item 3), each pinned by a test:
planned steps that disagree with the sample stream, consistency options the config cannot
reach or that crash, the reference LLM of the NADO stage, and the importance weights."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from jaxdetox.data.store_batches import SampleArrays, host_batches
from jaxdetox.pipeline.training import StreamEnded, Streams, stage_steps


def sample_table(
    prompt_ids: list[int],
    *,
    model: list[float] | None = None,
    sampling: list[float] | None = None,
    base: list[float | None] | None = None,
    ok: list[bool] | None = None,
) -> pa.Table:
    """A sample-store table, one row per entry of `prompt_ids` (two completion tokens each);
    `model` / `sampling` / `base`: each row's *sequence* log-prob, split over its tokens."""
    n = len(prompt_ids)
    index = [sum(p == q for q in prompt_ids[:i]) for i, p in enumerate(prompt_ids)]

    def per_token(values: list | None) -> list:
        if values is None:
            return [[0.0, 0.0]] * n
        return [None if v is None else [0.25 * v, 0.75 * v] for v in values]

    columns = {
        "prompt_id": pa.array(prompt_ids, pa.int64()),
        "sample_index": pa.array(index, pa.int32()),
        "prompt_tokens": pa.array([[1, 2 + i % 5] for i in range(n)], pa.list_(pa.int32())),
        "completion_tokens": pa.array([[3, 4 + i % 7] for i in range(n)], pa.list_(pa.int32())),
        "sampling_logprobs": pa.array(per_token(sampling), pa.list_(pa.float32())),
        "model_logprobs": pa.array(per_token(model), pa.list_(pa.float32())),
        "base_logprobs": pa.array(
            per_token(base) if base is not None else [None] * n, pa.list_(pa.float32())
        ),
    }
    if ok is not None:
        columns["ok"] = pa.array(ok, pa.bool_())
        columns["toxicity"] = pa.array(np.linspace(0, 1, n), pa.float32())
    return pa.table(columns)


# ----------------------------------------------------------------------------- planned steps


def _stream_batches(arrays, batch_size, epochs, host, hosts, **kw):
    return list(
        host_batches(
            arrays, batch_size // hosts, seed=5, num_epochs=epochs, process_index=host,
            process_count=hosts, **kw,
        )
    )  # fmt: skip


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 45])
def test_planned_steps_equal_the_batches_every_host_streams(rows):
    # 45 rows, batch 16, 10 epochs: 30 planned steps, 29 batches in the old stream (the
    # `train_nado.epochs: 10` crash); every host must stream exactly the planned count.
    arrays = SampleArrays(sample_table(list(range(rows))), None, None, 8)
    for epochs, batch, hosts in itertools.product((1, 2, 3, 10), (1, 4, 6, 16), (1, 2, 4)):
        if batch % hosts:
            continue
        planned = stage_steps(rows, batch, epochs, None, process_count=hosts)
        seen = []
        for host in range(hosts):
            got = _stream_batches(arrays, batch, epochs, host, hosts)
            assert len(got) == planned, (rows, epochs, batch, hosts, host)
            per_epoch = planned // epochs
            for e in range(epochs):  # every epoch is whole: each of the host's rows once
                epoch = got[e * per_epoch : (e + 1) * per_epoch]
                keys = [int(k) for b in epoch for k in b["prompt_ids_b"][b["valid_b"]]]
                assert len(keys) == len(set(keys))
                if e == 0:
                    seen += keys
        assert sorted(seen) == list(range(rows))  # the hosts' shares cover every row once
        capped = stage_steps(rows, batch, epochs, 3, process_count=hosts)
        assert capped == min(3, planned)


def test_drop_remainder_drops_each_epochs_short_batch():
    arrays = SampleArrays(sample_table(list(range(10))), None, None, 8)
    got = _stream_batches(arrays, 4, 3, 0, 1, drop_remainder=True)
    assert len(got) == 3 * 2 and all(b["valid_b"].all() for b in got)


def test_planned_steps_reject_a_batch_the_hosts_cannot_split():
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the 4 hosts"):
        stage_steps(10, 6, 1, None, process_count=4)


def test_a_stream_that_ends_early_names_the_stage():
    streams = Streams({"samples": iter([{"x": 1}, {"x": 2}])}, lambda b: b)
    assert streams.next_step("iteration 2 train_nado", 0, 3) == {"samples": {"x": 1}}
    streams.next_step("iteration 2 train_nado", 1, 3)
    with pytest.raises(StreamEnded, match=r"iteration 2 train_nado: .* after 2 of its 3 planned"):
        streams.next_step("iteration 2 train_nado", 2, 3)


# ----------------------------------------------------------------------------- consistency


@pytest.fixture(scope="module")
def tiny_training():
    from tests._train_fixtures import mesh_of, training

    mesh = mesh_of((1, 1, 1))
    # The shared variant: its features are the reference's hidden states (and it compiles
    # in half the time of a separate body).
    return mesh, training(mesh, variant="shared")


KIND_CASES = [("kl", False), ("kl", True), ("squared", False), ("ratio", False)]


def test_every_consistency_kind_the_config_accepts_is_known_to_the_loss():
    from jaxdetox import losses
    from jaxdetox.config import TrainNadoSection

    accepted = TrainNadoSection.model_fields["consistency"].annotation
    assert set(accepted.__args__[0].__args__) == set(losses.CONSISTENCY_KINDS)
    assert {k for k, _ in KIND_CASES} == set(losses.CONSISTENCY_KINDS)
    with pytest.raises(ValueError, match="'kl' with consistency_weight 0 does nothing"):
        TrainNadoSection(consistency="kl")
    with pytest.raises(ValueError, match="consistency_weight 0.5 needs train_nado.consistency"):
        TrainNadoSection(consistency_weight=0.5)
    with pytest.raises(ValueError, match="consistency_reverse needs train_nado.consistency: kl"):
        TrainNadoSection(consistency="ratio", consistency_weight=1.0, consistency_reverse=True)


@pytest.mark.slow
def test_each_consistency_kind_runs_in_a_nado_step_and_matches_the_naive_loss(tiny_training):
    import jax
    import jax.numpy as jnp

    from jaxdetox.config import TrainNadoSection
    from jaxdetox.losses import reference
    from jaxdetox.pipeline.recipe import nado_step_config
    from jaxdetox.train import nado_step
    from jaxdetox.train import steps as steps_lib
    from tests._train_fixtures import batch, runner

    mesh, tr = tiny_training
    b = {"samples": batch(11)["samples"]}
    s = jax.tree.map(jnp.asarray, b["samples"])
    teacher = steps_lib.teacher_features(tr.models, tr.state.ref_params, tr.state.nado.params, s)
    w_b = s["label_mask_b"]
    mask_bt = s["loss_mask_bt"] * (w_b > 0)[:, None]
    got = {}
    for kind, reverse in KIND_CASES:
        section = TrainNadoSection(
            consistency=kind, consistency_weight=0.5, consistency_reverse=reverse
        )
        config = nado_step_config(section)
        _, metrics = runner(nado_step, tr, mesh, config)(tr.state, b)
        want = reference.nado_losses_naive(
            teacher.h_nado, teacher.nado_head, teacher.h_ref, teacher.ref_head,
            s["targets_bt"], s["labels_b"], mask_bt, consistency=kind, reverse=reverse,
        )  # fmt: skip
        expected = float(jnp.sum(want.consistency_bt * w_b[:, None] * mask_bt) / mask_bt.sum())
        got[kind, reverse] = float(metrics["nado/consistency"])
        assert got[kind, reverse] > 0, (kind, reverse)
        np.testing.assert_allclose(got[kind, reverse], expected, rtol=1e-4, err_msg=kind)
        bce = float(jnp.sum(want.bce_bt * w_b[:, None]) / mask_bt.sum())
        np.testing.assert_allclose(float(metrics["nado/loss"]), bce + 0.5 * expected, rtol=1e-5)
    assert got["kl", True] != pytest.approx(got["kl", False])  # the direction reaches the loss


# ----------------------------------------------------------------------------- importance weights


def _importance_fixture() -> SampleArrays:
    # Two prompts x 3 samples, interleaved. Prompt 7: plain samples. Prompt 9: guided
    # samples (drawn from q = p ⊕ NADO; model_logprobs is log q, base_logprobs log p), one of
    # them with a failed label.
    table = sample_table(
        [7, 9, 7, 9, 7, 9],
        model=[-1.0, -2.0, -2.0, -2.0, -3.0, -2.0],
        sampling=[-1.5, -2.0, -1.0, -2.0, -2.0, -2.0],
        base=[None, -1.0, None, -3.0, None, -2.5],
        ok=[True, True, True, False, True, True],
    )
    return SampleArrays(table, None, None, 8)


def _hand_weights() -> np.ndarray:
    # Prompt 7: log p − log π = model − sampling = 0.5, −1, −1 over its 3 labelled samples.
    e7 = [np.exp(0.5), np.exp(-1.0), np.exp(-1.0)]
    w7 = [3 * x / sum(e7) for x in e7]
    # Prompt 9: log p = base: −1 − (−2) = 1 and −2.5 − (−2) = −0.5 over its 2 labelled ones.
    e9 = [np.exp(1.0), np.exp(-0.5)]
    w9 = [2 * x / sum(e9) for x in e9]
    return np.array([w7[0], w9[0], w7[1], 0.0, w7[2], w9[1]])


def test_importance_weights_are_normalised_per_prompt_against_the_drawing_llm():
    arrays = _importance_fixture()
    want = _hand_weights()
    np.testing.assert_allclose(arrays.importance_weights, want, rtol=1e-6)
    # Carried per row: the same weight whichever batch the row lands in.
    for rows in ([0, 1], [5, 3, 2], [4]):
        b = arrays.batch(np.array(rows), 4)
        np.testing.assert_allclose(b["importance_weight_b"][: len(rows)], want[rows], rtol=1e-6)
        assert not b["importance_weight_b"][len(rows) :].any()  # padding rows weigh nothing


def test_a_nado_step_weighs_samples_by_the_per_prompt_weights():
    import jax.numpy as jnp

    from jaxdetox.train import StepConfig
    from jaxdetox.train import steps as steps_lib

    arrays = _importance_fixture()
    b = arrays.batch(np.array([3, 0, 5, 2]), 4)
    stream = {**b, "label_mask_b": b["ok_b"].astype(np.float32)}
    stream = {k: jnp.asarray(v) for k, v in stream.items() if k in steps_lib.STEP_KEYS}
    got = steps_lib.nado_weights(stream, StepConfig(importance_weights=True))
    np.testing.assert_allclose(np.asarray(got), _hand_weights()[[3, 0, 5, 2]], rtol=1e-6)
    plain = steps_lib.nado_weights(stream, StepConfig())
    np.testing.assert_array_equal(np.asarray(plain), [0.0, 1.0, 1.0, 1.0])
