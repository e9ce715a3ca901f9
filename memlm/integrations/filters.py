"""The metadata filters of LangChain and LlamaIndex, translated to memlm's `Filter`.

memlm's filter is one level of boolean logic over exact tests: all of `must`, at least one of
`should`, none of `must_not`; each test is "equals x" or "any of [x, y]" (a list-valued field
matches a value it contains). So these translate:

  equality, `$eq`, `$in` (LlamaIndex EQ, IN, ANY, CONTAINS)      -> must
  `$ne`, `$nin` (NE, NIN)                                         -> must_not
  `$or` / OR of positive tests                                    -> should
  `$and` / AND of any of these, `$not` / NOT of positive tests    -> merged, NOT by De Morgan

Ranges (`$gt`, `$lte`, ...), text matching, `$exists`, an OR holding a negative test or an AND,
and two ORs under one AND cannot be said in one such filter: they raise InvalidArgument naming
the part, rather than being dropped (which would widen the results silently). `$ne: x` keeps
documents without the field, as must_not does. Both front ends build the small tree below first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

from memlm.errors import InvalidArgument
from memlm.index.types import Condition, Filter

SUPPORTED_LANGCHAIN = ("$eq", "$ne", "$in", "$nin", "$and", "$or", "$not")


@dataclass(frozen=True)
class Test:
    """One exact test: `key` equals one of `values`, or (negated) equals none of them."""

    key: str
    values: tuple[Any, ...]
    negated: bool = False

    def condition(self) -> Condition:
        if len(self.values) == 1:
            return Condition(key=self.key, equals=self.values[0])
        return Condition(key=self.key, any_of=self.values)


@dataclass(frozen=True)
class Bool:
    op: str  # "and" | "or" | "not" (of its parts ANDed together: not (a and b))
    parts: tuple["Node", ...]


Node = Union[Test, Bool]


def to_filter(node: Node, source: str) -> Filter:
    """Flatten the tree into must / should / must_not, or raise naming what cannot be flattened."""
    must: list[Condition] = []
    should: list[Condition] = []
    must_not: list[Condition] = []
    has_or = False

    def unsupported(what: str) -> InvalidArgument:
        return InvalidArgument(
            f"filter {source}: {what} cannot be expressed in memlm's filter (all of must, at least one "
            "of should, none of must_not, each an exact test); put it in must/should/must_not form or split the query"
        )

    def positive_tests(n: Node, context: str) -> list[Test]:
        """The tests of an OR (or a NOT over an OR): each must be a positive test."""
        if isinstance(n, Test):
            if n.negated:
                raise unsupported(f"a negative test ({n.key!r}) inside {context}")
            return [n]
        if n.op == "or" or (n.op == "and" and len(n.parts) == 1):
            return [t for p in n.parts for t in positive_tests(p, context)]
        raise unsupported(f"an {n.op.upper()} inside {context}")

    def add_and(n: Node) -> None:
        nonlocal has_or
        if isinstance(n, Test):
            (must_not if n.negated else must).append(n.condition())
        elif n.op == "and":
            for p in n.parts:
                add_and(p)
        elif n.op == "or":
            if len(n.parts) == 1:
                add_and(n.parts[0])
                return
            if has_or:
                raise unsupported("a second OR next to another")
            has_or = True
            should.extend(t.condition() for t in positive_tests(n, "an OR"))
        else:  # not (a and b) is not (a) or not (b): only a single test, or an OR of positives, flattens
            inner = n.parts[0] if len(n.parts) == 1 else Bool("and", n.parts)
            if isinstance(inner, Test):
                (must if inner.negated else must_not).append(inner.condition())
            elif inner.op == "or" or len(inner.parts) == 1:
                must_not.extend(t.condition() for t in positive_tests(inner, "a NOT"))
            else:
                raise unsupported("a NOT over an AND of several tests")

    add_and(node)
    return Filter(must=tuple(must), should=tuple(should), must_not=tuple(must_not))


# ---------------------------------------------------------------- LangChain: Chroma/PGVector style dicts


def _values(key: str, op: str, value: Any) -> tuple[Any, ...]:
    if op in ("$in", "$nin"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
            raise InvalidArgument(f"filter on {key!r}: {op} takes a non-empty list, got {value!r}")
        return tuple(value)
    if isinstance(value, (list, tuple)):  # memlm's shorthand: a list means any of
        return tuple(value)
    return (value,)


_MEMLM_OPERATORS = {"equals": "$eq", "any_of": "$in"}  # memlm's own per-field form, {"lang": {"equals": "en"}}


def _langchain_field(key: str, value: Any) -> Node:
    if not isinstance(value, Mapping):
        return Test(key, _values(key, "$eq", value))
    tests: list[Node] = []
    for op, operand in value.items():
        op = _MEMLM_OPERATORS.get(op, op)
        if op in ("$eq", "$in"):
            tests.append(Test(key, _values(key, op, operand)))
        elif op in ("$ne", "$nin"):
            tests.append(Test(key, _values(key, op, operand), negated=True))
        else:
            raise InvalidArgument(
                f"filter on {key!r}: operator {op!r} is not supported; memlm's filters test equality only "
                f"({', '.join(SUPPORTED_LANGCHAIN)}); ranges, $exists and text matching are not"
            )
    if not tests:
        raise InvalidArgument(f"filter on {key!r}: an empty operator object; expected e.g. {{'$eq': value}}")
    return tests[0] if len(tests) == 1 else Bool("and", tuple(tests))


def _langchain_node(obj: Mapping[str, Any]) -> Node:
    parts: list[Node] = []
    for key, value in obj.items():
        if key in ("$and", "$or"):
            if not isinstance(value, (list, tuple)) or not value:
                raise InvalidArgument(f"filter {key} takes a non-empty list of filters, got {value!r}")
            parts.append(Bool(key[1:], tuple(_langchain_node(_mapping(v, key)) for v in value)))
        elif key == "$not":
            parts.append(Bool("not", (_langchain_node(_mapping(value, key)),)))
        elif key.startswith("$"):
            raise InvalidArgument(f"filter operator {key!r} is not supported; expected one of {', '.join(SUPPORTED_LANGCHAIN)}")
        else:
            parts.append(_langchain_field(key, value))
    if not parts:
        raise InvalidArgument("an empty filter inside $and/$or/$not; expected at least one test")
    return parts[0] if len(parts) == 1 else Bool("and", tuple(parts))


def _mapping(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise InvalidArgument(f"filter {where} holds {v!r}; expected filter objects")
    return v


def from_langchain(filter: Union[None, Filter, Mapping[str, Any]]) -> Union[None, Filter, Mapping[str, Any]]:
    """A LangChain-style dict filter (`{"lang": "en", "year": {"$in": [2024, 2025]}, "$or": [...]}`)
    as a memlm Filter. memlm's own forms pass through: a `Filter`, or a dict with must/should/must_not."""
    if filter is None or isinstance(filter, Filter):
        return filter
    if not isinstance(filter, Mapping):
        raise InvalidArgument(f"a filter must be a dict, got {type(filter).__name__}: {filter!r}")
    if not filter:
        return None
    if any(k in ("must", "should", "must_not") for k in filter):
        return filter  # memlm's explicit form; the client validates it
    return to_filter(_langchain_node(filter), repr(dict(filter)))


