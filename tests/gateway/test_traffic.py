"""The traffic port's HTTP server, in process on uvloop, driven over real sockets.

The handler here records what the server made of each request and answers
by what the path asks; every test sends raw bytes, as a hostile caller
would, and checks the exact answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncIterator
from typing import Any, cast

import msgspec
import pytest

from gateway.traffic import Handler, TrafficRequest, TrafficServer
from tests.fixtures.stack import exchange_raw

UVLOOP = True  # the loop the gateway runs on (see tests/conftest.py)


class Recorder:
    """The handler: records requests, answers as the path says."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []
        self.release = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, request: TrafficRequest) -> None:
        body = b""
        path = request.target
        if path.startswith("/reject"):
            # Answers without reading the body, as a refusal does.
            self._record(request, None)
            request.send_error(401, "unauthorized", "no", {"WWW-Authenticate": "x"})
            return
        if path.startswith("/early"):
            # Answers as a relayed agent may: at once, the body still coming.
            self._record(request, None)
            request.send_head(
                200,
                b"OK",
                b"Content-Length: 2\r\n",
                length_known=True,
                has_date=True,
                data=b"ok",
                last=True,
            )
            return
        if path.startswith("/continue"):
            request.send_continue()
        if request.body is not None:
            while data := await request.body.read():
                body += data
        self._record(request, body)
        if path.startswith("/wait"):
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if path.startswith("/big"):
            # More than the sockets between caller and server hold.
            answer = b"x" * (16 * 1024 * 1024)
            lines = b"Content-Length: %d\r\n" % len(answer)
            request.send_head(
                200, b"OK", lines, length_known=True, has_date=True, data=answer
            )
            request.end()
            return
        if path.startswith("/flood"):
            request.send_head(200, b"OK", b"", length_known=False, has_date=True)
            while True:
                await request.send_body(b"x" * 65536)
        if path.startswith("/stream"):
            request.send_head(200, b"OK", b"", length_known=False, has_date=True)
            for piece in (b"one", b"two"):
                await request.send_body(piece)
            request.end(b"three")
            return
        answer = msgspec.json.encode({"n": len(self.seen), "body": body.decode()})
        lines = b"Content-Length: %d\r\n" % len(answer)
        request.send_head(
            200, b"OK", lines, length_known=True, has_date=True, data=answer, last=True
        )

    def _record(self, request: TrafficRequest, body: bytes | None) -> None:
        self.seen.append(
            {
                "method": request.method,
                "target": request.target,
                "version": request.version,
                "headers": list(request.headers.items()),
                "host": request.host,
                "length": request.content_length,
                "body": body,
            }
        )


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


class Server:
    def __init__(self, server: TrafficServer, port: int) -> None:
        self.server = server
        self.port = port


async def _start(handler: Handler, **settings: Any) -> tuple[TrafficServer, int]:
    """A server listening on a free port of 127.0.0.1, and that port."""
    settings.setdefault("max_header_size", 1024)
    settings.setdefault("header_timeout_s", 5)
    server = TrafficServer(handler, **settings)
    await server.listen("127.0.0.1", 0)
    return server, server._listeners[0].sockets[0].getsockname()[1]


@pytest.fixture
async def served(recorder: Recorder) -> AsyncIterator[Server]:
    server, port = await _start(recorder, header_timeout_s=0.3)
    yield Server(server, port)
    await server.close()


def _statuses(answer: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)


_BAD = b'{"error":"bad_request","message":"Malformed HTTP request"}'


