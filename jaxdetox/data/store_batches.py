"""Sample-store iterations as fixed-shape model batches for the NADO and LM steps.

`SampleArrays` holds an iteration's samples (and labels) as flat numpy columns and builds one
padded batch from a list of rows; `host_batches` cuts this host's share of the rows into a
grain dataset of such batches. Batch conventions: docs/interfaces.md (Data) and `packing.py`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from jaxdetox.data.errors import DataError
from jaxdetox.data.packing import next_token_targets, positions_from_segments, round_up

if TYPE_CHECKING:
    import grain

LOGPROB_COLUMNS = ("sampling_logprobs", "model_logprobs", "base_logprobs")


class SampleArrays:
    """An iteration's samples as flat columns; `batch(rows)` builds one padded batch.

    Row layout: prompt left-padded to `prompt_len`, completion right-padded to
    `completion_len`. `targets_bt[t]` is the token after t; `loss_mask_bt` is 1 where that
    target is a completion token (the positions the NADO BCE, the KL on samples and an SFT on
    samples use); `*_logprobs_bt[t]` is the stored log-prob of `targets_bt[t]`;
    `importance_weight_b` is the row's importance weight for the NADO, self-normalised over
    its prompt's labelled samples of the whole iteration (`per_prompt_importance_weights`
    of log p = the drawing LLM's: `base_logprobs` on guided rows, else `model_logprobs`,
    against log π = `sampling_logprobs`).
    """

    def __init__(
        self,
        table: pa.Table,
        prompt_len: int | None,
        completion_len: int | None,
        pad_multiple: int,
    ):
        self.num_rows = table.num_rows

        def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
            col = table[name].combine_chunks()
            lengths = pa.compute.fill_null(pa.compute.list_value_length(col), 0).to_numpy()
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            values = pa.compute.list_flatten(col).to_numpy(zero_copy_only=False)
            return values, offsets

        self._prompt, self._prompt_off = flat("prompt_tokens")
        self._completion, self._completion_off = flat("completion_tokens")
        self.prompt_lengths = np.diff(self._prompt_off).astype(np.int32)
        self.completion_lengths = np.diff(self._completion_off).astype(np.int32)
        self._logprobs = {}
        for name in LOGPROB_COLUMNS:
            values, offsets = flat(name)
            lengths = np.diff(offsets)
            bad = np.flatnonzero((lengths != 0) & (lengths != self.completion_lengths))
            if len(bad):
                raise DataError(f"{name} of sample row {bad[0]} does not match its completion")
            self._logprobs[name] = (values, offsets)
        longest_p = int(self.prompt_lengths.max())
        longest_c = int(self.completion_lengths.max())
        self.prompt_len = prompt_len or round_up(longest_p, pad_multiple)
        self.completion_len = completion_len or round_up(longest_c, pad_multiple)
        if longest_p > self.prompt_len or longest_c > self.completion_len:
            raise ValueError(
                f"stored prompts/completions reach {longest_p}/{longest_c} tokens, more than "
                f"prompt_len={self.prompt_len} / completion_len={self.completion_len}"
            )
        self.prompt_ids = table["prompt_id"].to_numpy()
        self.sample_index = table["sample_index"].to_numpy()
        has_labels = "ok" in table.column_names
        self.ok = table["ok"].to_numpy(zero_copy_only=False) if has_labels else None
        self.toxicity = (
            table["toxicity"].to_numpy(zero_copy_only=False).astype(np.float32)
            if has_labels
            else None
        )
        labelled = None if self.ok is None else self.ok & np.isfinite(self.toxicity)
        self.importance_weights = per_prompt_importance_weights(
            self.prompt_ids,
            self.sequence_logprob("sampling_logprobs"),
            np.where(
                self.has_logprobs("base_logprobs"),
                self.sequence_logprob("base_logprobs"),
                self.sequence_logprob("model_logprobs"),
            ),
            labelled,
        )

    def has_logprobs(self, name: str) -> np.ndarray:
        """Per row: whether log-prob column `name` is stored (`base_logprobs`: guided rows)."""
        return np.diff(self._logprobs[name][1]) > 0

    def sequence_logprob(self, name: str) -> np.ndarray:
        """Per row: the sum of log-prob column `name` over the completion (0 if not stored)."""
        values, offsets = self._logprobs[name]
        sums = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
        return (sums[offsets[1:]] - sums[offsets[:-1]]).astype(np.float32)

    def batch(self, rows: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """The padded batch of sample `rows` (row index -1 = none), filled up to `batch_size`;
        missing rows are all padding (`valid_b=False`, segment id 0, prompt id -1)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
        rows = np.concatenate([rows, np.full(batch_size - len(rows), -1, np.int64)])
        valid_b = rows >= 0
        safe_b = np.where(valid_b, rows, 0)
        P, C = self.prompt_len, self.completion_len
        T = P + C
        tokens_bt = np.zeros((batch_size, T), np.int32)
        segment_ids_bt = np.zeros((batch_size, T), np.int32)
        completion_bt = np.zeros((batch_size, T), bool)
        logprobs = {name: np.zeros((batch_size, T), np.float32) for name in self._logprobs}
        for b in np.flatnonzero(valid_b):
            r = rows[b]
            p0, p1 = self._prompt_off[r], self._prompt_off[r + 1]
            c0, c1 = self._completion_off[r], self._completion_off[r + 1]
            lp, lc = p1 - p0, c1 - c0
            tokens_bt[b, P - lp : P] = self._prompt[p0:p1]
            tokens_bt[b, P : P + lc] = self._completion[c0:c1]
            segment_ids_bt[b, P - lp : P + lc] = 1
            completion_bt[b, P : P + lc] = True
            for name, (values, offsets) in self._logprobs.items():
                v0, v1 = offsets[r], offsets[r + 1]
                if v1 > v0:  # the log-prob of completion token j sits where j is predicted
                    logprobs[name][b, P - 1 : P - 1 + lc] = values[v0:v1]
        targets_bt, loss_mask_bt = next_token_targets(tokens_bt, segment_ids_bt, completion_bt)

        def take(column: np.ndarray, missing: Any, dtype: Any) -> np.ndarray:
            return np.where(valid_b, column[safe_b], missing).astype(dtype)

        out = {
            "tokens_bt": tokens_bt,
            "segment_ids_bt": segment_ids_bt,
            "positions_bt": positions_from_segments(segment_ids_bt),
            "targets_bt": targets_bt,
            "loss_mask_bt": loss_mask_bt,
            **{f"{name}_bt": value for name, value in logprobs.items()},
            # Sequence log-probs (importance weights, docs/method.md): sums over the completion.
            **{f"{name[:-1]}_b": value.sum(axis=1) for name, value in logprobs.items()},
            "importance_weight_b": take(self.importance_weights, 0.0, np.float32),
            "prompt_ids_b": take(self.prompt_ids, -1, np.int64),
            "sample_index_b": take(self.sample_index, -1, np.int32),
            "prompt_lengths_b": take(self.prompt_lengths, 0, np.int32),
            "completion_lengths_b": take(self.completion_lengths, 0, np.int32),
            "valid_b": valid_b,
        }
        if self.ok is not None:
            ok_b = take(self.ok, False, bool)
            out["ok_b"] = ok_b
            # Failed or missing scores are masked by ok_b; 0 keeps NaN out of the loss arithmetic.
            out["toxicity_b"] = np.where(ok_b, self.toxicity[safe_b], 0.0).astype(np.float32)
        return out


