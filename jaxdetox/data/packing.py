"""Padding and packing of token sequences into fixed-shape model batches.

Batch conventions (docs/interfaces.md, "Data"): `segment_ids_bt` is 0 on padding and 1..n for
the documents of a row; `positions_bt` restart at 0 for every document; `targets_bt[b, t]` is
the token that the logits at `[b, t]` predict (the next token of the same document, 0 where
there is none) and `loss_mask_bt[b, t]` weights that prediction. Losses therefore never shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import grain


def next_token_targets(
    tokens_bt: np.ndarray, segment_ids_bt: np.ndarray, token_mask_bt: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(targets_bt, loss_mask_bt): next token within the same segment, aligned with the logits.

    `token_mask_bt` (optional, same shape) says which tokens are training targets (e.g. 0 on
    prompt tokens); the mask of the prediction at t is the mask of token t + 1.
    """
    tokens_bt = np.asarray(tokens_bt)
    segment_ids_bt = np.asarray(segment_ids_bt)
    same_doc_bt = np.zeros(tokens_bt.shape, bool)
    # Position t predicts t + 1 only if both belong to the same (non-padding) document.
    same_doc_bt[:, :-1] = (segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1]) & (
        segment_ids_bt[:, 1:] != 0
    )
    targets_bt = np.zeros_like(tokens_bt)
    targets_bt[:, :-1] = np.where(same_doc_bt[:, :-1], tokens_bt[:, 1:], 0)
    loss_mask_bt = same_doc_bt.copy()
    if token_mask_bt is not None:
        loss_mask_bt[:, :-1] &= np.asarray(token_mask_bt)[:, 1:].astype(bool)
    return targets_bt, loss_mask_bt.astype(np.float32)


def positions_from_segments(segment_ids_bt: np.ndarray) -> np.ndarray:
    """Per-document running positions (0 at each document's first token, 0 on padding)."""
    segment_ids_bt = np.asarray(segment_ids_bt)
    batch, length = segment_ids_bt.shape
    index_bt = np.broadcast_to(np.arange(length), (batch, length))
    starts_bt = np.ones(segment_ids_bt.shape, bool)
    starts_bt[:, 1:] = segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]
    # Index of the most recent document start at or before t (cumulative max of start indices).
    last_start_bt = np.maximum.accumulate(np.where(starts_bt, index_bt, 0), axis=1)
    return np.where(segment_ids_bt != 0, index_bt - last_start_bt, 0).astype(np.int32)


def left_pad(
    sequences: Sequence[np.ndarray], length: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_bt, segment_ids_bt) with each sequence right-aligned in a row of `length`."""
    tokens_bt = np.full((len(sequences), length), pad_id, np.int32)
    segment_ids_bt = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        n = len(seq)
        if n > length:
            raise ValueError(f"sequence {row} has {n} tokens, more than the padded length {length}")
        if n:
            tokens_bt[row, length - n :] = seq
            segment_ids_bt[row, length - n :] = 1
    return tokens_bt, segment_ids_bt


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is ≥ n (and ≥ multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def finalize_packed_batch(
    packed: dict[str, np.ndarray], batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """Turn grain concat-then-split output (batched) into the model batch of this module.

    Input keys: `tokens`, `tokens_segment_ids`, `tokens_positions`, `loss_mask` (per-token
    target mask of the source documents, packed alongside the tokens). A short last batch is
    filled up to `batch_size` rows of padding (segment id 0 everywhere, no loss).
    """
    tokens_bt = packed["tokens"].astype(np.int32)
    segment_ids_bt = packed["tokens_segment_ids"].astype(np.int32)
    positions_bt = packed["tokens_positions"].astype(np.int32)
    targets_bt, loss_mask_bt = next_token_targets(tokens_bt, segment_ids_bt, packed["loss_mask"])
    fill = 0 if batch_size is None else batch_size - len(tokens_bt)
    if fill > 0:
        pad = lambda x: np.concatenate([x, np.zeros((fill,) + x.shape[1:], x.dtype)])  # noqa: E731
        tokens_bt, segment_ids_bt, positions_bt, targets_bt, loss_mask_bt = map(
            pad, (tokens_bt, segment_ids_bt, positions_bt, targets_bt, loss_mask_bt)
        )
    return {
        "tokens_bt": tokens_bt,
        "segment_ids_bt": segment_ids_bt,
        "positions_bt": positions_bt,
        "targets_bt": targets_bt,
        "loss_mask_bt": loss_mask_bt,
    }


def pack_documents(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """Concat-then-split packing of a grain IterDataset of `{tokens, loss_mask}` documents.

    No token is dropped: a document longer than the room left in a row continues in the next
    row (as a new segment whose positions restart at 0, so its first token there gets no loss).
    """
    from grain.experimental import ConcatThenSplitIterDataset

    return ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len, "loss_mask": seq_len})
