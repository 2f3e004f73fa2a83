"""Secrets that cannot leak by accident.

A `Secret` prints as `***` in `str`, `repr`, f-strings and dataclass reprs; only
`reveal()` returns the value, and only the code that opens a connection or sends a
request calls it. Every secret value is also registered with `redact()`, the last
line of defence applied to error messages, log records and reports, because
drivers and servers sometimes echo what they were given.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Final

MASK: Final = "***"

_known: set[str] = set()
_known_lock = threading.Lock()
# Compiled on the first redact() after a register(): a directory registers one password per
# target, and recompiling on each would be quadratic (47 s for 1,000 targets, measured).
_pattern: re.Pattern[str] | None = None
_pattern_stale = False

# Passwords in URLs (scheme://user:password@host) are masked even when not registered, up to
# the last `@` of the word: a password with an unencoded `@` is masked whole. A `"`, `<` or `>`
# ends the word, so that the JSON and HTML around a URL survive.
_URL_PASSWORD = re.compile(r"(?P<prefix>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<password>[^\s\"<>]+)(?=@)")

# And a password in a key=value connection string (`host=h password=x`) or a URL's query
# (`?sslpassword=x&...`), quoted or not. A `"` or a backslash ends an unquoted one, as in a URL: JSON
# escapes survive.
_KEYWORD_PASSWORD = re.compile(
    r"(?i)(?P<prefix>\b(?:ssl)?password\s*=\s*)(?P<password>'(?:[^'\\]|\\.)*'|[^\s\"\\&<>]+)"
)


class Secret:
    """A string that only `reveal()` shows."""

    __slots__ = ("_value",)

    def __init__(self, value: str, *, searchable: bool = True) -> None:
        """`searchable=False` for values whose secret part is registered on its own (a DSN's password)."""
        self._value = value
        if searchable:
            register(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK!r})"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret cannot be pickled")


def register(value: str) -> None:
    """Remember a value that must never be printed (short values are ignored: too many false hits)."""
    global _pattern_stale
    if len(value) < 4:
        return
    with _known_lock:
        if value not in _known:
            _known.add(value)
            _pattern_stale = True


def _current_pattern() -> re.Pattern[str] | None:
    global _pattern, _pattern_stale
    with _known_lock:
        if _pattern_stale:
            alternatives = sorted(_known, key=len, reverse=True)
            _pattern, _pattern_stale = re.compile("|".join(re.escape(v) for v in alternatives)), False
        return _pattern


def redact(text: str) -> str:
    """Mask every registered secret and every password written in a URL or a key=value string."""
    pattern = _current_pattern()
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _URL_PASSWORD.sub(lambda m: m.group("prefix") + MASK, text)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group("prefix") + MASK, text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the fully formatted message of each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            # Tracebacks are rendered later from exc_info; pre-render them redacted.
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        return True


def error_line(error: BaseException, limit: int = 2) -> str:
    """The first lines of an exception's message, redacted: what a report or an error line shows."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return redact(" ".join(lines[:limit]) or type(error).__name__)
