"""The one ``key=value`` reader (benchmark/keyvalue.py) behind --set, sweep alternatives and perf's entries."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmark import perf
from benchmark.keyvalue import split_pair, split_top_level
from benchmark.method_api import METHODS, apply_overrides
from benchmark.sweep import SweepError, parse_sets, split_alternatives

ATOM = st.text(alphabet=string.ascii_letters + string.digits + "._-=", min_size=1, max_size=6)
VALUE = st.one_of(ATOM, st.lists(ATOM, min_size=1, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"))


@given(st.lists(VALUE, min_size=1, max_size=5))
def test_the_three_readers_split_the_same_values(values):
    text = ",".join(values)
    assert split_top_level(text) == split_top_level(text, strict=True) == values
    assert split_alternatives(text, "k") == values
    assert perf.split_top(text) == values


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a,[1,2],{x:1,y:2},(3,4)", ["a", "[1,2]", "{x:1,y:2}", "(3,4)"]),
        ("'a,b',\"c,d\",e", ["'a,b'", '"c,d"', "e"]),
        ("a,,b", ["a", "", "b"]),
    ],
)
def test_brackets_braces_and_quotes_keep_commas(text, parts):
    assert split_top_level(text) == parts


@pytest.mark.parametrize(("text", "bracket"), [("lora[rank=64", "'['"), ("a{b", "'{'"), ("a],b", "']'")])
def test_strict_names_the_unbalanced_bracket(text, bracket):
    with pytest.raises(ValueError, match=re.escape(f"unbalanced {bracket}")):
        split_top_level(text, strict=True)
    split_top_level(text)  # not strict: no error (a sweep value keeps its text)


def test_missing_equals_is_the_same_error_everywhere():
    assert split_pair(" rank =8") == ("rank", "8")
    msg = re.escape("--set 'rank': expected key=value")
    with pytest.raises(ValueError, match=msg):
        split_pair("rank")
    with pytest.raises(SweepError, match=msg):
        parse_sets(["rank"])
    with pytest.raises(ValueError, match=msg):
        apply_overrides(METHODS.get("lora").default_config(), ["rank"])
