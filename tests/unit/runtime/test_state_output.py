"""``headrace state`` output: escaped text, JSON Lines, and a clear refusal of an operator
the job has no state for (all before any broker is contacted)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from headrace.runtime.cli import cli
from headrace.runtime.inspect import (
    StateEntry,
    jsonable,
    render_json,
    render_text,
    shown_key,
    visible,
)

HOSTILE = "\x1b[2J\x1b[31mred\nnext\rline\x07\x7f\x85\u2028\u202eevil\U000e0001"


class HostileRepr:
    """A user's value type whose repr holds an escape sequence."""

    def __repr__(self) -> str:
        return "x\x1b[2Jy\n"


def test_text_output_shows_every_control_character_as_an_escape() -> None:
    line = render_text(StateEntry(3, "count", HOSTILE, None, {"v": HOSTILE}))
    assert line.isprintable(), ascii(line)
    assert line.startswith("partition=3 state=count key='\\x1b[2J\\x1b[31mred\\nnext\\rline")
    assert "\\x07\\x7f\\x85\\u2028\\u202eevil\\U000e0001' value={'v': '\\x1b[2J" in line
    assert visible("plain words, ünïcödé") == "plain words, ünïcödé"


def test_a_key_is_shown_as_it_is_only_when_that_is_unambiguous() -> None:
    assert shown_key("the") == "the"
    assert shown_key("ünï code") == "ünï code"
    assert shown_key(42) == "42"
    assert shown_key("a\x1b") == "'a\\x1b'"  # the ESC character
    assert shown_key("a\\x1b") == "'a\\\\x1b'"  # a backslash and three letters
    assert shown_key(b"\xff\x00") == "b'\\xff\\x00'"  # not decodable by the key serde


def test_whatever_a_values_repr_returns_is_escaped() -> None:
    line = render_text(StateEntry(0, "s", "k", None, HostileRepr()))
    assert line == "partition=0 state=s key=k value=x\\x1b[2Jy\\x0a"
    doc = json.loads(render_json(StateEntry(0, "s", "k", None, HostileRepr())))
    assert doc["value"] == "x\x1b[2Jy\n"


def test_json_output_is_one_printable_object_per_entry_that_round_trips() -> None:
    text = render_json(StateEntry(0, "m", HOSTILE, b"\xff\x00", [1, HOSTILE]))
    assert "\n" not in text and text.isprintable(), ascii(text)
    doc = json.loads(text)
    assert doc == {
        "partition": 0,
        "state": "m",
        "key": HOSTILE,
        "map_key": {"base64": "/wA="},
        "value": [1, HOSTILE],
    }


def test_json_holds_what_plain_json_cannot() -> None:
    value = {1: 2**80, "nan": float("nan"), "set": {3}, "tuple": (1, "a"), "raw": b"utf-8"}
    assert jsonable(value) == {
        "1": 2**80,
        "nan": None,
        "set": [3],
        "tuple": [1, "a"],
        "raw": {"base64": "dXRmLTg="},
    }
    doc = json.loads(render_json(StateEntry(1, "s", b"\xfe", None, value)))
    assert doc["key"] == {"base64": "/g=="} and doc["value"]["1"] == 2**80


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """The CLI group configures the root logger; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("keep_logging")
def test_an_unknown_operator_lists_the_stateful_operators_of_the_job() -> None:
    result = CliRunner().invoke(
        cli, ["state", "examples.wordcount:job", "nosuch"], catch_exceptions=False
    )
    assert result.exit_code == 2, result.output
    assert "job 'wordcount' has no stateful operator 'nosuch'" in result.output
    assert "its stateful operators: 'counts'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("keep_logging")
def test_state_help_says_what_json_holds() -> None:
    result = CliRunner().invoke(cli, ["state", "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "JSON Lines" in text and '{"base64": ...}' in text and "stderr" in text
