import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import pytest

from testsupport.receiver import Receiver, Reply, ThreadedReceiver


def post(url: str, body: bytes = b"{}", timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_records_every_request(receiver: ThreadedReceiver) -> None:
    before = time.monotonic()
    request = urllib.request.Request(
        receiver.url("/hook") + "?a=1",
        data=json.dumps({"id": 7}).encode(),
        method="POST",
        headers={"webhook-id": "evt-1", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    [got] = receiver.requests("/hook")
    assert (got.method, got.path, got.query_string) == ("POST", "/hook", "a=1")
    assert got.headers["Webhook-Id"] == "evt-1"  # case-insensitive
    assert got.json() == {"id": 7}
    assert before <= got.received_monotonic <= time.monotonic()
    assert abs(got.received_at - time.time()) < 5
    assert receiver.requests("/other") == []


def test_status_sequence_then_last_repeats(receiver: ThreadedReceiver) -> None:
    receiver.script("/hook", 500, 500, 200)
    assert [post(receiver.url())[0] for _ in range(4)] == [500, 500, 200, 200]
    receiver.script("*", 404)
    assert post(receiver.url("/anything"))[0] == 404


def test_retry_after_with_429_and_503(receiver: ThreadedReceiver) -> None:
    receiver.script("/hook", Reply(429, retry_after=2), Reply(503, retry_after=1), 200)
    assert [(s, h.get("Retry-After")) for s, h in (post(receiver.url()) for _ in range(3))] == [
        (429, "2"),
        (503, "1"),
        (200, None),
    ]


def test_delay_outlasts_a_client_timeout(receiver: ThreadedReceiver) -> None:
    receiver.script("/slow", Reply(delay=10.0), 200)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        post(receiver.url("/slow"), timeout=0.2)
    assert time.monotonic() - started < 5  # the client gave up long before the reply
    # Recorded on arrival, before the delay (the receiver's thread may get there
    # after the client gave up, but long before the 10 s reply).
    assert len(receiver.wait_for(1, "/slow", timeout=5)) == 1
    assert post(receiver.url("/slow"))[0] == 200


def test_random_delay_stays_in_range() -> None:
    with ThreadedReceiver(seed=1) as rec:
        rec.script("/jitter", Reply(delay=(0.05, 0.1)))
        for _ in range(3):
            started = time.monotonic()
            assert post(rec.url("/jitter"))[0] == 200
            assert 0.05 <= time.monotonic() - started < 5


def test_reset_aborts_the_connection(receiver: ThreadedReceiver) -> None:
    receiver.script("/flaky", "reset", 200)
    with pytest.raises(
        (ConnectionResetError, http.client.RemoteDisconnected, urllib.error.URLError)
    ):
        post(receiver.url("/flaky"))
    assert post(receiver.url("/flaky"))[0] == 200
    assert [r.reply.reset for r in receiver.requests("/flaky")] == [True, False]


def test_wait_for_blocks_until_requests_arrive(receiver: ThreadedReceiver) -> None:
    def send_later() -> None:
        time.sleep(0.1)
        for _ in range(2):
            post(receiver.url())

    threading.Thread(target=send_later).start()
    assert len(receiver.wait_for(2, "/hook", timeout=5)) == 2
    with pytest.raises(TimeoutError, match="expected 3 requests to /hook"):
        receiver.wait_for(3, "/hook", timeout=0.1)


def test_stop_does_not_wait_for_slow_replies() -> None:
    rec = ThreadedReceiver().start()
    rec.script("/slow", Reply(delay=30))

    def hang() -> None:
        with pytest.raises(OSError):  # the connection dies with the receiver
            post(rec.url("/slow"), timeout=5)

    client = threading.Thread(target=hang)
    client.start()
    rec.wait_for(1)
    started = time.monotonic()
    rec.stop()
    client.join()
    assert time.monotonic() - started < 3


@pytest.mark.asyncio
async def test_async_receiver_on_the_running_loop() -> None:
    async with Receiver() as rec, aiohttp.ClientSession() as session:
        rec.script("/hook", "reset", Reply(503, retry_after=3), Reply(delay=0.5), 200)
        with pytest.raises(aiohttp.ClientError):
            await session.post(rec.url(), json={"n": 1})
        async with session.post(rec.url(), json={"n": 2}) as response:
            assert (response.status, response.headers["Retry-After"]) == (503, "3")
        with pytest.raises(TimeoutError):
            await session.post(rec.url(), json={"n": 3}, timeout=aiohttp.ClientTimeout(total=0.1))
        async with session.post(rec.url(), json={"n": 4}) as response:
            assert response.status == 200
        got = await rec.wait_for(4, "/hook", timeout=2)
        assert [r.json()["n"] for r in got] == [1, 2, 3, 4]
        with pytest.raises(TimeoutError):
            await rec.wait_for(5, timeout=0.1)
