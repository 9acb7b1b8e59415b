"""Errors raised by the data pipelines; every message names the file/split/field at fault."""

from __future__ import annotations

from collections.abc import Iterable

from jaxdetox.errors import JaxdetoxError


class DataError(JaxdetoxError, ValueError):
    """Base class for bad input data (a subclass of ValueError so callers can catch either)."""


class MalformedRecordError(DataError):
    """A record that cannot be parsed (e.g. a bad JSON line); the message names file:line."""


class MissingFieldError(DataError, KeyError):
    """A record lacks a required field; the message names the field and lists the fields seen."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message (adding quotes); keep it readable.
        return str(self.args[0]) if self.args else ""


class EmptySplitError(DataError):
    """A source, split or filtered selection has no records."""


class SchemaError(DataError):
    """Stored data written with a different schema (version or columns) than this code reads."""


def missing_field(where: str, field: str, seen: Iterable[str]) -> MissingFieldError:
    """Build the error for `field` missing at `where` (e.g. 'prompts.jsonl:12')."""
    return MissingFieldError(
        f"{where}: missing field '{field}'; fields seen: {sorted(seen) or '(none)'}"
    )
