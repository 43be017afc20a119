"""Text that is safe to print: file names and messages made visible, never obeyed by a terminal.

File names are user data, and a name may hold terminal escapes (`\\x1b]0;title\\x07` sets a
window title, `\\x1b[2J` clears the screen, C1 `\\x9b` starts a command on some terminals), line
breaks that forge a log line, or bidirectional overrides that reorder what is shown. Everything
the CLI prints or logs goes through `printable` (plain text) or `json_printable` (JSON lines):
control characters (C0, DEL, C1), line and paragraph separators and the bidirectional controls
become visible escapes, and a lone surrogate (an undecodable byte of a file name, as Python
reads it) becomes the `\\xNN` of that byte. Everything else, any script or emoji, is kept.
"""

from __future__ import annotations

import re

# C0 and DEL, C1, the bidirectional marks, embeddings, overrides and isolates, the line and
# paragraph separators, and lone surrogates (not printable: an encoder would raise on them).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"
)

_UNSAFE_IN_JSON = re.compile(_UNSAFE.pattern.replace("\x00-\x1f", "\x00-\x09\x0b-\x1f"))


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's surrogateescape of an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def printable(text: object) -> str:
    """`text` with every character that a terminal would act on shown as an escape."""
    return _UNSAFE.sub(_escape, str(text))


def json_printable(document: str) -> str:
    """A JSON document with the same characters escaped as JSON `\\uNNNN`: it still parses to the
    same values, but nothing in it reaches a terminal raw (json.dumps leaves C1, DEL, the
    bidirectional controls and lone surrogates as they are). Its own line breaks stay."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", document)


def utf8_or_none(text: str) -> str | None:
    """`text` if it encodes as UTF-8 (so that it can be stored in Parquet metadata), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def plural(n: int, one: str, many: str | None = None) -> str:
    """`1 image`, `2 images`, `1,024 images`: a count and its noun, in the right number."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"
