"""Identity provider keys: JWK sets fetched without blocking, parsed once.

A :class:`Keyring` holds one identity provider's current :class:`KeySet`. It
refreshes in the background, refetches when a token names an unknown key
(one fetch in flight, at most one per cooldown) and keeps the last good keys
when a fetch fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import aiohttp
import msgspec
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.log import jwks_log
from gateway.tokens import (
    ALGORITHMS,
    PublicKey,
    VerificationKey,
    b64url_decode,
)

__all__ = [
    "FETCH_TIMEOUT_S",
    "MAX_DOCUMENT_BYTES",
    "MAX_KEYS",
    "REFETCH_COOLDOWN_S",
    "FetchError",
    "KeySet",
    "KeySource",
    "Keyring",
    "UnusableKey",
    "fetch_json",
    "parse_jwk",
    "parse_jwks",
]

FETCH_TIMEOUT_S: Final = 5.0
REFETCH_COOLDOWN_S: Final = 10.0
#: A JWK set or discovery document larger than this is refused.
MAX_DOCUMENT_BYTES: Final = 1 << 20
MIN_RSA_BITS: Final = 2048
#: Usable keys kept of one set, as many as an inline set may hold. Parsing
#: stops there, so a huge set costs no more than this many keys.
MAX_KEYS: Final = 64


class FetchError(Exception):
    """A JWK set or discovery document that could not be fetched or read."""


class UnusableKey(Exception):
    """A JWK the gateway cannot verify with; the message says why."""


# --- parsing ----------------------------------------------------------------

_RSA_ALGS = frozenset(a for a, f in ALGORITHMS.items() if f == "RSA")
_CURVES: dict[str, tuple[ec.EllipticCurve, int, str]] = {
    "P-256": (ec.SECP256R1(), 32, "ES256"),
    "P-384": (ec.SECP384R1(), 48, "ES384"),
    "P-521": (ec.SECP521R1(), 66, "ES512"),
}


def parse_jwk(jwk: object) -> VerificationKey:
    """One JWK as a verification key, or :class:`UnusableKey` saying why."""
    if not isinstance(jwk, dict):
        raise UnusableKey("not a JSON object")
    _check_intent(jwk)
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise UnusableKey("kid is not a string")
    public_key, algorithms = _public_key(jwk)
    alg = jwk.get("alg")
    if alg is not None:
        if not isinstance(alg, str):
            raise UnusableKey("alg is not a string")
        if alg not in algorithms:
            raise UnusableKey("alg does not fit the key type")
        algorithms = frozenset({alg})
    return VerificationKey(kid, public_key, algorithms)


def _check_intent(jwk: dict[str, Any]) -> None:
    use = jwk.get("use")
    if use is not None and use != "sig":
        raise UnusableKey("use is not sig")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise UnusableKey("key_ops does not allow verify")
    if "d" in jwk:
        raise UnusableKey("private key published in a JWK set")


def _public_key(jwk: dict[str, Any]) -> tuple[PublicKey, frozenset[str]]:
    kty = jwk.get("kty")
    if kty == "RSA":
        return _rsa(jwk), _RSA_ALGS
    if kty == "EC":
        return _ec(jwk)
    if kty == "OKP":
        return _okp(jwk), frozenset({"EdDSA"})
    if kty == "oct":
        raise UnusableKey("symmetric keys are never used")
    raise UnusableKey("unknown key type")


def _member(jwk: dict[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise UnusableKey(f"member {name} missing")
    try:
        return b64url_decode(value)
    except ValueError:
        raise UnusableKey(f"member {name} is not base64url") from None


def _rsa(jwk: dict[str, Any]) -> rsa.RSAPublicKey:
    n = int.from_bytes(_member(jwk, "n"), "big")
    e = int.from_bytes(_member(jwk, "e"), "big")
    if n.bit_length() < MIN_RSA_BITS:
        raise UnusableKey(f"RSA key shorter than {MIN_RSA_BITS} bits")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise UnusableKey("invalid RSA key") from None


def _ec(jwk: dict[str, Any]) -> tuple[ec.EllipticCurvePublicKey, frozenset[str]]:
    crv = jwk.get("crv")
    if not isinstance(crv, str) or crv not in _CURVES:
        raise UnusableKey("unsupported curve")
    curve, size, alg = _CURVES[crv]
    x, y = _member(jwk, "x"), _member(jwk, "y")
    if len(x) != size or len(y) != size:
        raise UnusableKey("coordinates do not fit the curve")
    try:
        point = b"\x04" + x + y
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError:
        raise UnusableKey("point is not on the curve") from None
    return key, frozenset({alg})


def _okp(jwk: dict[str, Any]) -> PublicKey:
    crv = jwk.get("crv")
    x = _member(jwk, "x")
    try:
        if crv == "Ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(x)
        if crv == "Ed448":
            return ed448.Ed448PublicKey.from_public_bytes(x)
    except ValueError:
        raise UnusableKey("invalid OKP key") from None
    raise UnusableKey("unsupported curve")


class KeySet:
    """An identity provider's usable keys, indexed for the hot path."""

    __slots__ = ("_fitting", "by_kid", "jwks", "keys", "loaded")

    def __init__(
        self,
        keys: tuple[VerificationKey, ...],
        jwks: tuple[object, ...] = (),
        loaded: bool = True,
    ) -> None:
        self.keys = keys
        self.jwks = jwks
        self.loaded = loaded
        by_kid: dict[str, list[VerificationKey]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        self.by_kid = {kid: tuple(ks) for kid, ks in by_kid.items()}
        # Every answer of candidates() that can be asked for, worked out once
        # per set: (alg, kid) for each algorithm a key allows and each kid of
        # the set, and (alg, None). An unknown kid is not stored, so no token
        # can grow this.
        algorithms = {alg for key in keys for alg in key.algorithms}
        self._fitting = {
            (alg, kid): tuple([k for k in ks if alg in k.algorithms])
            for alg in algorithms
            for kid, ks in [(None, keys), *self.by_kid.items()]
        }

    def candidates(self, alg: str, kid: str | None) -> tuple[VerificationKey, ...]:
        """Keys to try for a token, in set order; empty for an unknown ``kid``.

        A token without ``kid`` tries every key that fits its algorithm, as
        the contract says: a forged one costs up to :data:`MAX_KEYS`
        verifications, which is why a set is held to that many keys.
        """
        return self._fitting.get((alg, kid), ())

    def has_kid(self, kid: str) -> bool:
        return kid in self.by_kid


EMPTY_KEYS: Final = KeySet((), loaded=False)


def parse_jwks(idp: str, document: object, previous: KeySet = EMPTY_KEYS) -> KeySet:
    """Parse a JWK set; unusable JWKs are skipped one by one, with a log line.

    JWKs equal to one of ``previous`` keep their key object, so a refresh
    that changes nothing leaves verified tokens verified.
    """
    jwks = _key_list(document)
    known = dict(zip(map(_canonical, previous.jwks), previous.keys, strict=False))
    keys: list[VerificationKey] = []
    kept: list[object] = []
    for index, jwk in enumerate(jwks):
        if len(keys) == MAX_KEYS:
            _dropped(idp, len(jwks) - index)
            break
        key = known.get(_canonical(jwk)) or _parse_logged(idp, index, jwk)
        if key is not None:
            keys.append(key)
            kept.append(jwk)
    return KeySet(tuple(keys), tuple(kept))


def _dropped(idp: str, count: int) -> None:
    jwks_log.warning(
        "identity provider %s: %d JWK(s) after the first %d usable keys dropped",
        idp,
        count,
        MAX_KEYS,
    )


def _key_list(document: object) -> list[object]:
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise FetchError("not a JWK set")
    return keys


def _canonical(jwk: object) -> bytes:
    # msgspec, unlike orjson, encodes integers of any size: a JWK member such
    # as a 128-bit timestamp must not make the whole set unreadable.
    try:
        return msgspec.json.encode(jwk, order="sorted")
    except (TypeError, msgspec.EncodeError):
        # Not a JSON value (only a hand-built policy can hold one).
        return repr(jwk).encode()


def _parse_logged(idp: str, index: int, jwk: object) -> VerificationKey | None:
    try:
        return parse_jwk(jwk)
    except UnusableKey as exc:
        reason = str(exc)
    except Exception as exc:  # one odd JWK must never cost the others
        reason = f"unreadable ({type(exc).__name__})"
    kid = jwk.get("kid") if isinstance(jwk, dict) else None
    name = kid if isinstance(kid, str) else f"#{index}"
    jwks_log.warning("identity provider %s: JWK %.64r skipped: %s", idp, name, reason)
    return None


# --- fetching ---------------------------------------------------------------


class KeySource:
    """Where an identity provider's keys come from; equal sources share keys."""

    __slots__ = ("discovery", "issuer", "jwks", "jwks_uri")

    def __init__(
        self,
        issuer: str,
        jwks_uri: str | None,
        jwks: Mapping[str, object] | None,
        discovery: bool,
    ) -> None:
        self.issuer = issuer
        self.jwks_uri = jwks_uri
        self.jwks = jwks
        self.discovery = discovery

    def _identity(self) -> tuple[object, ...]:
        inline = _canonical(self.jwks) if self.jwks is not None else None
        issuer = self.issuer if self.discovery else None
        return (self.jwks_uri, inline, self.discovery, issuer)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeySource):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())


