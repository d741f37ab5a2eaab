"""The instruction-count benchmark: its arithmetic, parsing, table and shim."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import Row
from bench.instructions import (
    Batch,
    callgrind_summary,
    format_table,
    per_request,
    pick_rows,
    request_counts,
    worker_shim,
)

DUMP_HEAD = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 14340
cmd:  /usr/bin/python3 -B -c from multiprocessing.spawn import spawn_main
part: 2
thread: 1

desc: Timerange: Basic block 357350725 - 424589332
desc: Trigger: dump

positions: line
events: Ir
summary: 291091590


ob=(2) ???
fl=(52) ???
fn=(3640) 0x0000000004936788
0 1054
totals: 291098981
"""


TABLE = """\
row                                                instr/req  x none    - none
c  auth none                                         289,098    1.00        +0
e  OAuth, every token new                            764,770    2.65  +475,672
"""


def test_callgrind_summary_reads_the_summary_line() -> None:
    assert callgrind_summary(DUMP_HEAD.splitlines()) == 291_091_590


def test_callgrind_summary_refuses_a_dump_without_one() -> None:
    with pytest.raises(ValueError, match="no summary line"):
        callgrind_summary(["events: Ir", "totals: 5"])


def test_per_request_cancels_fixed_and_idle_work() -> None:
    # Each batch: 4M fixed, 300k a request, 350k a second of idle work.
    def batch(requests: int, seconds: float) -> Batch:
        cost = 4_000_000 + 300_000 * requests + 350_000 * seconds
        return Batch(requests, int(cost), seconds)

    first, second = batch(500, 6.0), batch(2500, 31.0)

    assert per_request(first, second, idle_per_s=350_000) == 300_000
    assert per_request(first, second, idle_per_s=0) == 300_000 + 350_000 * 25 / 2000


def row(key: str, label: str, tokens: Path | None = None, ours: bool = False) -> Row:
    header, prefix = ("Authorization", "Bearer ") if tokens else ("", "")
    url = f"http://127.0.0.1:1/{key}"
    return Row(key, label, url, list, header, tokens, prefix, ours=ours)


def test_format_table_compares_every_row_with_the_first() -> None:
    figures = [
        (row("c", "auth none"), 289_098.4),
        (row("e", "OAuth, every token new"), 764_770.0),
    ]

    assert format_table(figures) + "\n" == TABLE


def test_pick_rows_takes_ours_and_sizes_what_c_plus_carries(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("a.b.c\n")
    rows = [
        row("a", "nginx"),
        row("b", "HAProxy"),
        row("c", "ours, auth none", ours=True),
        row("c+", "ours, none + d's header, unchecked", tokens, ours=True),
        row("d", "ours, OAuth", tokens, ours=True),
        row("e", "ours, OAuth new", ours=True),
        row("f", "ours, API key", ours=True),
    ]

    picked = pick_rows(rows)

    assert [(r.key, r.label) for r in picked] == [
        ("c", "auth none"),
        ("c+", "auth none, 27-byte Authorization unchecked"),
        ("d", "OAuth"),
        ("e", "OAuth new"),
        ("f", "API key"),
    ]
    assert picked[1].url == rows[3].url
    assert picked[1].header_values(0) == ["Bearer a.b.c"]


@pytest.mark.parametrize(
    ("text", "answer"), [("500,2500", (500, 2500)), ("1,2", (1, 2))]
)
def test_request_counts_reads_two_growing_counts(
    text: str, answer: tuple[int, int]
) -> None:
    assert request_counts(text) == answer


@pytest.mark.parametrize("text", ["2500,500", "0,5", "5,5", "-1,5"])
def test_request_counts_refuses_counts_that_do_not_grow(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="0 < N1 < N2"):
        request_counts(text)


@pytest.fixture
def shim(tmp_path: Path) -> Path:
    """The shim, with a stand-in valgrind that prints what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "valgrind"
    fake.write_text('#!/bin/sh\necho "valgrind $PYTHONHASHSEED $*"\n')
    fake.chmod(0o755)
    shim = tmp_path / "worker-python"
    shim.write_text(
        worker_shim(tmp_path / "worker.pid", tmp_path / "out.%p", sys.executable)
    )
    shim.chmod(0o755)
    return shim


def run_shim(shim: Path, *args: str) -> str:
    path = f"{shim.parent / 'bin'}:{os.environ['PATH']}"
    env = {**os.environ, "PATH": path}
    done = subprocess.run([shim, *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_worker_shim_runs_a_worker_under_callgrind(shim: Path) -> None:
    out = run_shim(shim, "-B", "-c", "pass", "--multiprocessing-fork")

    assert out == (
        f"valgrind 0 --tool=callgrind --separate-threads=yes "
        f"--callgrind-out-file={shim.parent}/out.%p {sys.executable} "
        f"-B -c pass --multiprocessing-fork\n"
    )
    assert (shim.parent / "worker.pid").read_text().strip().isdigit()


def test_worker_shim_runs_anything_else_as_plain_python(shim: Path) -> None:
    out = run_shim(shim, "-c", "import sys; print(sys.argv[1:])", "tracker")

    assert out == "['tracker']\n"
    assert not (shim.parent / "worker.pid").exists()
