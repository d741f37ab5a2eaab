"""OAuth endpoint authentication: bearer JWTs checked against identity providers.

:class:`IdentityProviders` holds every identity provider of the environment
with its keys; :class:`OAuthAuthenticator` enforces one route's settings.
:func:`diagnose` runs the very same validation for the control plane and
reports each check instead of failing on the first one.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence

import aiohttp
import msgspec
from multidict import MultiMapping, istr

from gateway.auth import IDENTITY_HEADERS, Authenticator, AuthFailure, Identity
from gateway.jwks import (
    FETCH_TIMEOUT_S,
    REFETCH_COOLDOWN_S,
    Keyring,
    KeySet,
    KeySource,
)
from gateway.log import jwks_log
from gateway.metrics import JWKS_FETCHES, OAUTH_REQUESTS, TOKEN_CACHE, Tally
from gateway.policy import IdentityProviderPolicy, OAuthSettings
from gateway.tokens import (
    ALGORITHMS,
    Claims,
    ParsedToken,
    TokenError,
    VerificationKey,
    check_algorithm_allowed,
    check_algorithm_supported,
    check_audience,
    check_times,
    extract_token,
    parse_token,
    read_claims,
    read_issuer,
    verify_signature,
)

__all__ = [
    "REALM",
    "Check",
    "Diagnosis",
    "IdentityProviders",
    "IdpState",
    "KeysUnavailable",
    "OAuthAuthenticator",
    "Route",
    "TokenCache",
    "Verified",
    "build_routes",
    "diagnose",
    "verify",
]

REALM = "agent-gateway"

# --- metrics ----------------------------------------------------------------

_ALLOWED = Tally(OAUTH_REQUESTS.labels("allowed", ""))
_DENIED = {
    reason: Tally(OAUTH_REQUESTS.labels("denied", reason))
    for reason in (
        "missing",
        "duplicate_header",
        "unavailable",
        "format",
        "algorithm",
        "issuer",
        "key",
        "signature",
        "expiry",
        "not_before",
        "audience",
    )
}
_CACHE_HIT = Tally(TOKEN_CACHE.labels("hit"))
_CACHE_MISS = Tally(TOKEN_CACHE.labels("miss"))


def _count_fetch(idp: str, ok: bool) -> None:
    JWKS_FETCHES.labels(idp, "ok" if ok else "error").inc()


# --- identity providers -----------------------------------------------------


class KeysUnavailable(Exception):
    """An identity provider that has never had keys and could not get them."""


class IdpState:
    """One identity provider as applied: its policy, precomputed, and its keys."""

    __slots__ = (
        "_anonymous",
        "_tail",
        "_tail_lines",
        "algorithms",
        "audiences",
        "issuer",
        "keyring",
        "name",
        "skew",
    )

    def __init__(
        self, name: str, policy: IdentityProviderPolicy, keyring: Keyring
    ) -> None:
        self.name = name
        self.issuer = policy.issuer
        self.keyring = keyring
        self.skew = policy.clock_skew_s
        self.audiences = frozenset(policy.audiences)
        allowed = policy.algorithms or ALGORITHMS
        self.algorithms = frozenset(a for a in allowed if a in ALGORITHMS)
        # The identity headers every token of this provider shares, checked
        # once: a verified token adds only its subject.
        self._tail = (
            ("X-Auth-Issuer", self.issuer),
            ("X-Auth-Identity-Provider", name),
        )
        self._anonymous = Identity(self._tail)
        self._tail_lines = self._anonymous.lines

    def identity(self, sub: str | None) -> Identity:
        """The identity headers of a verified token with subject ``sub``."""
        if sub is None:
            return self._anonymous
        headers = (("X-Auth-Subject", sub), *self._tail)
        # read_claims refused a subject with any control character, so the
        # subject's line needs no other check; the tail's was checked above.
        if self._tail_lines is None:
            return Identity(headers)
        return Identity(headers, f"X-Auth-Subject: {sub}\r\n{self._tail_lines}")


class IdentityProviders:
    """Every identity provider of a worker, with keys kept precompiled."""

    def __init__(
        self,
        *,
        cooldown_s: float = REFETCH_COOLDOWN_S,
        timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self.version = 0
        self.cache = TokenCache()
        self._states: dict[str, IdpState] = {}
        self._policies: dict[str, IdentityProviderPolicy] = {}
        self._cooldown_s = cooldown_s
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def get(self, name: str) -> IdpState | None:
        return self._states.get(name)

    def apply(self, name: str, policy: IdentityProviderPolicy | None) -> None:
        """Install, change or remove an identity provider (``None`` removes)."""
        old = self._states.get(name)
        if policy is None:
            self._remove(name, old)
            return
        if old is not None and self._policies.get(name) == policy:
            return
        state = self._build(name, policy, old)
        if state is None:
            # Fail closed: keeping the old keys could keep revoked ones alive.
            self._remove(name, old)
            return
        if old is not None and old.keyring is not state.keyring:
            self._retire(old.keyring)
        self._states[name] = state
        self._policies[name] = policy
        self.version += 1
        self._start(state.keyring)

    def _build(
        self, name: str, policy: IdentityProviderPolicy, old: IdpState | None
    ) -> IdpState | None:
        try:
            return IdpState(name, policy, self._keyring(name, policy, old))
        except Exception:
            jwks_log.exception(
                "identity provider %s could not be applied; its tokens are refused",
                name,
            )
            return None

    def _remove(self, name: str, old: IdpState | None) -> None:
        if old is None:
            return
        del self._states[name]
        del self._policies[name]
        self.version += 1
        self._retire(old.keyring)

    def _keyring(
        self, name: str, policy: IdentityProviderPolicy, old: IdpState | None
    ) -> Keyring:
        source = KeySource(
            policy.issuer, policy.jwks_uri, policy.jwks, policy.discovery
        )
        if old is not None and old.keyring.source == source:
            # Same key source: keep the keys (and their verified tokens).
            old.keyring.refresh_s = policy.jwks_refresh_s
            return old.keyring
        return Keyring(
            name,
            source,
            self._client,
            refresh_s=policy.jwks_refresh_s,
            timeout_s=self._timeout_s,
            cooldown_s=self._cooldown_s,
            on_fetch=_count_fetch,
        )

    def _start(self, keyring: Keyring) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # started on first use instead
        keyring.start()

    def _retire(self, keyring: Keyring) -> None:
        try:
            task = asyncio.get_running_loop().create_task(keyring.close())
        except RuntimeError:
            return
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def close(self) -> None:
        for state in self._states.values():
            await state.keyring.close()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


# --- verified tokens --------------------------------------------------------


class Verified:
    """A token whose signature was verified, and with what.

    Its time window is worked out once, with the identity provider's clock
    skew: a cache hit compares ``now`` with two numbers. The skew cannot
    change under it: a changed identity provider voids the entry.
    """

    __slots__ = (
        "claims",
        "identity",
        "key",
        "state",
        "token",
        "valid_from",
        "valid_until",
    )

    def __init__(self, state: IdpState, key: VerificationKey, claims: Claims) -> None:
        self.state = state
        self.key = key
        self.claims = claims
        self.token = ""  # set when cached
        skew = state.skew
        # check_times: exp > now - skew, nbf <= now + skew, iat <= now + skew.
        self.valid_until = claims.exp + skew
        nbf, iat = claims.nbf, claims.iat
        start = nbf if iat is None else iat if nbf is None else max(nbf, iat)
        self.valid_from = -math.inf if start is None else start - skew
        self.identity = state.identity(claims.sub)


#: Characters at the end of a token that find its cache entry: 192 bits of
#: its signature (a token of fewer is found by all of it).
TAIL = 32


class TokenCache:
    """Verified tokens of one worker, bounded in entries and in bytes.

    Only the signature verdict is reused: time and audience checks run on
    every hit, and a changed identity provider or key set voids the entry.
    Rejections are not cached; they cost one parse and at most one verify.
    The oldest entry leaves first. An OrderedDict, because taking the first
    key of a plain dict that keeps losing its first keys scans the holes
    they leave: with 10,000 entries that made each new token cost 6 µs more.

    :meth:`admit` keeps a token only the second time it is verified: one
    sent once never gains from an entry, and storing it would push out one
    that is reused, and cost CPU of its own (an entry's objects live long
    and are freed cold). A token reused for its lifetime pays one more
    verification. Tokens seen once are remembered by the hash of their tail
    alone, at most ``max_entries`` of them before that memory starts over.

    Entries are found by the last :data:`TAIL` characters of their token,
    part of its signature, and an entry counts only for the token it holds,
    compared whole. A token's whole hash would cost every request a pass
    over some 600 characters; the tail's, over 32.
    """

    #: Bytes an entry holds besides its token's characters: its Verified,
    #: claims, identity lines and the cache's own links (about 1,000 as
    #: bench/scale.py measures it), so max_bytes bounds real memory.
    ENTRY_OVERHEAD = 1024

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 16 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Verified] = OrderedDict()
        self._bytes = 0
        self._seen: set[int] = set()
        # The entry whose token ends in these characters, if any: the lookup
        # of every request, without a method call of our own. The caller
        # compares the token it holds.
        self.by_tail: Callable[[str], Verified | None] = self._entries.get

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> Verified | None:
        """The entry of exactly this token."""
        entry = self._entries.get(token[-TAIL:])
        return entry if entry is not None and entry.token == token else None

    def admit(self, token: str, verified: Verified) -> None:
        """Keep a token verified for the second time; remember a first one."""
        # A false match of two hashes only keeps a token one sight early.
        seen = self._seen
        mark = hash(token[-TAIL:])
        if mark not in seen:
            if len(seen) >= self.max_entries:
                seen.clear()
            seen.add(mark)
            return
        seen.discard(mark)
        self.put(token, verified)

    def put(self, token: str, verified: Verified) -> None:
        tail = token[-TAIL:]
        entries = self._entries
        if tail in entries:
            # This token, or another with the same tail: that one is then
            # verified each time it comes. Aiming at a cached tail takes
            # knowing it, and it is as secret as its token.
            return
        verified.token = token
        entries[tail] = verified
        self._bytes += len(token) + self.ENTRY_OVERHEAD
        while len(entries) > self.max_entries or self._bytes > self.max_bytes:
            _, oldest = entries.popitem(last=False)
            self._bytes -= len(oldest.token) + self.ENTRY_OVERHEAD

    def discard(self, token: str) -> None:
        tail = token[-TAIL:]
        entry = self._entries.get(tail)
        if entry is not None and entry.token == token:
            del self._entries[tail]
            self._bytes -= len(token) + self.ENTRY_OVERHEAD


# --- validation -------------------------------------------------------------


class Route:
    """An identity provider selected by a deployment, with its audiences."""

    __slots__ = ("audiences", "state")

    def __init__(self, state: IdpState, audiences: frozenset[str]) -> None:
        self.state = state
        self.audiences = audiences


Trace = Callable[[str, str], None]


def build_routes(settings: OAuthSettings, idps: IdentityProviders) -> dict[str, Route]:
    """Issuer -> route for a deployment's selected identity providers.

    Two selected providers with one issuer would be ambiguous; the first
    one named in the deployment wins.
    """
    deployment = frozenset(settings.audiences)
    routes: dict[str, Route] = {}
    for name in settings.identity_providers:
        state = idps.get(name)
        if state is not None and state.issuer not in routes:
            routes[state.issuer] = Route(state, deployment or state.audiences)
    return routes


async def verify(
    token: str, routes: Mapping[str, Route], now: float, trace: Trace | None = None
) -> Verified:
    """Every check of a token, in order; raises TokenError on the first failure.

    With ``trace``, each passed check is reported with a detail; without it
    (the hot path) no detail is ever formatted.
    """
    parsed = parse_token(token)
    route = _route_for(parsed, routes, trace)
    keys = await _candidates(route.state.keyring, parsed)
    return _finish(parsed, route, keys, now, trace)


def verify_with_keys_at_hand(
    token: str, routes: Mapping[str, Route], now: float
) -> Verified | None:
    """:func:`verify` without waiting: None when keys must be fetched first.

    The hot path for a token seen for the first time: the same checks in
    the same order, and no coroutine unless the keys are not there yet.
    """
    parsed = parse_token(token)
    route = _route_for(parsed, routes, None)
    keys = route.state.keyring.keys
    if not keys.loaded:
        return None
    found = keys.candidates(parsed.alg, parsed.kid)
    if not found:
        if _unknown_kid(keys, parsed) is not None:
            return None  # the keys may have changed: refetch first
        raise _no_key(parsed)
    return _finish(parsed, route, found, now, None)


def _route_for(
    parsed: ParsedToken, routes: Mapping[str, Route], trace: Trace | None
) -> Route:
    """The format, algorithm and issuer checks: the route the token is for."""
    if trace:
        trace("format", f"JWS compact, alg {parsed.alg}")
    check_algorithm_supported(parsed.alg)

    route = routes.get(read_issuer(parsed.claims))
    if route is None:
        raise TokenError("issuer", "token issuer not accepted")
    state = route.state
    if trace:
        trace("issuer", state.name)

    check_algorithm_allowed(parsed.alg, state.algorithms)
    if trace:
        trace("algorithm", f"{parsed.alg} allowed")
    return route


def _finish(
    parsed: ParsedToken,
    route: Route,
    keys: tuple[VerificationKey, ...],
    now: float,
    trace: Trace | None,
) -> Verified:
    """The signature, time and audience checks."""
    state = route.state
    key = _verify_signature(parsed, keys, trace)
    claims = read_claims(parsed.claims, state.issuer)
    check_times(claims, now, state.skew)
    if trace:
        trace("expiry", f"expires in {claims.exp - now:.0f} s")
        trace("not_before", "valid now")

    check_audience(claims, route.audiences)
    if trace:
        trace("audience", _audience_detail(route.audiences))
    return Verified(state, key, claims)


def _audience_detail(audiences: frozenset[str]) -> str:
    if not audiences:
        return "not checked: no audience configured"
    return "matches one of " + ", ".join(sorted(audiences))


async def _candidates(
    keyring: Keyring, parsed: ParsedToken
) -> tuple[VerificationKey, ...]:
    keys = await _loaded(keyring)
    found = keys.candidates(parsed.alg, parsed.kid)
    if not found and (kid := _unknown_kid(keys, parsed)) is not None:
        keys = await keyring.refetch_for(kid)
        found = keys.candidates(parsed.alg, parsed.kid)
    if not found:
        raise _no_key(parsed)
    return found


def _unknown_kid(keys: KeySet, parsed: ParsedToken) -> str | None:
    """The token's kid when the set does not have it: a reason to refetch."""
    kid = parsed.kid
    return kid if kid is not None and not keys.has_kid(kid) else None


