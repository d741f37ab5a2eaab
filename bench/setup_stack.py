"""Prepare a running stack for load through the control-plane REST API only.

Creates an environment, an identity provider backed by the benchmark's own
RSA-2048 key (inline JWKS, or a ``jwks_uri`` you serve), a project and four
agents (auth ``none``, ``oauth``, ``api_key`` and an SSE agent on ``oauth``),
API keys, then mints RS256 tokens with the same key: a small pool that
repeats and a large pool of distinct ones, all valid for years. Everything the
load needs goes to one JSON file (mode 0600: it holds secrets) and the
distinct tokens to a text file, one a line, for wrk.

    python -m bench.setup_stack --control-plane http://127.0.0.1:8081 \\
        --admin-token-file .agw-data/admin-token \\
        --gateway-url http://127.0.0.1:8080 --upstream-url http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.keys import AUDIENCE, ISSUER, SigningKey, mint_pool

__all__ = ["AGENTS", "Api", "ApiError", "Plan", "main", "setup"]

#: agent name -> endpoint auth of its deployment.
AGENTS: dict[str, dict[str, Any]] = {
    "open": {"type": "none"},
    "secured": {
        "type": "oauth",
        "oauth": {"identity_providers": ["bench-idp"], "audiences": [AUDIENCE]},
    },
    "keyed": {"type": "api_key"},
    "stream": {"type": "oauth", "oauth": {"identity_providers": ["bench-idp"]}},
}


class ApiError(Exception):
    """The control plane refused a call; carries its status and error body."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {path}: {status} {body.decode(errors='replace')}")
        self.status = status


class Api:
    """A minimal client of the control-plane REST API."""

    def __init__(self, base_url: str, admin_token: str) -> None:
        self.base = base_url.rstrip("/") + "/api/v1"
        self.token = admin_token

    def call(self, method: str, path: str, body: object | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=40) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise ApiError(method, path, error.code, error.read()) from None


@dataclass
class Plan:
    """What to create, and where the load's inputs go."""

    environment: str
    gateway_url: str
    upstream_url: str
    sse_upstream_url: str
    out: Path
    project: str = "bench"
    jwks_uri: str | None = None
    tokens: int = 16
    distinct_tokens: int = 10_000
    api_keys: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


def create_identity_provider(api: Api, plan: Plan, key: SigningKey) -> None:
    body: dict[str, object] = {
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["RS256"],
    }
    if plan.jwks_uri:
        body["jwks_uri"] = plan.jwks_uri
    else:
        body["jwks"] = key.jwks()
    api.call(
        "PUT", f"/environments/{plan.environment}/identity-providers/bench-idp", body
    )


def deploy_agents(api: Api, plan: Plan) -> dict[str, Any]:
    """Create and deploy every agent; answer each one's invoke path and auth."""
    agents: dict[str, Any] = {}
    for name, auth in AGENTS.items():
        upstream = plan.sse_upstream_url if name == "stream" else plan.upstream_url
        base = f"/projects/{plan.project}/agents/{name}"
        api.call("PUT", base, {"upstream_url": upstream, "timeout_s": 30})
        deployment = api.call(
            "POST",
            f"{base}/deployments?wait=10",
            {"environment": plan.environment, "endpoint_auth": auth},
        )
        agents[name] = {
            "auth": auth["type"],
            "path": f"/{plan.project}/{name}",
            "invoke_url": deployment["invoke_url"],
            "revision": deployment["revision"],
            "propagation": deployment.get("propagation"),
        }
    return agents


def create_api_keys(api: Api, plan: Plan, agent: str) -> list[str]:
    """Create (or rotate, when they exist) the agent's keys; answer the secrets."""
    base = (
        f"/projects/{plan.project}/agents/{agent}"
        f"/environments/{plan.environment}/api-keys"
    )
    keys = []
    for index in range(plan.api_keys):
        name = f"load-{index}"
        try:
            created = api.call("POST", base, {"name": name})
        except ApiError as error:
            if error.status != 409:
                raise
            created = api.call("POST", f"{base}/{name}/rotate")
        keys.append(str(created["key"]))
    return keys


def write_tokens(plan: Plan, key: SigningKey) -> dict[str, Any]:
    """Mint both token pools; the distinct one goes to a text file for wrk."""
    repeating = list(mint_pool(key, "repeat", plan.tokens))
    distinct_file = plan.out.with_suffix(".tokens")
    distinct = mint_pool(key, "distinct", plan.distinct_tokens)
    distinct_file.write_text("\n".join(distinct) + "\n")
    distinct_file.chmod(0o600)
    return {
        "tokens": repeating,
        "distinct_tokens_file": str(distinct_file),
        "distinct_tokens": len(distinct),
    }


def setup(api: Api, plan: Plan, key: SigningKey) -> dict[str, Any]:
    """Create everything through the API and write the load's JSON file."""
    api.call(
        "PUT", f"/environments/{plan.environment}", {"gateway_url": plan.gateway_url}
    )
    create_identity_provider(api, plan, key)
    api.call("PUT", f"/projects/{plan.project}", {})
    agents = deploy_agents(api, plan)
    api_keys = create_api_keys(api, plan, "keyed")

    result = {
        "environment": plan.environment,
        "gateway_url": plan.gateway_url,
        "agents": agents,
        "api_keys": api_keys,
        "api_key_header": "X-API-Key",
        **write_tokens(plan, key),
        **plan.extra,
    }
    plan.out.touch(mode=0o600)
    plan.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def admin_token(args: argparse.Namespace) -> str:
    if args.admin_token_file:
        return str(Path(args.admin_token_file).read_text().strip())
    token = os.environ.get("AGW_ADMIN_TOKEN", "")
    if not token:
        sys.exit("setup_stack: give --admin-token-file or set AGW_ADMIN_TOKEN")
    return token


def signing_key(path: Path) -> SigningKey:
    """The key in ``path``, generated and saved there on first use."""
    if path.exists():
        return SigningKey.load(path)
    key = SigningKey.generate()
    path.touch(mode=0o600)
    path.write_bytes(key.private_pem())
    return key


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control-plane", default="http://127.0.0.1:8081")
    parser.add_argument("--admin-token-file")
    parser.add_argument("--environment", default="bench")
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8080")
    parser.add_argument("--upstream-url", required=True)
    parser.add_argument("--sse-upstream-url", help="default: --upstream-url")
    parser.add_argument("--jwks-uri", help="serve the JWKS yourself (default: inline)")
    parser.add_argument("--key-file", default="bench-signing-key.pem")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--distinct-tokens", type=int, default=10_000)
    parser.add_argument("--out", default="bench-stack.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = Plan(
        environment=args.environment,
        gateway_url=args.gateway_url,
        upstream_url=args.upstream_url,
        sse_upstream_url=args.sse_upstream_url or args.upstream_url,
        out=Path(args.out),
        jwks_uri=args.jwks_uri,
        tokens=args.tokens,
        distinct_tokens=args.distinct_tokens,
    )
    key = signing_key(Path(args.key_file))
    result = setup(Api(args.control_plane, admin_token(args)), plan, key)
    print(
        f"setup_stack: environment {plan.environment!r}, "
        f"{len(result['agents'])} agents, {len(result['api_keys'])} API keys, "
        f"{len(result['tokens'])} repeating and {result['distinct_tokens']} "
        f"distinct tokens -> {plan.out}"
    )


if __name__ == "__main__":
    main()
