"""The benchmark harness: its generated configs, wrk script and figures."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.harness import (
    Row,
    Settings,
    cpu_ticks,
    find_tool,
    haproxy_config,
    nginx_config,
    oauth_cost,
    parse_wrk,
    parser_build,
    run_wrk,
)
from bench.keys import SigningKey


@pytest.mark.skipif(not find_tool("haproxy"), reason="haproxy is not installed")
def test_haproxy_config_accepted_by_haproxy(tmp_path: Path) -> None:
    public_key = tmp_path / "public.pem"
    public_key.write_bytes(SigningKey.generate().public_pem())
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(18080, 18081, public_key))

    haproxy = find_tool("haproxy")
    assert haproxy is not None
    done = subprocess.run(
        [haproxy, "-c", "-f", str(config)],
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout


@pytest.mark.skipif(not find_tool("nginx"), reason="nginx is not installed")
def test_nginx_config_accepted_by_nginx(tmp_path: Path) -> None:
    (tmp_path / "nginx-tmp").mkdir()
    config = tmp_path / "nginx.conf"
    config.write_text(nginx_config(tmp_path, 18082))

    nginx = find_tool("nginx")
    assert nginx is not None
    done = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(config),
         "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_parse_wrk_reads_the_done_line() -> None:
    output = (
        "Running 1s test @ http://127.0.0.1:1/\n"
        'WRK_JSON {"requests": 10, "duration_us": 1000000, "status_errors": 1, '
        '"socket_errors": 0, "p50_us": 120, "p99_us": 900}\n'
    )

    assert parse_wrk(output) == {
        "requests": 10,
        "duration_us": 1000000,
        "status_errors": 1,
        "socket_errors": 0,
        "p50_us": 120,
        "p99_us": 900,
    }


def test_cpu_ticks_counts_children() -> None:
    spin = (
        "import time\n"
        "start = time.process_time()\n"
        "while time.process_time() - start < 0.3: pass\n"
        "input()"
    )
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE)
    try:
        while cpu_ticks([child.pid]) < 25 and child.poll() is None:
            time.sleep(0.05)

        assert cpu_ticks([child.pid]) >= 25
        assert cpu_ticks([os.getpid()]) >= cpu_ticks([child.pid])
    finally:
        child.communicate(b"\n")


@pytest.mark.skipif(not find_tool("wrk"), reason="wrk is not installed")
async def test_run_wrk_sends_only_its_rounds_slice(tmp_path: Path) -> None:
    seen: set[str] = set()

    async def record(request: web.Request) -> web.Response:
        seen.add(request.headers.get("Authorization", ""))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/chat", record)
    credentials = tmp_path / "tokens"
    credentials.write_text("t0\nt1\nt2\nt3\nt4\n")
    async with TestServer(app, host="127.0.0.1") as server:
        row = Row("x", "test", str(server.make_url("/chat")),
                  lambda: [os.getpid()], "Authorization", credentials,
                  "Bearer ", per_round=2)  # fmt: skip
        settings = Settings(threads=1, connections=2, duration_s=1, warmup_s=0,
                            rounds=1)  # fmt: skip
        figures = await asyncio.to_thread(run_wrk, row, settings, 1, 1)

    assert seen == {"Bearer t2", "Bearer t3"}
    assert figures["requests"] > 0
    assert figures["status_errors"] == 0
    assert figures["cpu_us"] >= 0


def test_row_header_values_are_the_slice_the_wrk_script_sends(tmp_path: Path) -> None:
    credentials = tmp_path / "tokens"
    credentials.write_text("t0\nt1\nt2\nt3\nt4\n")
    sliced = Row("x", "test", "http://127.0.0.1:1/", list, "Authorization",
                 credentials, "Bearer ", per_round=2)  # fmt: skip
    whole = Row("y", "test", "http://127.0.0.1:1/", list, "X-API-Key", credentials)
    bare = Row("z", "test", "http://127.0.0.1:1/", list)

    assert sliced.header_values(1) == ["Bearer t2", "Bearer t3"]
    assert whole.header_values(3) == ["t0", "t1", "t2", "t3", "t4"]
    assert bare.header_values(0) == []


def _measured(key: str, *cpu_us: float) -> Row:
    row = Row(key, "test", "http://127.0.0.1:1/", list)
    row.results = [{"cpu_us": value} for value in cpu_us]
    return row


def test_oauth_cost_compares_d_with_none_with_and_without_the_header() -> None:
    rows = [
        _measured("b", 50.0),
        _measured("c", 40.0, 39.0, 41.0),
        _measured("c+", 44.0, 90.0, 43.0),
        _measured("d", 46.0),
    ]

    assert oauth_cost(rows) == [
        "OAuth (d) over c: +15.0% CPU/req (a request without the header)",
        "OAuth (d) over c+: +4.5% CPU/req (the same request, its header not checked)",
    ]


def test_oauth_cost_says_nothing_without_row_d() -> None:
    assert oauth_cost([_measured("c", 40.0), _measured("c+", 44.0)]) == []


def test_parser_build_tells_an_sse42_llhttp_by_its_pcmpestri(tmp_path: Path) -> None:
    generic = tmp_path / "generic.so"
    generic.write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
    simd = tmp_path / "simd.so"
    simd.write_bytes(b"\x7fELF\x90\x66\x0f\x3a\x61\xc1\x12\x90")

    assert parser_build(generic) == "llhttp without SSE 4.2"
    assert parser_build(simd) == "llhttp with SSE 4.2"
