"""Routing: from a request's raw target to the agent it addresses.

The gateway decides on the path exactly as it forwards it. The raw path is
normalized once (unreserved characters percent-decoded, other escapes kept
with upper-case hex digits, dot segments removed as RFC 3986 section 5.2.4
says), the first two segments of that path name the project and the agent,
and the rest is what the agent receives. Because the decision and the
forwarded path come from the same string, no encoding trick can make the
gateway authorize one agent while the upstream sees another path.
"""

from __future__ import annotations

import string

__all__ = [
    "InvalidTarget",
    "Target",
    "decode_unreserved",
    "normalize_path",
    "remove_dot_segments",
    "split_target",
    "upstream_path",
]

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)


class InvalidTarget(ValueError):
    """A request target that is not a well-formed origin-form path."""


class Target:
    """The agent a request addresses and the path its upstream receives."""

    __slots__ = ("agent", "project", "query", "rest")

    def __init__(self, project: str, agent: str, rest: str, query: str) -> None:
        self.project = project
        self.agent = agent
        self.rest = rest
        self.query = query


def _decode_escape(path: str, i: int) -> str:
    """The normalized form of the escape ``%XY`` that starts at ``path[i]``."""
    pair = path[i + 1 : i + 3]
    if len(pair) != 2 or not _HEX.issuperset(pair):
        raise InvalidTarget("malformed percent-encoding")

    char = chr(int(pair, 16))
    return char if char in _UNRESERVED else "%" + pair.upper()


def decode_unreserved(path: str) -> str:
    """Percent-decode unreserved characters only; keep and upper-case the rest."""
    if "%" not in path:
        return path

    out: list[str] = []
    start = 0
    i = path.find("%")
    while i != -1:
        out.append(path[start:i])
        out.append(_decode_escape(path, i))
        start = i + 3
        i = path.find("%", start)

    out.append(path[start:])
    return "".join(out)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 on an absolute path, done segment-wise."""
    if "." not in path:
        return path

    segments = path.split("/")
    output: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if len(output) > 0:
                output.pop()
        elif segment != ".":
            output.append(segment)

    # A final "." or ".." names a directory: the path keeps its trailing slash.
    if segments[-1] in (".", ".."):
        output.append("")
    return "/" + "/".join(output)


def normalize_path(path: str) -> str:
    """The path routing decides on and the gateway forwards."""
    if not path.startswith("/"):
        raise InvalidTarget("the request target must be an absolute path")
    # Four scans at C speed; a generator over the characters cost more than
    # the rest of the routing.
    if "#" in path or "\x00" in path or "\r" in path or "\n" in path:
        raise InvalidTarget("the request target holds a forbidden character")

    return remove_dot_segments(decode_unreserved(path))


def split_target(raw_target: str) -> Target:
    """Split a raw request target into the agent it names and its upstream path.

    The project and the agent are the normalized path's first two segments,
    whatever they hold (empty ones included): only names the control plane
    accepted are ever deployed, so any other finds no agent. Raises
    InvalidTarget for a malformed target.
    """
    path, _, query = raw_target.partition("?")
    path = normalize_path(path)

    project, _, tail = path[1:].partition("/")
    agent, slash, rest = tail.partition("/")
    return Target(project, agent, slash + rest, query)


def upstream_path(base_path: str, rest: str) -> str:
    """Join an upstream URL's path and the rest of the request path."""
    path = base_path.rstrip("/") + rest
    return path or "/"