def per_prompt_importance_weights(
    prompt_ids: np.ndarray,
    log_proposal: np.ndarray,
    log_target: np.ndarray,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Per-sample weights `n_x · softmax_{i ∈ x}(log p(y_i) − log π(y_i))`, self-normalised
    over each prompt x's `n_x` unmasked samples (mean 1 per prompt; masked samples get 0).

    The NADO's BCE estimates R under p from samples of π (docs/method.md, "Importance
    weights"); normalising per prompt keeps one prompt's likely samples from taking the
    weight of another prompt's. float64 on the host; float32 out.
    """
    ids = np.asarray(prompt_ids)
    log_w = np.asarray(log_target, np.float64) - np.asarray(log_proposal, np.float64)
    keep = np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)
    log_w = np.where(keep, log_w, -np.inf)
    _, group = np.unique(ids, return_inverse=True)
    top = np.full(group.max(initial=-1) + 1, -np.inf)
    np.maximum.at(top, group, log_w)
    w = np.where(keep, np.exp(log_w - np.where(np.isfinite(top), top, 0.0)[group]), 0.0)
    total = np.zeros_like(top)
    np.add.at(total, group, w)
    count = np.bincount(group, weights=keep, minlength=len(top))
    return np.where(keep, w * count[group] / np.maximum(total[group], 1e-300), 0.0).astype(
        np.float32
    )


def _batch_of_rows(
    arrays: SampleArrays, batch_size: int, rows: np.ndarray
) -> dict[str, np.ndarray]:
    # Module-level (not a lambda) so the pipeline pickles into grain worker processes.
    return arrays.batch(np.asarray(rows), batch_size)


def batches_per_epoch(
    num_rows: int, batch_size: int, *, process_count: int = 1, drop_remainder: bool = False
) -> int:
    """Batches every host's stream of `row_batches` yields per epoch of `num_rows` rows
    (`batch_size` rows per host): each host takes ⌈rows / hosts⌉ of them and batches every
    epoch on its own, the last batch short (padded) or, with `drop_remainder`, dropped."""
    if batch_size < 1 or process_count < 1:
        raise ValueError(f"batch_size {batch_size} and process_count {process_count} must be >= 1")
    per_host = -(-num_rows // process_count)
    return per_host // batch_size if drop_remainder else -(-per_host // batch_size)


class _EpochRows:
    """Row indices of batch `index` of a stream: epoch `index // per_epoch` is its own
    permutation of this host's rows (a pure function of seed and epoch, so a restored
    iterator continues exactly), cut into `per_epoch` consecutive batches."""

    def __init__(self, mine: np.ndarray, batch_size: int, per_epoch: int, seed: int,
                 shuffle: bool) -> None:  # fmt: skip
        self.mine, self.batch_size, self.per_epoch = mine, batch_size, per_epoch
        self.seed, self.shuffle = seed, shuffle
        self._last: tuple[int, np.ndarray] | None = None  # the current epoch's order

    def order(self, epoch: int) -> np.ndarray:
        """This host's rows in the order of `epoch`."""
        last = self._last
        if last is not None and last[0] == epoch:
            return last[1]
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            order = self.mine[rng.permutation(len(self.mine))]
        else:
            order = self.mine
        self._last = (epoch, order)
        return order

    def __call__(self, index: int, _: Any) -> np.ndarray:
        epoch, i = divmod(index, self.per_epoch)
        return self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]


