"""`text`: what the CLI prints of user data cannot drive the terminal, and stays readable."""

from __future__ import annotations

import json
import os

import pytest

from omni_cli.text import json_printable, plural, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b]0;pwn\x07.jpg", "\\x1b]0;pwn\\x07.jpg"),  # OSC: window title
        ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),  # forged log lines, carriage return
        ("\x9b2J\x7f", "\\x9b2J\\x7f"),  # C1 CSI, DEL
        ("evil\u202egpj.exe", "evil\\u202egpj.exe"),  # right-to-left override
        ("line\u2028sep", "line\\u2028sep"),
        ("café/日本/🙂 ok.jpg", "café/日本/🙂 ok.jpg"),  # printable text is kept
    ],
)
def test_printable_escapes_what_a_terminal_would_act_on(raw, shown):
    assert printable(raw) == shown


def test_an_undecodable_byte_is_shown_as_that_byte():
    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name on a UTF-8 system
    assert printable(name) == "caf\\xe9.jpg"
    printable(name).encode("utf-8")  # printable at all


def test_json_printable_parses_back_to_the_same_values():
    data = {"path": "\x1b]0;x\x07\x9b\u202e" + os.fsdecode(b"\xe9"), "n": [1, 2]}
    document = json.dumps(data, ensure_ascii=False, indent=2)
    safe = json_printable(document)
    assert json.loads(safe) == data
    assert not any(c in safe for c in "\x1b\x07\x9b\u202e") and "\n" in safe
    safe.encode("utf-8")


def test_plural():
    assert [plural(n, "image") for n in (0, 1, 2, 1024)] == [
        "0 images",
        "1 image",
        "2 images",
        "1,024 images",
    ]
    assert plural(1, "view") == "1 view" and plural(3, "match", "matches") == "3 matches"
