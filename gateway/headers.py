"""Header names the proxy never passes on as they came.

Hop-by-hop headers belong to one connection; the request headers the
gateway sets itself are dropped from what the caller sent. Routes combine
these once, when a policy is applied, with their own credential header.
"""

from __future__ import annotations

__all__ = ["HOP_BY_HOP", "REQUEST_DROP"]

#: RFC 9110 section 7.6.1 hop-by-hop headers, plus the non-standard
#: Proxy-Connection that some clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Request headers the gateway sets itself (framing included: the body is
#: framed anew upstream), so a caller's copy never goes upstream.
REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
}
