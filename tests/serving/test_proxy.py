"""SSE events rewritten line by line: `data:` JSON lines only, whatever else the event holds."""

from __future__ import annotations

from app.serving.proxy import _rewrite_event


def tag(value: object) -> object:
    return {**value, "tagged": True} if isinstance(value, dict) else value


def test_data_lines_are_rewritten_and_other_lines_kept() -> None:
    event = b'event: response.created\ndata: {"response":{"model":"a@1"}}'
    assert _rewrite_event(event, tag) == (
        b'event: response.created\ndata: {"response":{"model":"a@1"},"tagged":true}'
    )
    assert _rewrite_event(b'data: {"a":"\xc3\xa9"}', tag) == b'data: {"a":"\xc3\xa9","tagged":true}'


def test_done_comments_and_non_json_pass_unchanged() -> None:
    for event in (b"data: [DONE]", b": keep-alive", b"data: not json", b"data: [1, 2]"):
        assert _rewrite_event(event, tag) == event