# ---------------------------------------------------------------- LlamaIndex: MetadataFilters


def from_llama_index(filters: Any) -> Filter | None:
    """llama_index.core.vector_stores.types.MetadataFilters (nested, AND/OR/NOT) as a memlm
    Filter. Operators that translate: EQ, IN, ANY, CONTAINS, NE, NIN; others raise."""
    if filters is None or not getattr(filters, "filters", None):
        return None
    return to_filter(_llama_node(filters), repr(filters))


def _llama_node(filters: Any) -> Node:
    from llama_index.core.vector_stores.types import FilterOperator, MetadataFilters

    parts: list[Node] = []
    for f in filters.filters:
        if isinstance(f, MetadataFilters):
            parts.append(_llama_node(f))
            continue
        op = f.operator
        if op in (FilterOperator.EQ, FilterOperator.CONTAINS):  # CONTAINS: a list-valued field holds it
            parts.append(Test(f.key, (f.value,)))
        elif op in (FilterOperator.IN, FilterOperator.ANY):
            parts.append(Test(f.key, _values(f.key, "$in", f.value)))
        elif op == FilterOperator.NE:
            parts.append(Test(f.key, (f.value,), negated=True))
        elif op == FilterOperator.NIN:
            parts.append(Test(f.key, _values(f.key, "$nin", f.value), negated=True))
        else:
            raise InvalidArgument(
                f"filter on {f.key!r}: operator {op.value!r} is not supported; memlm's filters test equality "
                "only (==, !=, in, nin, any, contains)"
            )
    condition = str(getattr(filters.condition, "value", filters.condition) or "and").lower()
    if condition == "not":  # LlamaIndex's NOT: none of them (llama_index.core.vector_stores.utils)
        return Bool("not", (parts[0] if len(parts) == 1 else Bool("or", tuple(parts)),))
    return parts[0] if len(parts) == 1 else Bool(condition, tuple(parts))