def _no_key(parsed: ParsedToken) -> TokenError:
    what = "unknown key" if parsed.kid is not None else "no key fits"
    return TokenError("key", f"{what} for the token's algorithm")


async def _loaded(keyring: Keyring) -> KeySet:
    keys = keyring.keys
    if not keys.loaded:
        keys = await keyring.ensure_loaded()
        if not keys.loaded:
            raise KeysUnavailable(keyring.idp)
    return keys


def _verify_signature(
    parsed: ParsedToken, keys: tuple[VerificationKey, ...], trace: Trace | None
) -> VerificationKey:
    if trace and parsed.kid is not None:
        trace("key", f"kid {parsed.kid!r}")
    elif trace:
        trace("key", f"{len(keys)} candidate key(s), no kid")
    for key in keys:
        if verify_signature(parsed.alg, key, parsed.signing_input, parsed.signature):
            if trace:
                trace("signature", "verified")
            return key
    raise TokenError("signature", "invalid signature")


# --- answers ----------------------------------------------------------------


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


@functools.lru_cache(maxsize=256)
def _challenge(error: str, description: str) -> str:
    return (
        f'Bearer realm="{REALM}", error="{error}", '
        f'error_description="{_quoted(description)}"'
    )


def _invalid(exc: TokenError) -> AuthFailure:
    _DENIED[exc.check].inc()
    header = _challenge("invalid_token", exc.description)
    return AuthFailure(
        401,
        "invalid_token",
        f"Invalid bearer token: {exc.description}",
        {"WWW-Authenticate": header},
    )


