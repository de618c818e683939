"""Durations as operators write them, and everything that is not one."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshid.duration import format_duration, parse_duration
from meshid.errors import InvalidDuration

FUZZ = settings(max_examples=250, deadline=None)

VALID = [
    ("30s", timedelta(seconds=30)),
    ("15m", timedelta(minutes=15)),
    ("1h", timedelta(hours=1)),
    ("7d", timedelta(days=7)),
    ("1h30m", timedelta(minutes=90)),
    ("90s", timedelta(seconds=90)),
    ("1d2h3m4s", timedelta(days=1, hours=2, minutes=3, seconds=4)),
    ("0h1s", timedelta(seconds=1)),
    ("36500d", timedelta(days=36500)),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


INVALID = [
    "",
    "0s",
    "0h0m",
    "-1s",
    "+1s",
    "1x",
    "1",
    "h",
    "1.5h",
    "1h1h",
    "1hh",
    "1H",
    " 1h",
    "1h ",
    "1 h",
    "\u0663s",  # ARABIC-INDIC DIGIT THREE: a digit to Python, not to an operator
    "\uff11h",  # FULLWIDTH DIGIT ONE
    "36501d",
    "999999999d",
    "999999999d999999999h",  # past what timedelta can hold
    "1234567890s",  # more than nine digits
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_durations(text: str) -> None:
    with pytest.raises(InvalidDuration) as info:
        parse_duration(text)
    assert info.value.reason == "invalid_duration"
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(seconds=30), "30s"),
        (timedelta(hours=1), "1h"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(days=365), "365d"),
        (timedelta(0), "0s"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@FUZZ
@given(st.integers(min_value=1, max_value=36500 * 86400))
def test_format_then_parse_round_trips(seconds: int) -> None:
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value


@FUZZ
@given(
    st.one_of(
        st.text(),
        st.text(alphabet="0123456789smhdx.-+ \u0663", max_size=30),
        st.from_regex(r"([0-9]{1,12}[smhd]){1,6}", fullmatch=True),
    )
)
def test_parse_raises_only_invalid_duration(text: str) -> None:
    try:
        value = parse_duration(text)
    except InvalidDuration:
        return
    assert timedelta(0) < value <= timedelta(days=36500)
