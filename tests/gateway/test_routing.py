"""Routing: the normalized path decides the agent and is exactly what is forwarded."""

from __future__ import annotations

import pytest

from gateway.routing import (
    InvalidTarget,
    decode_unreserved,
    normalize_path,
    remove_dot_segments,
    split_target,
    upstream_path,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/b/c/./../../g", "/a/g"),
        ("/mid/content=5/../6", "/mid/6"),
        ("/a/b/../../c/d/", "/c/d/"),
        ("/../../a", "/a"),
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/a/b/", "/a/b/"),
        ("/a//b", "/a//b"),
        ("/a/.../b", "/a/.../b"),
        ("/a/..b/c", "/a/..b/c"),
    ],
)
def test_remove_dot_segments_follows_rfc3986(raw: str, expected: str) -> None:
    assert remove_dot_segments(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/%61%62%63", "/abc"),
        ("/%7e%2D%2e%5F", "/~-._"),
        ("/a%2fb", "/a%2Fb"),
        ("/a%2Fb", "/a%2Fb"),
        ("/%20x", "/%20x"),
        ("/%c3%a9", "/%C3%A9"),
        ("/%25", "/%25"),
    ],
)
def test_decode_unreserved_decodes_only_unreserved(raw: str, expected: str) -> None:
    assert decode_unreserved(raw) == expected


@pytest.mark.parametrize("raw", ["/a%", "/a%2", "/a%zz", "/%g0/x"])
def test_decode_unreserved_rejects_malformed_escapes(raw: str) -> None:
    with pytest.raises(InvalidTarget):
        decode_unreserved(raw)


@pytest.mark.parametrize(
    "raw", ["relative/path", "http://evil.example/p/a", "*", "/p/a\x00", "/p/a#f"]
)
def test_normalize_path_rejects_non_origin_forms(raw: str) -> None:
    with pytest.raises(InvalidTarget):
        normalize_path(raw)


# (raw target, (project, agent, rest, query), or None: not agent a of project p)
ROUTES: list[tuple[str, tuple[str, str, str, str] | None]] = [
    ("/p/a", ("p", "a", "", "")),
    ("/p/a/", ("p", "a", "/", "")),
    ("/p/a/chat?x=1&y=%2F", ("p", "a", "/chat", "x=1&y=%2F")),
    ("/p/a/x/../y", ("p", "a", "/y", "")),
    ("/p/a/../b/chat", None),  # /p/b/chat: agent b in project p
    ("/a/b/../../c/d/", ("c", "d", "/", "")),
    ("/p/a/%2e%2e/%2E%2E/q/b/x", ("q", "b", "/x", "")),
    ("/p/%2e%2e/x", None),
    ("/p/a%2Fb/x", None),
    ("/p/a%2fb/x", None),
    ("/p%2Fa/b/x", None),
    ("/p/a%2E%2E/x", None),
    ("/p/%61/x", ("p", "a", "/x", "")),
    ("/%70/a/x", ("p", "a", "/x", "")),
    ("/p/a/x%2Fy", ("p", "a", "/x%2Fy", "")),
    ("//p/a/x", None),
    ("/p//a/x", None),
    ("/p/a//x", ("p", "a", "//x", "")),
    ("/P/a/x", None),
    ("/p", None),
    ("/", None),
    ("/p/-a/x", None),
    ("/p/a-/x", None),
    ("/p/" + "a" * 64 + "/x", None),
    ("/p/" + "a" * 63 + "/x", ("p", "a" * 63, "/x", "")),
    ("/p/a;x=1/y", None),
    ("/p/a%20/y", None),
    ("/p/a/./chat", ("p", "a", "/chat", "")),
]


@pytest.mark.parametrize(("raw", "expected"), ROUTES)
def test_split_target_routes_on_normalized_path(
    raw: str, expected: tuple[str, str, str, str] | None
) -> None:
    target = split_target(raw)
    if expected is None:
        assert (target.project, target.agent) != ("p", "a")
        # Whatever it selects, it is what the normalized path names.
        path = normalize_path(raw.partition("?")[0])
        rebuilt = f"/{target.project}/{target.agent}{target.rest}"
        assert rebuilt.rstrip("/") == path.rstrip("/")
        return

    assert target is not None
    assert (target.project, target.agent, target.rest, target.query) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("/", ("", "", "")), ("/p", ("p", "", "")), ("//a/x", ("", "a", "/x"))],
)
def test_split_target_missing_names_are_empty(
    raw: str, expected: tuple[str, str, str]
) -> None:
    target = split_target(raw)
    assert (target.project, target.agent, target.rest) == expected


def test_split_target_dot_segments_select_the_agent_they_name() -> None:
    target = split_target("/p/a/../b/chat")
    assert target is not None
    assert (target.project, target.agent, target.rest) == ("p", "b", "/chat")


@pytest.mark.parametrize(
    ("base", "rest", "expected"),
    [
        ("", "", "/"),
        ("/", "", "/"),
        ("", "/chat", "/chat"),
        ("/base", "/chat", "/base/chat"),
        ("/base/", "/chat", "/base/chat"),
        ("/base", "", "/base"),
        ("/base", "//x", "/base//x"),
    ],
)
def test_upstream_path_joins_base_and_rest(base: str, rest: str, expected: str) -> None:
    assert upstream_path(base, rest) == expected