@pytest.mark.parametrize(
    "head",
    [
        # Both framings: which one ends the body is where smuggling starts.
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Content-Length: 5\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        # Else it would pass the drop of the gateway's own identity headers.
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-Auth-Subject : admin\r\n\r\n",
        # A name is a token: the gateway reads names as ASCII.
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-N\xe9: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\n folded: line\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX: a\r\n  folded\r\n\r\n",
        b"GET /x HTTP/1.1\nHost: a\n\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nX\x7f: a\r\n\r\n",
        b"GET /x y HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"G\x01T /x HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
    ids=[
        "cl-then-te",
        "te-then-cl",
        "two-lengths",
        "length-list",
        "signed-length",
        "chunked-not-last",
        "space-before-colon",
        "space-before-colon-identity",
        "non-ascii-name",
        "fold-first",
        "fold-later",
        "bare-lf",
        "nul-in-value",
        "control-in-name",
        "space-in-target",
        "no-host",
        "two-hosts",
        "bad-method",
    ],
)
async def test_traffic_malformed_head_is_400_and_nothing_after_it_is_parsed(
    served: Server, recorder: Recorder, head: bytes
) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"

    answer = await exchange_raw(served.port, head + b"abcd" + smuggled)

    assert _statuses(answer) == [b"400"]
    assert answer.endswith(b"\r\nConnection: close\r\n\r\n" + _BAD)
    assert recorder.seen == []


@pytest.mark.parametrize("split", [False, True], ids=["one-read", "later-read"])
async def test_traffic_bad_chunk_is_400_and_nothing_after_it_is_parsed(
    served: Server, recorder: Recorder, split: bool
) -> None:
    head = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    rest = b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(head)
    if split:
        # The handler is reading the body when the bad chunk comes.
        await asyncio.sleep(0.1)
    writer.write(rest)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert _statuses(answer) == [b"400"]
    assert answer.endswith(b"\r\nConnection: close\r\n\r\n" + _BAD)
    assert recorder.seen == []


async def test_traffic_chunked_body_is_decoded_with_no_length(
    served: Server, recorder: Recorder
) -> None:
    request = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )

    answer = await exchange_raw(served.port, request)

    assert answer.endswith(b'{"n":1,"body":"abcde"}')
    assert recorder.seen[0]["length"] is None
    names = [name for name, _ in recorder.seen[0]["headers"]]  # type: ignore[attr-defined]
    assert "X-Trailer" not in names


async def test_traffic_pipelined_requests_are_answered_in_order(
    served: Server, recorder: Recorder
) -> None:
    requests = (
        b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\none"
        b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nthree"
    )

    answer = await exchange_raw(served.port, requests)

    bodies = re.findall(rb'\{"n":\d,"body":"\w*"\}', answer)
    assert bodies == [
        b'{"n":1,"body":"one"}',
        b'{"n":2,"body":""}',
        b'{"n":3,"body":"three"}',
    ]
    assert [seen["target"] for seen in recorder.seen] == ["/a", "/b", "/c"]


async def test_traffic_malformed_request_after_good_ones_is_answered_last(
    served: Server, recorder: Recorder
) -> None:
    requests = (
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n"
    )

    answer = await exchange_raw(served.port, requests)

    assert _statuses(answer) == [b"200", b"400"]
    assert answer.endswith(_BAD)
    assert [seen["target"] for seen in recorder.seen] == ["/a"]


async def test_traffic_header_values_lose_surrounding_whitespace_only(
    served: Server, recorder: Recorder
) -> None:
    request = (
        b"GET /x HTTP/1.1\r\nHost: a\r\nX-V: \t a \t b \t\r\nConnection: close\r\n\r\n"
    )

    await exchange_raw(served.port, request)

    assert ("X-V", "a \t b") in recorder.seen[0]["headers"]  # type: ignore[operator]


async def test_traffic_header_bytes_that_are_not_utf8_survive_the_round_trip(
    served: Server, recorder: Recorder
) -> None:
    request = b"GET /x HTTP/1.1\r\nHost: a\r\nX-N: caf\xe9\r\nConnection: close\r\n\r\n"

    await exchange_raw(served.port, request)

    value = dict(recorder.seen[0]["headers"])["X-N"]  # type: ignore[call-overload]
    assert value.encode("utf-8", "surrogateescape") == b"caf\xe9"


async def test_traffic_target_must_be_ascii(served: Server, recorder: Recorder) -> None:
    # RFC 3986: other bytes are percent-encoded; a raw one is refused.
    request = b"GET /caf\xe9 HTTP/1.1\r\nHost: a\r\n\r\n"

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [b"400"]
    assert recorder.seen == []


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"X-L: " + b"v" * (1024 - 5), b"200"),
        (b"X-L: " + b"v" * (1024 - 4), b"431"),
        (b"X-" + b"n" * 1020 + b": v", b"431"),
    ],
    ids=["at-limit", "over-by-one", "long-name"],
)
async def test_traffic_header_line_limit_is_exact(
    served: Server, line: bytes, status: bytes
) -> None:
    request = b"GET /x HTTP/1.1\r\nHost: a\r\n%b\r\nConnection: close\r\n\r\n" % line

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [status]
    assert b"vvvv" not in answer.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(("count", "status"), [(100, b"200"), (101, b"431")])
