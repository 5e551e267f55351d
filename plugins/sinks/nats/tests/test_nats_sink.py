"""The NATS sink against a private nats-server with JetStream on 127.0.0.1."""

from __future__ import annotations

import importlib.metadata as md
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from dbevents import ConfigError, Trigger
from dbevents.testing import SinkContract, isolated_plugins, make_event, parse_config
from dbevents_sink_nats import NatsOptions, NatsSink
from dbevents_sink_nats.sink import mask_servers
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from plugins.sinks.nats.tests.conftest import Stream
from testsupport.nats_server import NatsServer
from testsupport.ports import free_port


def trigger(url: str, name: str = "t", timeout: int = 2000, **options: Any) -> Trigger:
    return Trigger(name=name, url=url, sink="nats", timeout=timeout,
                   sink_options=NatsOptions(**options))


def subject_in(stream: Stream) -> str:
    return f"{stream.prefix}.{{trigger}}.{{table}}.{{type}}"


async def message_count(js: JetStreamContext, stream: Stream) -> int:
    info = await js.stream_info(stream.name)
    return int(info.state.messages)


# -- the contract every sink keeps -------------------------------------------------


class TestNatsSinkContract(SinkContract):
    @pytest.fixture
    def ok_trigger(self, nats_server: NatsServer, stream: Stream) -> Trigger:
        return trigger(nats_server.url, "ok", subject=subject_in(stream), stream=stream.name)

    @pytest.fixture
    def failing_trigger(self, nats_server: NatsServer, stream: Stream) -> Trigger:
        # Nothing stores this subject: the server answers "no responders".
        return trigger(nats_server.url, "fail", subject=f"nowhere.{stream.prefix}.{{trigger}}")

    @pytest.fixture
    async def silent_trigger(self, nats_server: NatsServer, client: Client,
                             stream: Stream) -> AsyncIterator[Trigger]:
        # A plain subscriber takes the message and never acks it, as a stuck
        # stream leader would.
        async def ignore(msg: Msg) -> None:
            return None

        sub = await client.subscribe(f"silent.{stream.prefix}.>", cb=ignore)
        yield trigger(nats_server.url, "silent", timeout=300,
                      subject=f"silent.{stream.prefix}.{{trigger}}")
        await sub.unsubscribe()


class TestNatsSinkContractBatched(TestNatsSinkContract):
    @pytest.fixture
    def ok_trigger(self, nats_server: NatsServer, stream: Stream) -> Trigger:
        return trigger(nats_server.url, "ok", subject=subject_in(stream), stream=stream.name,
                       batch_size=3)


# -- what lands in the stream ------------------------------------------------------


async def test_the_message_is_the_cloudevent_with_the_event_id_header(
        sink: NatsSink, nats_server: NatsServer, js: JetStreamContext,
        stream: Stream) -> None:
    ev = make_event(trigger="orders", table="public.orders")
    [out] = await sink.deliver(trigger(nats_server.url, "orders", subject=subject_in(stream)),
                               [ev])
    assert out.ok, out.error
    ack = json.loads(out.response_body or "")
    # The table's "." would split the subject into more tokens: it becomes "_".
    assert ack == {"stream": stream.name, "seq": 1, "duplicate": False,
                   "subject": f"{stream.prefix}.orders.public_orders.DB_INSERT"}
    assert out.request_headers == {"Nats-Msg-Id": ev.id}
    msg = await js.get_msg(stream.name, 1)
    assert msg.subject == ack["subject"]
    assert msg.data == ev.payload  # byte for byte as stored
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == ev.id
    assert json.loads(msg.data)["id"] == ev.id


async def test_a_redelivery_is_deduplicated_by_jetstream(
        sink: NatsSink, nats_server: NatsServer, js: JetStreamContext,
        stream: Stream) -> None:
    t = trigger(nats_server.url, subject=subject_in(stream))
    ev = make_event(trigger="t")
    [first] = await sink.deliver(t, [ev])
    [again] = await sink.deliver(t, [ev])
    assert first.ok and again.ok  # a duplicate ack is a success
    assert json.loads(again.response_body or "") == {**json.loads(first.response_body or ""),
                                                     "duplicate": True}
    assert await message_count(js, stream) == 1