def _subset(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    # Module-level (not a lambda) so the pipeline pickles into grain worker processes.
    return np.where(index >= 0, rows[np.maximum(index, 0)], -1)


def row_batches(
    num_rows: int,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This host's share of rows `0..num_rows-1` as a grain dataset of row-index arrays of
    at most `batch_size` (-1 = a padding row): every epoch shuffled and batched on its own,
    so the stream holds exactly `num_epochs × batches_per_epoch(...)` batches (`num_epochs`
    None: forever) — the count every training stage plans its steps by."""
    import grain

    from jaxdetox.data.corpora import host_info

    process_index, process_count = host_info(process_index, process_count)
    # Every host gets the same number of rows (-1 = a padding row) and so the same number
    # of batches: hosts that ran out early would leave the others waiting in a collective.
    per_host = -(-num_rows // process_count)
    mine = np.arange(num_rows)[process_index::process_count]
    mine = np.concatenate([mine, np.full(per_host - len(mine), -1)]).astype(np.int64)
    per_epoch = batches_per_epoch(
        num_rows, batch_size, process_count=process_count, drop_remainder=drop_remainder
    )
    batches = grain.MapDataset.range(per_epoch)
    if per_epoch:
        batches = batches.repeat(num_epochs)
    return batches.map_with_index(_EpochRows(mine, batch_size, per_epoch, seed, shuffle))


def host_batches(
    arrays: SampleArrays,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    rows: np.ndarray | None = None,
) -> grain.IterDataset:
    """Fixed-shape numpy batches of this host's share of `arrays` (a grain dataset of the
    `row_batches` stream; see `SampleStore.batches`), of every row or only of `rows`."""
    import grain

    stream = row_batches(
        arrays.num_rows if rows is None else len(rows), batch_size, seed=seed,
        shuffle=shuffle, num_epochs=num_epochs, drop_remainder=drop_remainder,
        process_index=process_index, process_count=process_count,
    )  # fmt: skip
    if rows is not None:  # positions in `rows` -> row indices (-1 stays padding)
        stream = stream.map(functools.partial(_subset, np.asarray(rows, np.int64)))
    rows = stream
    batches = rows.map(functools.partial(_batch_of_rows, arrays, batch_size))
    # A short read-ahead: grain's default (hundreds of batches) only costs memory here.
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
