"""The CloudEvents envelope: exact shape, stable ids, and valid JSON whatever
a database hands over."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from dbevents.envelope import NAMESPACE, build_event, dumps, event_id, iso_time, payload
from dbevents.values import Change, Operation, RawJSON, Trigger
from hypothesis import assume, given, settings
from hypothesis import strategies as st

T = Trigger(name="t", url="http://x")


def change(doc: object, key: str = "0/1:0") -> Change:
    return Change(database="app", db_type="sql-postgres", table="users",
                  operation=Operation.INSERT, key=key,
                  time=datetime(2019, 10, 19, 12, 40, 50, 53000, tzinfo=UTC),
                  doc_id="1", doc=doc)  # type: ignore[arg-type]


def test_exact_seed_payload() -> None:
    ev = build_event(change({"id": 1, "n": Decimal("1.10")}), T, "src")
    body = json.loads(ev.payload)
    assert body == {
        "specversion": "1.0", "id": ev.id, "type": "DB_INSERT", "source": "src",
        "time": "2019-10-19T12:40:50.053Z",
        "data": {"db": "sql-postgres", "col": "users", "docId": "1",
                 "doc": {"id": 1, "n": "1.10"}},
    }


def test_ids_are_stable_and_distinct() -> None:
    assert event_id("app", "0/1:0", "t") == event_id("app", "0/1:0", "t")
    assert len({event_id("app", "0/1:0", "t"), event_id("app", "0/1:1", "t"),
                event_id("app", "0/1:0", "u"), event_id("other", "0/1:0", "t")}) == 4
    assert build_event(change({}), T, "a").id == build_event(change({}), T, "b").id


def test_time_is_utc_with_milliseconds() -> None:
    t = datetime(2024, 1, 1, 1, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert iso_time(t) == "2024-01-01T00:00:00.123Z"


def test_lone_surrogates_and_non_finite_numbers_stay_valid_json() -> None:
    body = dumps({"s": "a\ud800b", "f": [float("nan"), float("inf"), -float("inf"), 1.5]})
    parsed = json.loads(body)  # strict parse: no NaN tokens, valid escapes
    assert parsed == {"s": "a\ud800b", "f": ["NaN", "Infinity", "-Infinity", 1.5]}
    assert b"NaN," not in body.replace(b'"NaN"', b"")


def test_an_unencodable_row_is_sent_without_doc_instead_of_stopping_capture() -> None:
    class Bad:
        def __str__(self) -> str:
            raise RuntimeError("no text form")

    ev = build_event(change({"x": Bad()}), T, "src")
    data = json.loads(ev.payload)["data"]
    assert data["doc"] is None and "no text form" in data["error"]
    assert data["docId"] == "1" and ev.type == "DB_INSERT"


def test_raw_json_is_embedded_as_written() -> None:
    doc = {"j": RawJSON('{"amount": 12345678901234567.89, "n": 1e400, "z": -0}'),
           "list": [RawJSON("0.30000000000000001"), RawJSON("[]")], "s": "x"}
    assert dumps(doc) == (b'{"j":{"amount": 12345678901234567.89, "n": 1e400, "z": -0},'
                          b'"list":[0.30000000000000001,[]],"s":"x"}')
    assert RawJSON("1.10").value == Decimal("1.10") and str(RawJSON("[1]")) == "[1]"


def test_a_string_shaped_like_the_placeholder_stays_a_string() -> None:
    lookalike = "\x00" + "0" * 32 + "0\x00"
    assert json.loads(dumps({"s": lookalike, "j": RawJSON("1")})) == {"s": lookalike, "j": 1}


def test_raw_json_beside_a_lone_surrogate_is_escaped_to_ascii() -> None:
    # A lone surrogate forces the ASCII path: the raw text's own non-ASCII is escaped.
    out = dumps({"bad": "\ud800", "j": RawJSON('{"s": "é😀", "n": 1.50}')})
    assert out.isascii()
    assert out == (b'{"bad":"\\ud800","j":{"s": "\\u00e9\\ud83d\\ude00", "n": 1.50}}')
    assert json.loads(out)["j"] == {"s": "é😀", "n": 1.5}


@settings(max_examples=300, deadline=None)
@given(database=st.text(), key=st.text(), trigger=st.text())
def test_event_id_is_uuid5_of_the_change_and_trigger(database: str, key: str,
                                                     trigger: str) -> None:
    # uuid5 encodes its name as UTF-8: text with lone surrogates is not a name.
    assume(all(not 0xD800 <= ord(c) <= 0xDFFF for c in database + key + trigger))
    assert event_id(database, key, trigger) == str(
        uuid.uuid5(NAMESPACE, f"{database}\x00{key}\x00{trigger}"))


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(st.text(max_size=5), st.none() | st.booleans() | st.integers()
                           | st.floats() | st.text(max_size=8), max_size=4),
       source=st.text(max_size=8), op=st.sampled_from(list(Operation)),
       when=st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))])))
def test_the_envelope_is_the_payload_dict_encoded(doc: dict[str, object], source: str,
                                                  op: Operation, when: datetime) -> None:
    """build_event writes the envelope around `data` itself: byte for byte what
    encoding the whole payload dict gives, lone surrogates and NaN included."""
    change = Change("app", "sql-postgres", "items", op, "0/1:2", when, "7", doc, {"old": None})
    ev = build_event(change, Trigger(name="t", url="http://x"), source)
    assert ev.payload == dumps(payload(change, ev.id, source))