SessionFactory = Callable[[], Awaitable[aiohttp.ClientSession]]
FetchHook = Callable[[str, bool], None]


async def fetch_json(session: aiohttp.ClientSession, url: str, limit_s: float) -> Any:
    """GET a JSON document with a time limit and a size cap.

    Redirects are not followed: keys come from the configured host alone.
    """
    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=limit_s),
            headers={"Accept": "application/json"},
            allow_redirects=False,
        ) as resp:
            if 300 <= resp.status < 400:
                raise FetchError(f"{url} answered {resp.status}, a redirect")
            if resp.status != 200:
                raise FetchError(f"{url} answered {resp.status}")
            body = await _read_capped(resp)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FetchError(f"{url}: {type(exc).__name__}") from None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise FetchError(f"{url} did not answer JSON") from None


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    if (resp.content_length or 0) > MAX_DOCUMENT_BYTES:
        raise FetchError(f"{resp.url} document too large")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        body += chunk
        if len(body) > MAX_DOCUMENT_BYTES:
            raise FetchError(f"{resp.url} document too large")
    return bytes(body)


def _inline_keys(idp: str, jwks: Mapping[str, object]) -> KeySet:
    try:
        return parse_jwks(idp, jwks)
    except FetchError as exc:
        # Never loaded, so its tokens get 503 until a readable set arrives.
        jwks_log.error("identity provider %s: inline keys unusable: %s", idp, exc)
        return EMPTY_KEYS