async def test_a_batch_publishes_all_and_shares_a_request_id(
        sink: NatsSink, nats_server: NatsServer, js: JetStreamContext,
        stream: Stream) -> None:
    t = trigger(nats_server.url, subject=subject_in(stream), batch_size=50)
    assert sink.batch_size(t) == 50
    evs = [make_event(trigger="t", doc_id=str(i)) for i in range(50)]
    outs = await sink.deliver(t, evs)
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
    assert {o.batch_size for o in outs} == {50}
    assert len({o.request_id for o in outs}) == 1 and outs[0].request_id
    seqs = [json.loads(o.response_body or "")["seq"] for o in outs]
    assert sorted(seqs) == list(range(1, 51))
    assert [o.request_headers["Nats-Msg-Id"] for o in outs] == [e.id for e in evs]
    assert await message_count(js, stream) == 50
    by_id = {}
    for seq in seqs:
        msg = await js.get_msg(stream.name, seq)
        assert msg.headers is not None
        by_id[msg.headers["Nats-Msg-Id"]] = msg.data
    assert by_id == {e.id: e.payload for e in evs}
    # The whole batch again: every message is a duplicate, nothing is added.
    again = await sink.deliver(t, evs)
    assert all(o.ok and json.loads(o.response_body or "")["duplicate"] for o in again)
    assert await message_count(js, stream) == 50


async def test_a_batch_reports_each_event_on_its_own(
        sink: NatsSink, nats_server: NatsServer, js: JetStreamContext,
        stream: Stream) -> None:
    # {table} picks a subject the stream captures for one table and not the other.
    t = trigger(nats_server.url, subject="{table}.x", batch_size=2)
    await js.update_stream(name=stream.name, subjects=[f"{stream.prefix}.>", "kept.x"])
    kept, lost = make_event(trigger="t", table="kept"), make_event(trigger="t", table="lost")
    out_kept, out_lost = await sink.deliver(t, [kept, lost])
    assert out_kept.ok and not out_lost.ok
    assert out_lost.error == "no stream captures subject 'lost.x'"
    assert out_kept.request_id == out_lost.request_id


# -- the stream option -------------------------------------------------------------


async def test_a_missing_stream_is_a_clear_failed_attempt(
        sink: NatsSink, nats_server: NatsServer, stream: Stream) -> None:
    t = trigger(nats_server.url, subject=subject_in(stream), stream="NO_SUCH_STREAM")
    [out] = await sink.deliver(t, [make_event(trigger="t")])
    assert not out.ok and not out.give_up
    assert out.error == f"stream 'NO_SUCH_STREAM' does not exist on {nats_server.url}"


async def test_a_subject_stored_by_another_stream_is_refused(
        sink: NatsSink, nats_server: NatsServer, js: JetStreamContext,
        stream: Stream) -> None:
    other = f"O_{stream.name}"
    await js.add_stream(name=other, subjects=[f"other.{stream.prefix}"])
    try:
        t = trigger(nats_server.url, subject=subject_in(stream), stream=other)
        [out] = await sink.deliver(t, [make_event(trigger="t")])
        assert not out.ok
        assert out.error == (f"subject '{stream.prefix}.t.users.DB_INSERT' is captured by "
                             f"another stream, not '{other}'")
        assert await message_count(js, stream) == 0
        assert out.request_headers["Nats-Expected-Stream"] == other
    finally:
        await js.delete_stream(other)


async def test_a_stream_that_does_not_capture_the_subject(
        sink: NatsSink, nats_server: NatsServer, stream: Stream) -> None:
    t = trigger(nats_server.url, subject="elsewhere.{trigger}", stream=stream.name)
    [out] = await sink.deliver(t, [make_event(trigger="t")])
    assert not out.ok
    assert out.error == f"stream '{stream.name}' does not capture subject 'elsewhere.t'"


# -- connections -------------------------------------------------------------------


async def test_no_server_is_a_failed_outcome_with_the_credentials_masked(
        sink: NatsSink) -> None:
    port = free_port()
    t = trigger(f"nats://ann:pw-s3cret@127.0.0.1:{port}", timeout=1000)
    with structlog.testing.capture_logs() as logs:
        [out] = await sink.deliver(t, [make_event(trigger="t")])
    assert not out.ok and not out.give_up
    assert out.error == f"connection refused: nats://***@127.0.0.1:{port}"
    assert "s3cret" not in repr(out) + repr(logs)
    tok = trigger(f"nats://tok-s3cret-42@127.0.0.1:{port}", timeout=1000)
    [out] = await sink.deliver(tok, [make_event(trigger="t")])
    assert not out.ok and "s3cret" not in repr(out)


