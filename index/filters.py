"""Metadata filters: parsing user input into a `Filter`, validating it, and an exact in-memory
inverted index that turns a filter into the set of chunk ids it allows.

Semantics are the `Condition` docstring's: booleans, numbers and strings never equal each other,
`1` equals `1.0`, and a list-valued metadata field matches a value it contains. `null` metadata
values are stored but never match anything. The index lives in memory only: the store rebuilds it
from LMDB at open and updates it after each committed write. Its cost is one Python set entry per
(chunk, metadata value); fine for millions of chunks, not for billions. `matches` evaluates a
filter on one document's metadata (listing and deleting by filter scan LMDB with it).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Iterable, Optional

import numpy as np

from memlm.errors import InvalidArgument
from memlm.index.types import Condition, Filter, Metadata, Scalar

__all__ = ["Condition", "Filter", "MetadataIndex", "parse_filter", "validate_filter", "value_key", "matches"]

_CLAUSES = ("must", "should", "must_not")


# ---------------------------------------------------------------- parsing and validation


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (str, bool, int, float)) and not (isinstance(v, float) and math.isnan(v))


def _check_scalar(key: str, v: Any, where: str) -> None:
    if isinstance(v, float) and math.isnan(v):
        raise InvalidArgument(f"filter on {key!r}: {where} is NaN; expected a string, number or boolean")
    if not isinstance(v, (str, bool, int, float)):
        raise InvalidArgument(
            f"filter on {key!r}: {where} is {v!r} ({type(v).__name__}); expected a string, number or boolean"
        )


def validate_condition(c: Condition) -> None:
    if not isinstance(c.key, str) or not c.key:
        raise InvalidArgument(f"filter condition key must be a non-empty string, got {c.key!r}")
    if (c.equals is None) == (c.any_of is None):
        raise InvalidArgument(
            f"filter on {c.key!r} must set exactly one of 'equals' / 'any_of', "
            f"got equals={c.equals!r}, any_of={c.any_of!r}"
        )
    if c.equals is not None:
        _check_scalar(c.key, c.equals, "'equals'")
    else:
        if isinstance(c.any_of, (str, bytes)) or not isinstance(c.any_of, (tuple, list)):
            raise InvalidArgument(f"filter on {c.key!r}: 'any_of' must be a list of values, got {c.any_of!r}")
        if len(c.any_of) == 0:
            raise InvalidArgument(f"filter on {c.key!r}: 'any_of' is empty; expected at least one value")
        for v in c.any_of:
            _check_scalar(c.key, v, f"'any_of' value {v!r}")


def validate_filter(f: Filter) -> None:
    """Raise InvalidArgument naming the first bad condition."""
    if not isinstance(f, Filter):
        raise InvalidArgument(f"expected a Filter, got {type(f).__name__}")
    for clause in _CLAUSES:
        for c in getattr(f, clause):
            if not isinstance(c, Condition):
                raise InvalidArgument(f"filter {clause!r} holds {c!r}; expected Condition objects")
            validate_condition(c)


def _condition_from_value(key: str, value: Any) -> Condition:
    """Shorthand value: scalar -> equals, list -> any_of, {"equals"|"any_of": ...} -> as given."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"equals", "any_of"}
        if unknown:
            raise InvalidArgument(
                f"filter on {key!r} has unknown operator(s) {sorted(unknown)}; expected 'equals' or 'any_of'"
            )
        any_of = value.get("any_of")
        return Condition(key=key, equals=value.get("equals"), any_of=tuple(any_of) if isinstance(any_of, list) else any_of)
    if isinstance(value, (list, tuple)):
        return Condition(key=key, any_of=tuple(value))
    return Condition(key=key, equals=value)


def _condition_from_dict(obj: Any, clause: str) -> Condition:
    if isinstance(obj, Condition):
        return obj
    if not isinstance(obj, Mapping):
        raise InvalidArgument(f"filter {clause!r} entries must be objects like {{'key': ..., 'equals': ...}}, got {obj!r}")
    unknown = set(obj) - {"key", "equals", "any_of"}
    if unknown:
        raise InvalidArgument(
            f"filter condition {dict(obj)!r} has unknown field(s) {sorted(unknown)}; expected 'key' and 'equals' or 'any_of'"
        )
    any_of = obj.get("any_of")
    return Condition(
        key=obj.get("key", ""),
        equals=obj.get("equals"),
        any_of=tuple(any_of) if isinstance(any_of, list) else any_of,
    )