async def test_traffic_header_line_count_is_bounded_exactly(
    served: Server, recorder: Recorder, count: int, status: bytes
) -> None:
    # Host and Connection count as lines too.
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(count - 2))
    request = b"GET /x HTTP/1.1\r\nHost: a\r\n%bConnection: close\r\n\r\n" % lines

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [status]
    if status == b"431":
        assert recorder.seen == []
        assert answer.endswith(
            b'{"error":"header_too_large","message":'
            b'"The request has more header lines than the gateway accepts"}'
        )
    else:
        assert len(recorder.seen[0]["headers"]) == 100  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("lines", "status"),
    [(100, b"200"), (101, b"431"), (60000, b"431")],
    ids=["at-limit", "over-by-one", "many"],
)
async def test_traffic_trailer_lines_are_bounded_as_head_lines(
    served: Server, lines: int, status: bytes
) -> None:
    # Trailers are parsed though never passed on: each line costs as much.
    trailers = b"a: b\r\n" * lines
    request = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n%b\r\n" % trailers
    )

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [status]
    if status == b"431":
        assert answer.endswith(
            b'{"error":"header_too_large","message":'
            b'"The request has more header lines than the gateway accepts"}'
        )


async def test_traffic_trailer_section_is_bounded_in_bytes_exactly(
    served: Server,
) -> None:
    # 80 lines of 1,000 bytes: within the count, past 4 lines and 64 KiB.
    trailers = b"".join(b"X-%d: %b\r\n" % (i, b"v" * 1000) for i in range(80))
    request = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n%b\r\n" % trailers
    )

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [b"431"]
    assert answer.endswith(
        b'{"error":"header_too_large",'
        b'"message":"The request headers are larger than the gateway accepts"}'
    )


async def test_traffic_header_line_count_is_configurable(recorder: Recorder) -> None:
    server, port = await _start(recorder, max_header_count=8)
    try:
        lines = b"".join(b"X-%d: v\r\n" % i for i in range(8))
        answer = await exchange_raw(
            port, b"GET /x HTTP/1.1\r\nHost: a\r\n%b\r\n" % lines
        )
        assert _statuses(answer) == [b"431"]
        # The refusal closed that connection alone: the server goes on.
        answer = await exchange_raw(
            port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert _statuses(answer) == [b"200"]
    finally:
        await server.close()


async def test_traffic_head_as_a_whole_is_bounded(served: Server) -> None:
    # Each line is within the limit; together they pass 4 lines and 64 KiB.
    lines = b"".join(b"X-%d: %b\r\n" % (i, b"v" * 1000) for i in range(80))
    request = b"GET /x HTTP/1.1\r\nHost: a\r\n%b\r\n" % lines

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [b"431"]
    assert answer.endswith(
        b'{"error":"header_too_large",'
        b'"message":"The request headers are larger than the gateway accepts"}'
    )


async def test_traffic_endless_header_line_is_refused_without_waiting_for_its_end(
    served: Server,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Endless: ")
    with contextlib.suppress(ConnectionError):
        for _ in range(200):
            writer.write(b"v" * 1024)
            await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert _statuses(answer) == [b"431"]


async def test_traffic_upgrade_is_answered_as_http_then_closed(
    served: Server, recorder: Recorder
) -> None:
    request = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n"
        b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    )

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [b"200"]
    assert b"\r\nConnection: close\r\n" in answer
    assert [seen["target"] for seen in recorder.seen] == ["/ws"]


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: 4", b"abcd"),
        (b"Transfer-Encoding: chunked", b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"),
    ],
    ids=["length", "chunked"],
)
async def test_traffic_upgrade_request_body_is_read_and_nothing_after_it(
    served: Server, recorder: Recorder, framing: bytes, body: bytes
) -> None:
    # As curl --http2 sends a POST to an http:// URL.
    request = (
        b"POST /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n%b\r\n\r\n%b"
        b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n" % (framing, body)
    )

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [b"200"]
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b'{"n":1,"body":"abcd"}')
    assert [seen["target"] for seen in recorder.seen] == ["/h2c"]


