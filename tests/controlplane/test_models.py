"""The rules of controlplane/models.py that a schema cannot express."""

from __future__ import annotations

import pytest

from controlplane.errors import ValidationFailed
from controlplane.models import check_url


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example/a\r\nX-Injected: 1",
        "https://idp.example/a\n",
        "https://idp.example/a b",
        "https://idp.example/a\t",
        " https://idp.example/a",
        "https://idp.example/a\x00",
        "https://idp.example/a\x7f",
        "https://idp.example/a\x85",
        "https://idp.example/a\u00a0",
        "https://idp.example/a\u2028",
        "https://idp.example/a\u200b",
    ],
)
def test_check_url_refuses_whitespace_and_control_characters(url: str) -> None:
    with pytest.raises(ValidationFailed) as failure:
        check_url(url, "$.issuer")
    assert (failure.value.field, failure.value.reason) == (
        "$.issuer",
        "must not contain whitespace or control characters",
    )


@pytest.mark.parametrize(
    "url", ["https://idp.example/realms/a", "http://127.0.0.1:8080/é?x=1#f"]
)
def test_check_url_accepts_absolute_urls(url: str) -> None:
    assert check_url(url, "$.issuer") == url
