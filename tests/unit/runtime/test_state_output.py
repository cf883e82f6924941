"""``headrace state`` output: escaped text, JSON Lines, and a clear refusal of an operator
the job has no state for (all before any broker is contacted)."""

from __future__ import annotations

import json
import logging

from click.testing import CliRunner

from headrace.runtime.cli import cli
from headrace.runtime.inspect import StateEntry, render_json, render_text, visible

HOSTILE = "\x1b[2J\x1b[31mred\nnext\rline\x07\x7f\x85\u2028\u202eevil\U000e0001"


def test_text_output_shows_every_control_character_as_an_escape() -> None:
    line = render_text(StateEntry(3, "count", HOSTILE, None, {"v": HOSTILE}))
    assert line.isprintable(), ascii(line)
    assert line.startswith("partition=3 state=count key=\\x1b[2J\\x1b[31mred\\x0anext")
    assert "\\u202eevil" in line and "\\U000e0001" in line
    assert visible("plain words, ünïcödé") == "plain words, ünïcödé"


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


def test_an_unknown_operator_lists_the_stateful_operators_of_the_job() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        result = CliRunner().invoke(
            cli, ["state", "examples.wordcount:job", "nosuch"], catch_exceptions=False
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert result.exit_code == 2, result.output
    assert "job 'wordcount' has no stateful operator 'nosuch'" in result.output
    assert "its stateful operators: 'counts'" in result.output
    assert "Traceback" not in result.output
