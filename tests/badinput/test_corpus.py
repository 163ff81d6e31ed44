"""The corpus states its expectations on its own; this checks them against the codec and the
``publish`` line parser, fast and without a broker, so the integration test's expectations are
known to be right before the pipeline is asked."""

from __future__ import annotations

import uuid

from pydantic import ValidationError

from producers.upstream import LineError, parse_line
from schemas.codec import EventDecodeError, decode
from schemas.events import DeadLetter
from schemas.topics import ALL_TOPICS
from tests.badinput.corpus import (
    CATEGORIES,
    TOPICS,
    BadRecord,
    Context,
    Expect,
    corpus,
    publish_lines,
    summary,
)

CTX = Context(vm=str(uuid.UUID(int=7)), device_keys=(204, 205), marker="cbtmarkunit")
TYPES = {s.name: s.value_types for s in ALL_TOPICS}


def decodes(r: BadRecord) -> bool:
    if r.topic == "cbt.deadletter":
        try:
            DeadLetter.model_validate_json(r.value or b"")
        except ValidationError:
            return False
        return True
    try:
        decode(r.value, key=r.key, expect=TYPES[r.topic])
    except EventDecodeError:
        return False
    return True


def test_corpus_expectations_match_the_codec() -> None:
    records = corpus(11, CTX, per_category=11)
    assert len(records) >= 1000
    wrong = [(r.topic, r.category, r.kind, r.expect) for r in records
             if decodes(r) != (r.expect != Expect.DEAD)]
    assert not wrong, wrong[:20]
    counts = summary(records)
    assert set(counts["topic"]) == set(TOPICS)
    assert set(counts["category"]) == set(CATEGORIES)
    # well-formed hostile records exist on every pipeline input
    for topic in TOPICS:
        assert any(r.expect != Expect.DEAD for r in records if r.topic == topic), topic


def test_corpus_is_seeded() -> None:
    a, b = corpus(5, CTX, per_category=2), corpus(5, CTX, per_category=2)
    assert [(r.key, r.value) for r in a] == [(r.key, r.value) for r in b]
    assert [(r.key, r.value) for r in a] != [(r.key, r.value) for r in corpus(6, CTX, 2)]


def test_publish_lines_match_the_line_parser() -> None:
    lines = publish_lines(3, CTX, per_category=10)
    assert len(lines) >= 100
    for no, r in enumerate(lines, 1):
        assert r.value is not None
        got = parse_line(no, r.value.decode("utf-8", errors="replace"))
        assert isinstance(got, LineError) == (r.expect == Expect.DEAD), (r.category, r.kind, got)