def parse_filter(obj: Any) -> Optional[Filter]:
    """Build and validate a Filter from user input.

    Accepts None / {} (no filter: returns None), a `Filter`, the shorthand
    `{"lang": "en", "tag": ["a", "b"]}` (all must hold; a list means any of), or the explicit
    `{"must": [{"key": "lang", "equals": "en"}], "should": [...], "must_not": [...]}`.
    A dict with any of the keys must/should/must_not is read as the explicit form, so filter on a
    metadata field literally named "must" with the explicit form.
    """
    if obj is None:
        return None
    if isinstance(obj, Filter):
        validate_filter(obj)
        return None if obj.is_empty() else obj
    if not isinstance(obj, Mapping):
        raise InvalidArgument(f"a filter must be a mapping or a Filter, got {type(obj).__name__}: {obj!r}")
    if not obj:
        return None
    for k in obj:
        if not isinstance(k, str):
            raise InvalidArgument(f"filter keys must be strings, got {k!r}")
    if any(k in _CLAUSES for k in obj):
        extra = set(obj) - set(_CLAUSES)
        if extra:
            raise InvalidArgument(
                f"filter mixes the explicit form (must/should/must_not) with field(s) {sorted(extra)}; use one form"
            )
        parts: dict[str, tuple[Condition, ...]] = {}
        for clause in _CLAUSES:
            items = obj.get(clause, [])
            if isinstance(items, Mapping) or not isinstance(items, (list, tuple)):
                raise InvalidArgument(f"filter {clause!r} must be a list of conditions, got {items!r}")
            parts[clause] = tuple(_condition_from_dict(c, clause) for c in items)
        f = Filter(**parts)
    else:
        f = Filter(must=tuple(_condition_from_value(k, v) for k, v in obj.items()))
    validate_filter(f)
    return None if f.is_empty() else f


# ---------------------------------------------------------------- value normalisation


def value_key(v: Scalar) -> tuple[str, Any]:
    """The index key of a scalar: a type tag keeps True apart from 1 and 1 apart from "1"; Python
    already hashes and compares 1 and 1.0 equal, exactly (no float rounding of big ints)."""
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, (int, float)):
        return ("n", v)
    return ("s", v)


def _metadata_keys(value: Any) -> Iterable[tuple[str, Any]]:
    """Index keys a metadata value matches: itself, or each element of a list. Nulls, NaNs and
    nested containers match nothing."""
    items = value if isinstance(value, (list, tuple)) else (value,)
    for v in items:
        if _is_scalar(v):
            yield value_key(v)


def matches(metadata: Metadata, f: Optional[Filter]) -> bool:
    """Whether one document's metadata matches a filter: what `MemoryStore.list_documents` and a
    delete by filter test each stored document with. The index (`MetadataIndex.select`, what a
    search filters with) is exact with respect to it (tests/index/test_filters.py checks both
    against a brute force)."""
    if f is None:
        return True

    def cond(c: Condition) -> bool:
        if c.key not in metadata:
            return False
        have = set(_metadata_keys(metadata[c.key]))
        wanted = [c.equals] if c.equals is not None else list(c.any_of or ())
        return any(value_key(w) in have for w in wanted)

    return (
        all(cond(c) for c in f.must)
        and (not f.should or any(cond(c) for c in f.should))
        and not any(cond(c) for c in f.must_not)
    )


# ---------------------------------------------------------------- the inverted index


class MetadataIndex:
    """key -> value key -> set of chunk ids, plus the set of all live chunk ids. `select` only
    reads, so searches may run it at once; `add` and `remove` must run alone (the store's
    collection lock: shared for searches, exclusive for commits)."""

    def __init__(self) -> None:
        self._postings: dict[str, dict[tuple[str, Any], set[int]]] = {}
        self._universe: set[int] = set()

    def __len__(self) -> int:
        return len(self._universe)

    def add(self, chunk_ids: Iterable[int], metadata: Metadata) -> None:
        ids = [int(i) for i in chunk_ids]
        self._universe.update(ids)
        for key, value in metadata.items():
            by_value = self._postings.setdefault(key, {})
            for vk in _metadata_keys(value):
                by_value.setdefault(vk, set()).update(ids)

    def remove(self, chunk_ids: Iterable[int], metadata: Metadata) -> None:
        ids = [int(i) for i in chunk_ids]
        self._universe.difference_update(ids)
        for key, value in metadata.items():
            by_value = self._postings.get(key)
            if by_value is None:
                continue
            for vk in _metadata_keys(value):
                posting = by_value.get(vk)
                if posting is not None:
                    posting.difference_update(ids)
                    if not posting:
                        del by_value[vk]
            if not by_value:
                del self._postings[key]

    def _condition_ids(self, c: Condition) -> set[int]:
        by_value = self._postings.get(c.key)
        if not by_value:
            return set()
        wanted = [c.equals] if c.equals is not None else list(c.any_of or ())
        out: set[int] = set()
        for w in wanted:
            posting = by_value.get(value_key(w))
            if posting:
                out |= posting
        return out

    def select(self, f: Optional[Filter]) -> np.ndarray:
        """Sorted int64 chunk ids that `f` allows (all live ids for no filter)."""
        if f is None or f.is_empty():
            allowed: set[int] = set(self._universe)
        else:
            if f.must:
                # Intersect smallest first: cheapest, and the result only shrinks.
                sets = sorted((self._condition_ids(c) for c in f.must), key=len)
                allowed = set(sets[0])
                for s in sets[1:]:
                    allowed &= s
            else:
                allowed = set(self._universe)
            if f.should:
                any_should: set[int] = set()
                for c in f.should:
                    any_should |= self._condition_ids(c)
                allowed &= any_should
            for c in f.must_not:
                allowed -= self._condition_ids(c)
        out = np.fromiter(allowed, dtype=np.int64, count=len(allowed))
        out.sort()
        return out
