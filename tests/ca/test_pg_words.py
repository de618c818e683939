"""What the PostgreSQL engine logs of a driver error: one line, never the password,
not even a piece of it where the line is cut."""

from __future__ import annotations

import pytest

from ca.pgengine import first_line

SECRET = "s3cret-Passw0rd-0123456789"


@pytest.mark.parametrize("at", [0, 150, 170, 180, 188, 250])
def test_the_password_never_shows_wherever_it_falls(at: int) -> None:
    exc = RuntimeError("x" * at + f'password "{SECRET}" rejected\nDETAIL: {SECRET}')
    words = first_line(exc, SECRET)
    assert "\n" not in words and len(words) <= 200
    for n in range(4, len(SECRET) + 1):  # no piece of it long enough to mean anything
        assert SECRET[:n] not in words and SECRET[-n:] not in words


def test_the_words_without_a_password_are_kept() -> None:
    exc = RuntimeError('connection to server at "db" failed: timeout expired\nmore')
    assert first_line(exc, SECRET) == 'connection to server at "db" failed: timeout expired'
    assert first_line(exc, None) == 'connection to server at "db" failed: timeout expired'