async def test_traffic_upgrade_request_with_a_broken_body_is_400(
    served: Server, recorder: Recorder
) -> None:
    request = (
        b"POST /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    )

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [b"400"]
    assert answer.endswith(_BAD)
    assert recorder.seen == []


async def test_traffic_expect_continue_gets_100_before_the_answer(
    served: Server, recorder: Recorder
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(
        b"POST /continue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.write(b"ok")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer.endswith(b'{"n":1,"body":"ok"}')


async def test_traffic_answer_before_the_body_ends_drops_the_rest_then_closes(
    served: Server, recorder: Recorder
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /reject HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    # The rest of the body, and a request hidden in it: neither is parsed.
    writer.write(b"GET /hidden HTTP/1.1\r\nHost: a\r\n\r\n" + b"x" * 99966)
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nWWW-Authenticate: x\r\n" in head
    # Said in the answer: a caller that took the connection for reusable
    # would lose its next request in the bytes dropped.
    assert head.endswith(b"\r\nConnection: close\r\n\r\n")
    assert rest == b'{"error":"unauthorized","message":"no"}'
    assert [seen["target"] for seen in recorder.seen] == ["/reject"]


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 100000", b"Transfer-Encoding: chunked"]
)
async def test_traffic_any_answer_before_the_body_ends_says_the_connection_closes(
    served: Server, recorder: Recorder, framing: bytes
) -> None:
    # Not only the gateway's own answers: an agent's, relayed, too. Else the
    # caller reuses the connection, and its next request is lost.
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /early HTTP/1.1\r\nHost: a\r\n%b\r\n\r\n" % framing)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.write(b"5\r\nhello\r\n" if b"chunked" in framing else b"x" * 1000)
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n")
    assert head.endswith(b"\r\nConnection: close\r\n\r\n")
    assert rest == b"ok"
    assert [seen["target"] for seen in recorder.seen] == ["/early"]


async def test_traffic_answer_after_the_whole_body_keeps_the_connection(
    served: Server, recorder: Recorder
) -> None:
    request = b"POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"

    answer = await exchange_raw(served.port, request + request, wait_s=0.5)

    assert _statuses(answer) == [b"200", b"200"]
    assert b"Connection: close" not in answer
    assert answer.endswith(b"ok<OPEN>")


async def test_traffic_streamed_answer_is_chunked_for_http11_and_closed_for_http10(
    served: Server,
) -> None:
    http11 = await exchange_raw(
        served.port, b"GET /stream HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    http10 = await exchange_raw(served.port, b"GET /stream HTTP/1.0\r\n\r\n")

    assert http11 == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n0\r\n\r\n"
    )
    assert http10 == b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nonetwothree"


async def test_traffic_http10_keep_alive_is_said_and_kept(served: Server) -> None:
    answer = await exchange_raw(
        served.port, b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 0.5
    )

    assert answer.startswith(b"HTTP/1.0 200 OK\r\nContent-Length: 17\r\n")
    assert b"\r\nConnection: keep-alive\r\n\r\n" in answer
    assert answer.endswith(b"<OPEN>")


async def test_traffic_head_answer_has_no_body(served: Server) -> None:
    answer = await exchange_raw(
        served.port, b"HEAD /reject HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )

    assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"\r\nContent-Length: 39\r\n" in answer
    assert answer.endswith(b"\r\n\r\n")


async def test_traffic_caller_going_away_cancels_its_request(
    served: Server, recorder: Recorder
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(100):
        if recorder.seen:
            break
        await asyncio.sleep(0.01)
    writer.transport.abort()
    for _ in range(100):
        if recorder.cancelled:
            break
        await asyncio.sleep(0.01)

    assert recorder.cancelled == 1
    assert served.server.connections == set()


async def test_traffic_head_not_complete_in_time_is_closed(served: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n")

    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_traffic_slow_pipelined_head_does_not_cut_the_answer_in_progress(
    served: Server, recorder: Recorder
) -> None:
    # The next head's time runs while the caller waits for this answer; it
    # is not the caller's to be cut for.
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\n")
    await asyncio.sleep(0.6)  # twice the head timeout
    writer.write(b"Host: a\r\nConnection: close\r\n\r\n")
    recorder.release.set()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert _statuses(answer) == [b"200", b"200"]
    assert recorder.cancelled == 0


async def test_traffic_idle_keep_alive_connection_is_closed_after_the_timeout(
    recorder: Recorder,
) -> None:
    server, port = await _start(recorder, keepalive_s=0.2)
    try:
        answer = await exchange_raw(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", 4)
    finally:
        await server.close()

    assert answer.endswith(b'{"n":1,"body":""}')  # closed by the server, not <OPEN>


async def test_traffic_drain_closes_idle_connections_and_finishes_busy_ones(
    served: Server, recorder: Recorder
) -> None:
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", served.port)
    idle_writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    await idle_reader.readuntil(b"}")
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", served.port)
    busy_writer.write(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(100):
        if len(recorder.seen) == 2:
            break
        await asyncio.sleep(0.01)

    drain = asyncio.create_task(served.server.drain(5.0, 1.0))
    assert await asyncio.wait_for(idle_reader.read(), 2) == b""
    recorder.release.set()
    busy = await asyncio.wait_for(busy_reader.read(), 2)
    busy_writer.close()  # the caller has its answer: the drain is over

    assert await drain == 0
    assert b"\r\nConnection: close\r\n" in busy
    assert busy.endswith(b'{"n":2,"body":""}')
    idle_writer.close()


async def test_traffic_drain_cuts_what_outlasts_the_grace(
    served: Server, recorder: Recorder
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(100):
        if recorder.seen:
            break
        await asyncio.sleep(0.01)

    assert await served.server.drain(0.2, 1.0) == 1
    assert await asyncio.wait_for(reader.read(), 2) == b""
    assert recorder.cancelled == 1
    writer.close()


async def test_traffic_access_log_names_the_request_without_its_query(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    server, port = await _start(recorder, access_log_enabled=True)
    request = (
        b"GET /x?access_token=s3cr3t HTTP/1.1\r\nHost: a\r\n"
        b"Authorization: Bearer s3cr3t\r\nConnection: close\r\n\r\n"
    )
    with caplog.at_level(logging.INFO, logger="agw.gateway.access"):
        await exchange_raw(port, request)
    await server.close()

    assert [r.getMessage() for r in caplog.records] == [
        '127.0.0.1 "GET /x HTTP/1.1" 200'
    ]


async def test_traffic_head_bound_holds_for_a_head_after_a_pipelined_one(
    served: Server,
) -> None:
    # The second head starts in the read that ends the first: it is bounded
    # all the same.
    lines = b"".join(b"X-%d: %b\r\n" % (i, b"v" * 1000) for i in range(80))
    first = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    request = first + b"GET /b HTTP/1.1\r\nHost: a\r\n%b\r\n" % lines

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [b"200", b"431"]


async def test_traffic_head_bound_does_not_count_a_body_read_between_two_heads(
    served: Server, recorder: Recorder
) -> None:
    # One read ends the first head, holds its whole body and begins the next
    # head: none of those bytes belong to a head that is too large.
    body = b"b" * 100_000
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"POST /a HTTP/1.1\r\nHost: a\r\n")
    await asyncio.sleep(0.1)
    writer.write(
        b"Content-Length: %d\r\n\r\n%bGET /b HTTP/1.1\r\nHost: a\r\n"
        % (len(body), body)
    )
    await asyncio.sleep(0.1)
    writer.write(b"Connection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert _statuses(answer) == [b"200", b"200"]
    assert [seen["target"] for seen in recorder.seen] == ["/a", "/b"]


async def test_traffic_endless_trailer_is_refused_without_waiting_for_its_end(
    served: Server, recorder: Recorder
) -> None:
    # Trailers are dropped, but a line without end grows in the parser's
    # buffer all the same: the trailer section is bounded as a head is.
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Endless: "
    )
    with contextlib.suppress(ConnectionError):
        for _ in range(200):
            writer.write(b"v" * 1024)
            await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()

    assert _statuses(answer) == [b"431"]
    assert recorder.seen == []


@pytest.mark.parametrize(
    "codings",
    [
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: identity, chunked\r\n",
        b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: xchunked\r\n",
    ],
    ids=["gzip-then-chunked", "identity-then-chunked", "two-fields", "unknown"],
)
async def test_traffic_transfer_coding_other_than_chunked_alone_is_501(
    served: Server, recorder: Recorder, codings: bytes
) -> None:
    # The body goes upstream without its codings (Transfer-Encoding is
    # hop-by-hop): one the gateway does not decode would pass as plain.
    request = b"POST /x HTTP/1.1\r\nHost: a\r\n%b\r\n3\r\nabc\r\n0\r\n\r\n" % codings
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"

    answer = await exchange_raw(served.port, request + smuggled)

    assert _statuses(answer) == [b"501"]
    assert answer.endswith(
        b"\r\nConnection: close\r\n\r\n"
        b'{"error":"not_implemented",'
        b'"message":"Only the chunked transfer coding is accepted"}'
    )
    assert recorder.seen == []


async def test_traffic_chunked_http10_request_is_400_and_closed(
    served: Server, recorder: Recorder
) -> None:
    # RFC 9112 section 6.1: HTTP/1.0 has no chunked coding, so such framing is
    # faulty; a server in front that read it otherwise would be out of step.
    request = (
        b"POST /x HTTP/1.0\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /smuggled HTTP/1.0\r\n\r\n"
    )

    answer = await exchange_raw(served.port, request)

    assert _statuses(answer) == [b"400"]
    assert answer.endswith(b"\r\nConnection: close\r\n\r\n" + _BAD)
    assert recorder.seen == []


async def _slow_caller(
    port: int, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A caller whose socket takes little at a time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(request)
    return reader, writer


async def _unread(port: int, request: bytes) -> asyncio.StreamWriter:
    """A caller that sends ``request`` and never reads the answer."""
    _, writer = await _slow_caller(port, request)
    # uvloop's transports are not asyncio.Transport subclasses.
    cast(asyncio.Transport, writer.transport).pause_reading()
    return writer


async def _until_no_connection(server: TrafficServer) -> None:
    for _ in range(500):
        if not server.connections:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("path", ["/big", "/flood"])
@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "close"])
async def test_traffic_caller_that_stops_reading_is_cut_after_the_send_timeout(
    recorder: Recorder, path: str, close: bool
) -> None:
    # Neither a finished answer waiting to be sent nor a handler waiting to
    # write may hold the connection (and so its agent's) for ever.
    server, port = await _start(recorder, send_timeout_s=0.3)
    head = b"Connection: close\r\n" if close else b""
    try:
        writer = await _unread(
            port, b"GET %b HTTP/1.1\r\nHost: a\r\n%b\r\n" % (path.encode(), head)
        )
        await _until_no_connection(server)
        connections = len(server.connections)
    finally:
        await server.close()
    writer.close()

    assert [seen["target"] for seen in recorder.seen] == [path]
    assert connections == 0


async def test_traffic_drain_lets_a_finished_answer_reach_its_caller(
    recorder: Recorder,
) -> None:
    # The handler is done once its answer is in the transport's buffer; the
    # connection must not be cut while the caller is still taking it.
    release = asyncio.Event()
    answer = b"x" * (16 * 1024 * 1024)

    async def handler(request: TrafficRequest) -> None:
        await release.wait()
        lines = b"Content-Length: %d\r\n" % len(answer)
        request.send_head(
            200, b"OK", lines, length_known=True, has_date=True, data=answer
        )
        request.end()

    server, port = await _start(handler)
    reader, writer = await _slow_caller(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")

    async def read_all() -> bytes:
        got = bytearray()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                got += data
        writer.close()
        return bytes(got)

    drain = asyncio.create_task(server.drain(5.0, 1.0))
    release.set()
    reading = asyncio.create_task(read_all())
    cut = await drain
    await server.close()  # as the worker does once drained
    received = len((await reading).partition(b"\r\n\r\n")[2])

    assert cut == 0
    assert received == len(answer)


async def test_traffic_pipelined_requests_wait_for_the_caller_to_read_answers(
    recorder: Recorder,
) -> None:
    # Small requests, large answers, none read: what is buffered for the
    # caller must stay bounded, so the next request waits for it to read.
    answered = 0

    async def handler(request: TrafficRequest) -> None:
        nonlocal answered
        answered += 1
        answer = b"x" * (256 * 1024)
        lines = b"Content-Length: %d\r\n" % len(answer)
        request.send_head(
            200, b"OK", lines, length_known=True, has_date=True, data=answer
        )
        request.end()

    server, port = await _start(handler)
    writer = await _unread(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" * 200)
    for _ in range(100):
        if answered == 200:
            break
        await asyncio.sleep(0.01)
    buffered = 0
    for conn in server.connections:
        assert conn.transport is not None
        buffered += conn.transport.get_write_buffer_size()
    await server.close()
    writer.close()

    assert answered < 200
    assert buffered < 2 * 256 * 1024


async def test_traffic_bodiless_answer_takes_no_body_bytes(served: Server) -> None:
    class Handler:
        async def __call__(self, request: TrafficRequest) -> None:
            request.send_head(
                204, b"No Content", b"", length_known=False, has_date=True
            )
            await request.send_body(b"stray")
            request.end(b"more")

    server, port = await _start(Handler())
    try:
        answer = await exchange_raw(
            port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
    finally:
        await server.close()

    assert answer == b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