async def test_the_sink_reconnects_after_the_server_restarts(
        js: JetStreamContext, stream: Stream, tmp_path: Any) -> None:
    # Its own server: restarting the session's would disturb the other tests.
    server = NatsServer().start()
    sink = NatsSink()
    await sink.open()
    try:
        import nats

        nc = await nats.connect(server.url)
        await nc.jetstream().add_stream(name="R", subjects=["r.>"])
        await nc.close()
        t = trigger(server.url, subject="r.{trigger}", timeout=1000)
        [before] = await sink.deliver(t, [make_event(trigger="t")])
        assert before.ok, before.error
        server._shutdown()
        [down] = await sink.deliver(t, [make_event(trigger="t")])
        assert not down.ok and down.error
        server.restart()
        # The old connection may still be reconnecting: a few attempts, as the
        # dispatcher's retries would make.
        for _ in range(20):
            [after] = await sink.deliver(t, [make_event(trigger="t")])
            if after.ok:
                break
        assert after.ok, after.error
        assert json.loads(after.response_body or "")["stream"] == "R"
    finally:
        await sink.close()
        server.stop()


async def test_triggers_on_one_server_share_one_connection(
        sink: NatsSink, nats_server: NatsServer, client: Client, stream: Stream) -> None:
    a = trigger(nats_server.url, "a", subject=subject_in(stream))
    b = trigger(nats_server.url, "b", subject=subject_in(stream), batch_size=5)
    for t in (a, b):
        [out] = await sink.deliver(t, [make_event(trigger=t.name)])
        assert out.ok, out.error
    assert len(sink._connections) == 1
    await sink.close()
    assert sink._connections == {}
    [out] = await sink.deliver(a, [make_event(trigger="a")])
    assert not out.ok and "not open" in (out.error or "")


# -- config ------------------------------------------------------------------------


def config_text(url: str, **keys: Any) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return f"""
[eventing]
store = "memory://cfg"

[databases.app]
type = "memory"
url = "memory://cfg"

[[triggers]]
name = "orders"
sink = "nats"
url = "{url}"
{extra}"""


def nats_plugins() -> Any:
    import dbevents_sink_nats.plugin as module

    return isolated_plugins(("sink-nats", module))


def test_the_trigger_keys_load_into_options() -> None:
    config = parse_config(config_text("nats://127.0.0.1:4222", subject="ev.{database}.{table}",
                                      stream="EV", batch_size=100), nats_plugins())
    [t] = config.triggers
    assert t.sink_options == NatsOptions(subject="ev.{database}.{table}", stream="EV",
                                         batch_size=100)


@pytest.mark.parametrize(("keys", "where", "words"), [
    ({"subject": "ev.{trigger}.{tabel}"}, "triggers[0].subject",
     "unknown placeholder {tabel} in 'ev.{trigger}.{tabel}'"),
    ({"subject": "ev.{table:>10}"}, "triggers[0].subject", "unknown placeholder {table:>10}"),
    ({"subject": "ev.*.{table}"}, "triggers[0].subject", "is not a subject to publish to"),
    ({"subject": "ev..{table}"}, "triggers[0].subject", "has an empty token"),
    ({"stream": "a.b"}, "triggers[0].stream", "is not a JetStream stream name"),
    ({"batch_size": 0}, "triggers[0].batch_size", "batch_size must be an integer from 1"),
])
def test_bad_options_are_config_errors_naming_the_key(
        keys: dict[str, Any], where: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config_text("nats://127.0.0.1:4222", **keys), nats_plugins())
    assert where in str(err.value) and words in str(err.value)


@pytest.mark.parametrize(("url", "words"), [
    ("http://127.0.0.1:4222", "expected a nats:// or tls:// URL"),
    ("nats://127.0.0.1:4222/orders", "has no path or query"),
    ("nats://127.0.0.1:notaport", "not a NATS server URL"),
])
def test_a_bad_url_is_a_config_error(url: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config_text(url), nats_plugins())
    assert "triggers[0].url" in str(err.value) and words in str(err.value)


def test_cluster_urls_and_tls_are_accepted() -> None:
    NatsSink.validate_target("nats://a:4222,nats://b:4222", None)
    NatsSink.validate_target("tls://user:pw@nats.example.com:4222", None)
    assert mask_servers("tls://user:pw@h:1,nats://tok@g:2") == "tls://***@h:1,nats://***@g:2"


def test_the_entry_point_registers_the_nats_sink() -> None:
    [ep] = [e for e in md.entry_points(group="dbevents") if e.name == "sink-nats"]
    assert ep.dist is not None and ep.dist.name == "dbevents-sink-nats"
    plugins = isolated_plugins(("sink-nats", ep.load()), memory=False)
    assert plugins.get("sink", "nats") is NatsSink
