"""Locust scenarios against a running stack prepared by ``bench.setup_stack``.

Reads the JSON file named by ``AGW_BENCH_STACK`` (default ``bench-stack.json``)
and loads the gateway found there. Pick scenarios by class name:

    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 30s --only-summary \\
        OAuthUser ApiKeyUser SseUser MixedUser
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from locust import HttpUser, between, task

__all__ = ["ApiKeyUser", "MixedUser", "OAuthUser", "SseUser"]

STACK: dict[str, Any] = json.loads(
    Path(os.environ.get("AGW_BENCH_STACK", "bench-stack.json")).read_text()
)
AGENTS: dict[str, Any] = STACK["agents"]
TOKENS: list[str] = STACK["tokens"]
KEYS: list[str] = STACK["api_keys"]
KEY_HEADER: str = STACK["api_key_header"]
CHAT = {"message": "hello"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class _GatewayUser(HttpUser):
    """Shared settings: the gateway from the stack file, a short think time."""

    abstract = True
    host = STACK["gateway_url"]
    wait_time = between(0, 0.01)

    def chat(self, agent: str, headers: dict[str, str], expect: int, name: str) -> None:
        """POST /chat; a success is the expected status, whatever it is."""
        path = f"{AGENTS[agent]['path']}/chat"
        with self.client.post(
            path, json=CHAT, headers=headers, name=name, catch_response=True
        ) as response:
            if response.status_code == expect:
                response.success()
            else:
                response.failure(f"expected {expect}, got {response.status_code}")


class OAuthUser(_GatewayUser):
    """The OAuth agent with tokens from the repeating pool."""

    @task
    def chat_oauth(self) -> None:
        self.chat("secured", bearer(random.choice(TOKENS)), 200, "oauth chat")


class ApiKeyUser(_GatewayUser):
    """The API-key agent with one of its live keys."""

    @task
    def chat_api_key(self) -> None:
        headers = {KEY_HEADER: random.choice(KEYS)}
        self.chat("keyed", headers, 200, "api-key chat")


class SseUser(_GatewayUser):
    """The SSE agent: open a stream and read every event to the end."""

    @task
    def stream(self) -> None:
        path = f"{AGENTS['stream']['path']}/stream?events=20&interval_ms=10"
        headers = {**bearer(random.choice(TOKENS)), "Accept": "text/event-stream"}
        with self.client.get(
            path, headers=headers, stream=True, name="sse stream", catch_response=True
        ) as response:
            events = sum(
                1 for line in response.iter_lines() if line.startswith(b"data:")
            )
            if response.status_code != 200 or events != 20:
                response.failure(f"status {response.status_code}, {events} events")


class MixedUser(_GatewayUser):
    """Mostly valid calls, some rejected: a bad token, a wrong key, no token."""

    @task(6)
    def valid_oauth(self) -> None:
        self.chat("secured", bearer(random.choice(TOKENS)), 200, "mix oauth ok")

    @task(2)
    def valid_key(self) -> None:
        self.chat("keyed", {KEY_HEADER: random.choice(KEYS)}, 200, "mix key ok")

    @task(1)
    def bad_token(self) -> None:
        token = random.choice(TOKENS)
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        self.chat("secured", bearer(forged), 401, "mix bad token 401")

    @task(1)
    def wrong_key(self) -> None:
        self.chat("keyed", {KEY_HEADER: "agk_" + "0" * 43}, 401, "mix wrong key 401")

    @task(1)
    def no_token(self) -> None:
        self.chat("secured", {}, 401, "mix no token 401")