def _missing() -> AuthFailure:
    _DENIED["missing"].inc()
    return AuthFailure(
        401,
        "unauthorized",
        "Bearer token required",
        {"WWW-Authenticate": f'Bearer realm="{REALM}"'},
    )


def _duplicate(header: str) -> AuthFailure:
    _DENIED["duplicate_header"].inc()
    description = f"more than one {header} header"
    return AuthFailure(
        400,
        "invalid_request",
        f"Malformed request: {description}",
        {"WWW-Authenticate": _challenge("invalid_request", description)},
    )


def _unavailable() -> AuthFailure:
    _DENIED["unavailable"].inc()
    return AuthFailure(
        503,
        "auth_unavailable",
        "The identity provider's keys are not available yet; try again shortly",
        {"Retry-After": "5"},
    )


# --- the authenticator ------------------------------------------------------


class OAuthAuthenticator(Authenticator):
    """Endpoint authentication ``oauth`` for one deployment."""

    def __init__(self, settings: OAuthSettings, idps: IdentityProviders) -> None:
        self._settings = settings
        self._idps = idps
        self._cache = idps.cache
        # An istr: the lookup of every request skips lower-casing the name.
        self._header = istr(settings.header_name)
        self._prefix = settings.auth_header_prefix.strip().lower()
        # The prefix as callers send it, with its space ("Bearer "); with no
        # prefix, a value that starts with anything. None: not read inline.
        # Only an ASCII prefix is (the control plane accepts no other): the
        # general rule compares lower case, where "İ" has two characters, so
        # "İD x" would be read inline but not by the rule, which the inline
        # reading must never contradict.
        sent = settings.auth_header_prefix.strip()
        self._sent_prefix = (sent + " " if sent else "") if sent.isascii() else None
        self._token_at = len(self._sent_prefix or "")
        strip = set(IDENTITY_HEADERS)
        if not settings.forward_token:
            strip.add(settings.header_name.lower())
        self.strip = frozenset(strip)
        self._routes = build_routes(settings, idps)
        self._version = idps.version

    def _current_routes(self) -> dict[str, Route]:
        # Rebuilt once after an identity provider changes, not per request.
        if self._version != self._idps.version:
            self._routes = build_routes(self._settings, self._idps)
            self._version = self._idps.version
        return self._routes

    def check(self, headers: MultiMapping[str]) -> Identity | Awaitable[Identity]:
        # The hot path: a token verified before costs a dict lookup and a few
        # comparisons, inline; a new one, a verification. A coroutine only
        # when the keys must be fetched first.
        values = headers.getall(self._header, ())
        cache = self._cache
        entry = token = None
        if len(values) == 1:
            value = values[0]
            sent = self._sent_prefix
            if sent is not None:
                # The usual case, "Bearer <token>" with one space and no
                # other whitespace around the token. A token verified before
                # is found by its tail and compared whole, as the caller sent
                # it, prefix included: no slice and no hash of the token. (A
                # verified token has no whitespace, so such a value reads as
                # the rule below reads it.) A plain ==: only a caller who has
                # the tail, as secret as the token, gets to the comparison.
                entry = cache.by_tail(value[-TAIL:])
                if entry is not None and value == sent + entry.token:
                    token = entry.token
                else:
                    # Not cached: the entry of this tail, if any, holds
                    # another token.
                    entry = None
                    # An empty value ends in "", which is "in" any string.
                    if value.startswith(sent) and value[-1:] not in " \t":
                        # Not empty: the value is longer than the prefix,
                        # which ends in a space that the value does not.
                        token = value[self._token_at :]
                        if token[0] in " \t":
                            token = None
        if token is None:
            token = self._token(values)
            entry = cache.get(token)
        routes = self._routes
        if self._version != self._idps.version:
            routes = self._current_routes()
        now = time.time()
        try:
            if entry is not None:
                state = entry.state
                route = routes.get(state.issuer)
                if (
                    route is not None
                    and route.state is state
                    and entry.key in state.keyring.keys.keys
                ):
                    _CACHE_HIT.count += 1
                    if not entry.valid_from <= now < entry.valid_until:
                        check_times(entry.claims, now, state.skew)  # says which
                    audiences = route.audiences
                    if audiences and audiences.isdisjoint(entry.claims.aud or ()):
                        check_audience(entry.claims, audiences)  # says which
                    _ALLOWED.count += 1
                    return entry.identity
                self._cache.discard(token)
            _CACHE_MISS.count += 1
            verified = verify_with_keys_at_hand(token, routes, now)
            if verified is None:
                return self._verify(token, routes, now)
            self._cache.admit(token, verified)
        except TokenError as exc:
            raise _invalid(exc) from None
        _ALLOWED.count += 1
        return verified.identity

    async def _verify(
        self, token: str, routes: Mapping[str, Route], now: float
    ) -> Identity:
        try:
            verified = await verify(token, routes, now)
        except TokenError as exc:
            raise _invalid(exc) from None
        except KeysUnavailable:
            raise _unavailable() from None
        self._cache.admit(token, verified)
        _ALLOWED.count += 1
        return verified.identity

    def _token(self, values: Sequence[str]) -> str:
        """The token of the header's values by the general rules, or the refusal."""
        try:
            token = extract_token(values, self._prefix)
        except ValueError:
            raise _duplicate(self._header) from None
        if token is None:
            raise _missing()
        return token


