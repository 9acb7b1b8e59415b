"""The run's constraints: the `oracle:` section first, then each of `constraints:` (every
one has its own NADO), their oracles with a score cache in the run directory, and the
NADO targets their label transforms make from a sample batch."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
from etils.epath import Path

from jaxdetox import fileio
from jaxdetox.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One constraint of the run: its oracle section, guidance strength and store label key
    (the first is `oracle`, the rest `constraints`; each has its own NADO)."""

    name: str
    oracle: Any  # config.OracleSection
    alpha: float
    label_name: str
    satisfied_below: float = 0.5


def oracle_label_name(name: str) -> str:
    """The sample-store label key for an oracle name (`hf:/a/b` -> `hf_a_b`)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_") or "oracle"


def constraints_of(config: RunConfig) -> tuple[Constraint, ...]:
    """Every constraint of `config`: `oracle` first (key: its label name), then
    `constraints` (ValueError when one takes the first one's name)."""
    label = oracle_label_name(config.oracle.name)
    first = Constraint(label, config.oracle, config.finetune.alpha, label)
    rest = [
        Constraint(c.name, c.oracle, c.alpha, c.name, c.satisfied_below) for c in config.constraints
    ]
    if any(c.name == first.name for c in rest):
        raise ValueError(
            f"constraints: name {first.name!r} is the main oracle's label key; rename it"
        )
    return (first, *rest)


def cache_file(root: Path, constraint: Constraint, first: bool) -> Path:
    """The local sqlite score cache of a constraint's oracle, for a run in `root` (a
    `gs://` run keeps it under ~/.cache/jaxdetox)."""
    name = "oracle_cache.sqlite" if first else f"oracle_cache_{constraint.name}.sqlite"
    return fileio.local_file(root / name)


class Constraints(Sequence[Constraint]):
    """The constraints of one run (a sequence, the first being `oracle`), their oracles
    (loaded once each) and their NADO labels."""

    def __init__(self, config: RunConfig, root: Path) -> None:
        """The constraints of `config`, with score caches in the run directory `root`."""
        self._items = constraints_of(config)
        self._root = root
        self._oracles: dict[str, Any] = {}

    @overload
    def __getitem__(self, index: int) -> Constraint: ...
    @overload
    def __getitem__(self, index: slice) -> list[Constraint]: ...
    def __getitem__(self, index: int | slice) -> Constraint | list[Constraint]:
        """The constraint at `index` (0: the `oracle:` section); a slice gives a list."""
        if isinstance(index, slice):
            return list(self._items[index])
        return self._items[index]

    def __len__(self) -> int:
        """How many constraints (1 + len(config.constraints))."""
        return len(self._items)

    def __iter__(self) -> Iterator[Constraint]:
        """The constraints in order, the first being `oracle:`."""
        return iter(self._items)

    @property
    def label_name(self) -> str:
        """The sample-store label key of the configured oracle (the first constraint)."""
        return self._items[0].label_name

    def oracle(self, constraint: Constraint | None = None) -> Any:
        """A constraint's oracle (default: the first's, `oracle:`), with its own score cache;
        loaded when first asked for."""
        from jaxdetox import oracles

        c = constraint or self._items[0]
        if c.name not in self._oracles:
            cache = cache_file(self._root, c, first=c.name == self._items[0].name)
            self._oracles[c.name] = oracles.load(c.oracle.name, cache=cache, **c.oracle.args)
        return self._oracles[c.name]

    def labels(
        self, batch: dict[str, np.ndarray], constraint: Constraint | None = None
    ) -> dict[str, np.ndarray]:
        """NADO targets for a sample batch: `labels_b` and `label_mask_b` (host side), with
        the label transform of `constraint` (default: the first)."""
        from jaxdetox.oracles import make_labels

        lab = (constraint or self._items[0]).oracle.label
        ok = batch["ok_b"] & batch["valid_b"]
        labels, mask = make_labels(batch["toxicity_b"], ok, tau=lab.tau, threshold=lab.threshold)
        return {
            **batch,
            "labels_b": labels.astype(np.float32),
            "label_mask_b": mask.astype(np.float32),
        }
