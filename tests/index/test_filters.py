"""Filter parsing, validation, and MetadataIndex.select against a brute-force evaluator."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memlm.errors import InvalidArgument
from memlm.index.filters import MetadataIndex, matches, parse_filter, validate_filter
from memlm.index.types import Condition, Filter


def test_parse_shorthand():
    f = parse_filter({"lang": "en", "tag": ["a", "b"]})
    assert f == Filter(must=(Condition("lang", equals="en"), Condition("tag", any_of=("a", "b"))))


def test_parse_explicit():
    f = parse_filter(
        {
            "must": [{"key": "lang", "equals": "en"}],
            "should": [{"key": "tag", "any_of": ["a", "b"]}],
            "must_not": [{"key": "draft", "equals": True}],
        }
    )
    assert f == Filter(
        must=(Condition("lang", equals="en"),),
        should=(Condition("tag", any_of=("a", "b")),),
        must_not=(Condition("draft", equals=True),),
    )


def test_parse_empty_and_passthrough():
    assert parse_filter(None) is None
    assert parse_filter({}) is None
    assert parse_filter(Filter()) is None
    f = Filter(must=(Condition("x", equals=1),))
    assert parse_filter(f) is f


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"must": [{"key": "", "equals": 1}]}, "non-empty"),
        ({"must": [{"key": "a"}]}, "exactly one"),
        ({"must": [{"key": "a", "equals": 1, "any_of": [1]}]}, "exactly one"),
        ({"a": {"x": 1}}, "unknown operator"),
        ({"must": [{"key": "a", "equals": {"x": 1}}]}, "expected a string, number or boolean"),
        ({"must": [{"key": "a", "equals": [1]}]}, "expected a string, number or boolean"),
        ({"a": [[1, 2]]}, r"\[1, 2\]"),
        ({"a": []}, "empty"),
        ({"a": math.nan}, "NaN"),
        ({"a": [1, math.nan]}, "NaN"),
        ({"a": None}, "exactly one"),
        ({"must": [{"key": "a", "equals": 1}], "lang": "en"}, "mixes"),
        ({"must": {"key": "a"}}, "list of conditions"),
        ({"must": [{"key": "a", "eq": 1}]}, "unknown field"),
        ("lang=en", "mapping"),
    ],
)
def test_validation_errors(obj, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_filter(obj)


def test_validate_filter_direct():
    with pytest.raises(InvalidArgument, match="'k'"):
        validate_filter(Filter(must=(Condition("k", equals=math.nan),)))
    with pytest.raises(InvalidArgument, match="empty"):
        validate_filter(Filter(should=(Condition("k", any_of=()),)))


def select(index, obj):
    return index.select(parse_filter(obj)).tolist()


def test_semantics_types_and_lists():
    ix = MetadataIndex()
    ix.add([1], {"v": True})
    ix.add([2], {"v": 1})
    ix.add([3], {"v": 1.0})
    ix.add([4], {"v": "1"})
    ix.add([5, 6], {"v": [1, "x"], "lang": "en"})
    ix.add([7], {"v": None})
    assert select(ix, {"v": True}) == [1]
    assert select(ix, {"v": 1}) == [2, 3, 5, 6]  # 1 == 1.0, list contains 1; True is not 1
    assert select(ix, {"v": 1.0}) == [2, 3, 5, 6]
    assert select(ix, {"v": "1"}) == [4]
    assert select(ix, {"v": False}) == []
    assert select(ix, {"v": ["x", True]}) == [1, 5, 6]
    assert select(ix, {"must_not": [{"key": "v", "equals": 1}]}) == [1, 4, 7]
    assert select(ix, {"should": [{"key": "lang", "equals": "en"}, {"key": "v", "equals": "1"}]}) == [4, 5, 6]
    assert select(ix, None) == [1, 2, 3, 4, 5, 6, 7]
    assert select(ix, {"missing": 1}) == []
    ix.remove([5, 6], {"v": [1, "x"], "lang": "en"})
    assert select(ix, {"v": 1}) == [2, 3]
    assert select(ix, {"lang": "en"}) == []
    assert len(ix) == 5
    assert ix.select(None).dtype == np.int64


# ---------------------------------------------------------------- property test against brute force

scalars = st.one_of(
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from([0.0, 1.0, 1.5, -2.0]),
    st.sampled_from(["a", "b", "1", ""]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.none())
metadatas = st.dictionaries(st.sampled_from(["k", "j", "l"]), values, max_size=3)
conditions = st.builds(
    lambda key, eq, anyof, use_eq: Condition(key, equals=eq) if use_eq else Condition(key, any_of=tuple(anyof)),
    st.sampled_from(["k", "j", "l", "zz"]),
    scalars,
    st.lists(scalars, min_size=1, max_size=3),
    st.booleans(),
)
filters = st.builds(
    Filter,
    must=st.lists(conditions, max_size=2).map(tuple),
    should=st.lists(conditions, max_size=2).map(tuple),
    must_not=st.lists(conditions, max_size=2).map(tuple),
)


def _kind(v):
    return "bool" if isinstance(v, bool) else "num" if isinstance(v, (int, float)) else "str"


def brute_force(md, f: Filter) -> bool:
    """The Condition docstring, written out independently of the index code."""

    def cond(c: Condition) -> bool:
        have = md.get(c.key)
        have = have if isinstance(have, list) else [have]
        wanted = [c.equals] if c.equals is not None else list(c.any_of)
        return any(h is not None and _kind(h) == _kind(w) and h == w for h in have for w in wanted)

    return all(map(cond, f.must)) and (not f.should or any(map(cond, f.should))) and not any(map(cond, f.must_not))


@settings(max_examples=200, deadline=None)
@given(docs=st.lists(metadatas, max_size=12), f=filters, removed=st.sets(st.integers(0, 11)))
def test_select_matches_brute_force(docs, f, removed):
    ix = MetadataIndex()
    live = {}
    for i, md in enumerate(docs):
        ids = [10 * i, 10 * i + 1]  # two chunks per document
        ix.add(ids, md)
        live[i] = md
    for i in removed:
        if i in live:
            ix.remove([10 * i, 10 * i + 1], live.pop(i))
    expected = sorted(cid for i, md in live.items() if brute_force(md, f) for cid in (10 * i, 10 * i + 1))
    assert ix.select(f).tolist() == expected
    assert all(matches(md, f) == brute_force(md, f) for md in docs)