class Keyring:
    """One identity provider's keys over time: fetched, refreshed, kept."""

    def __init__(
        self,
        idp: str,
        source: KeySource,
        session: SessionFactory,
        *,
        refresh_s: float = 300.0,
        timeout_s: float = FETCH_TIMEOUT_S,
        cooldown_s: float = REFETCH_COOLDOWN_S,
        on_fetch: FetchHook | None = None,
    ) -> None:
        self.idp = idp
        self.source = source
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.keys = EMPTY_KEYS
        self._session = session
        self._on_fetch = on_fetch
        self._jwks_uri = source.jwks_uri
        self._inflight: asyncio.Task[None] | None = None
        self._last_end = -float("inf")
        self._refresher: asyncio.Task[None] | None = None
        if source.jwks is not None:
            self.keys = _inline_keys(idp, source.jwks)

    @property
    def remote(self) -> bool:
        return self.source.jwks is None

    def start(self) -> None:
        """Begin background refreshing; needs a running loop."""
        if self.remote and self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None:
                task.cancel()
        for task in (self._refresher, self._inflight):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        self._refresher = self._inflight = None

    async def ensure_loaded(self) -> KeySet:
        """The keys, waiting (bounded) for a first fetch if there are none yet."""
        self.start()
        if not self.keys.loaded:
            await self._fetch_now()
        return self.keys

    async def refetch_for(self, kid: str) -> KeySet:
        """Fetch again for an unknown ``kid``, unless a fetch is too recent."""
        if self.remote and not self.keys.has_kid(kid):
            await self._fetch_now()
        return self.keys

    async def _fetch_now(self, *, scheduled: bool = False) -> None:
        """Join the fetch in flight, or start one if the cooldown has run out.

        The cooldown bounds fetches caused by tokens; a ``scheduled`` refresh
        keeps its own period, even a shorter one.
        """
        task = self._inflight
        if task is None:
            cooled = time.monotonic() - self._last_end >= self.cooldown_s
            if not self.remote or not (cooled or scheduled):
                return
            task = self._inflight = asyncio.get_running_loop().create_task(
                self._fetch()
            )
        # Waiters are bounded by the fetch's own time limit; shield keeps one
        # impatient caller from cancelling the fetch the others wait on.
        await asyncio.wait([asyncio.shield(task)], timeout=self.timeout_s * 2 + 1)

    async def _fetch(self) -> None:
        try:
            document = await self._fetch_document()
            self.keys = parse_jwks(self.idp, document, self.keys)
            self._report(True)
        except FetchError as exc:
            self._failed(str(exc))
        except Exception as exc:  # a failed fetch must never fail requests
            self._failed(type(exc).__name__)
        finally:
            self._last_end = time.monotonic()
            self._inflight = None

    def _failed(self, reason: str) -> None:
        # Discover again next time: the provider may have moved its keys.
        self._jwks_uri = self.source.jwks_uri
        self._report(False)
        jwks_log.warning("identity provider %s: keys not fetched: %s", self.idp, reason)

    def _report(self, ok: bool) -> None:
        if self._on_fetch is not None:
            self._on_fetch(self.idp, ok)

    async def _fetch_document(self) -> object:
        session = await self._session()
        if self._jwks_uri is None:
            self._jwks_uri = await self._discover(session)
        return await fetch_json(session, self._jwks_uri, self.timeout_s)

    async def _discover(self, session: aiohttp.ClientSession) -> str:
        url = self.source.issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await fetch_json(session, url, self.timeout_s)
        if not isinstance(doc, dict) or doc.get("issuer") != self.source.issuer:
            raise FetchError(f"{url} names another issuer")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise FetchError(f"{url} has no jwks_uri")
        if url.lower().startswith("https://") and uri.startswith("http://"):
            raise FetchError(f"{url} names a plain http jwks_uri")
        return uri

    async def _refresh(self) -> None:
        while True:
            await self._fetch_now(scheduled=True)
            # Without keys yet, try again soon rather than after a full period.
            delay = self.refresh_s
            if not self.keys.loaded:
                delay = min(delay, self.cooldown_s)
            await asyncio.sleep(max(delay, 0.05))