# --- diagnosis --------------------------------------------------------------


class Check(msgspec.Struct, frozen=True):
    """One validation check as diagnosis reports it."""

    name: str
    ok: bool
    detail: str


class Diagnosis(msgspec.Struct, frozen=True):
    """What the gateway would decide for a token, check by check."""

    valid: bool
    failed_check: str | None
    reason: str | None
    identity_provider: str | None
    subject: str | None
    checks: list[Check]


async def diagnose(
    token: str, settings: OAuthSettings, idps: IdentityProviders
) -> Diagnosis:
    """Run the gateway's validation on ``token`` for a deployment's settings.

    The token never appears in the result, nor in any log line.
    """
    checks: list[Check] = []

    def trace(name: str, detail: str) -> None:
        if name == "issuer":
            detail = f"identity provider {detail}"
        checks.append(Check(name, True, detail))

    routes = build_routes(settings, idps)
    try:
        verified = await verify(token.strip(" \t"), routes, time.time(), trace)
    except TokenError as exc:
        return _failed(checks, exc.check, exc.description)
    except KeysUnavailable:
        return _failed(checks, "key", "identity provider keys are unavailable")
    return Diagnosis(True, None, None, verified.state.name, verified.claims.sub, checks)


def _failed(checks: list[Check], name: str, reason: str) -> Diagnosis:
    issuer = next((c for c in checks if c.name == "issuer"), None)
    idp = issuer.detail.removeprefix("identity provider ") if issuer else None
    checks.append(Check(name, False, reason))
    return Diagnosis(False, name, reason, idp, None, checks)
