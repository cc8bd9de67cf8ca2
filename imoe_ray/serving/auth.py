"""API keys: who a caller is, what they may do, and how fast.

    imoe api-keys create NAME ──► auth/keys.json   {name, role, sha256 of the key, max_priority, rate, learn}
                                  (the key itself is printed once and never stored)

    request ──► Authorization: Bearer KEY ──► sha256 ──► the key's record ──► the caller
                (none or unknown: 401)                   (over its rate: 429 with Retry-After)

With no key in the store the server is open (and says so); once one key exists, every endpoint but
`GET /healthz` needs one. A key is the caller's identity everywhere: the job queue's agent is the
key's name (or `NAME/sub-agent`), a key sees and cancels only its own jobs (an admin sees all),
its priority is capped, and whether its answers may be learned follows its `learn` flag.
Keys are 256-bit random secrets, so one unsalted SHA-256 is enough to store them safely.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from imoe_ray.store import Store
from imoe_ray.store.layout import API_KEYS

KEY_PREFIX = "imoe-"
Role = Literal["user", "admin"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # no "/": sub-agents are NAME/sub


class ApiKey(BaseModel):
    """One key's record (never the key itself)."""
    name: str
    role: Role = "user"
    sha256: str
    max_priority: int | None = Field(None, ge=0, description="highest job priority; null: the queue's maximum")
    rate: float | None = Field(None, gt=0, description="requests per second (bursts of twice that, at least one); "
                                 "null: no limit")
    learn: bool = Field(True, description="whether answers to this key may be learned into the knowledge base")
    created: float = Field(default_factory=time.time)

    def public(self) -> dict:
        return self.model_dump(exclude={"sha256"})


class KeysFile(BaseModel):
    keys: list[ApiKey] = []


class ApiKeyError(ValueError):
    """A key command that cannot be done (a bad, duplicate or unknown name): one line for the CLI."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_keys(store: Store) -> KeysFile:
    return KeysFile.model_validate(store.read_json(*API_KEYS)) if store.is_file(*API_KEYS) else KeysFile()


def create_key(store: Store, name: str, role: Role = "user", max_priority: int | None = None,
               rate: float | None = None, learn: bool = True) -> tuple[ApiKey, str]:
    """A new key for NAME: (its record, the key). Names are unique; the store's writer lock is held."""
    if not _NAME.match(name):
        raise ApiKeyError(f"{name[:64]!r} is not a key name: letters, digits, '.', '_' and '-', 1 to 64 characters")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(name=name, role=role, sha256=digest(secret), max_priority=max_priority, rate=rate, learn=learn)
    with store.lock(f"api-keys create {name}"):
        keys = load_keys(store)
        if any(k.name == name for k in keys.keys):
            raise ApiKeyError(f"a key named {name!r} exists; revoke it first (imoe api-keys revoke {name})")
        keys.keys.append(record)
        store.write_json(keys.model_dump(mode="json"), *API_KEYS)
    return record, secret


def revoke_key(store: Store, name: str) -> None:
    with store.lock(f"api-keys revoke {name}"):
        keys = load_keys(store)
        kept = [k for k in keys.keys if k.name != name]
        if len(kept) == len(keys.keys):
            raise ApiKeyError(f"no key named {name!r}; see imoe api-keys list")
        store.write_json(KeysFile(keys=kept).model_dump(mode="json"), *API_KEYS)


class KeyRing:
    """The keys a server checks requests against, re-read when the file changes (at most once a
    second), with one token bucket per key for its rate."""

    def __init__(self, store: Store, refresh_s: float = 1.0):
        self.store, self.refresh_s = store, refresh_s
        self._by_digest: dict[str, ApiKey] = {}
        self._identity, self._checked = object(), 0.0
        self._buckets: dict[str, tuple[float, float]] = {}  # name → (tokens, last time)
        self._lock = threading.Lock()
        self.refresh(force=True)

    @property
    def has_keys(self) -> bool:
        """True once any key exists: then every request but the health check needs one."""
        return bool(self._by_digest)

    def due(self) -> bool:
        return time.monotonic() - self._checked >= self.refresh_s

    def refresh(self, force: bool = False) -> None:
        """Re-read the keys file when it changed (at most once per `refresh_s` unless forced)."""
        if not force and not self.due():
            return
        self._checked = time.monotonic()
        identity = self.store.identity(*API_KEYS)
        if identity == self._identity:
            return
        self._identity = identity
        self._by_digest = {k.sha256: k for k in load_keys(self.store).keys}

    def verify(self, authorization: str | None) -> ApiKey | None:
        """The key an `Authorization: Bearer KEY` header names, or None."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        wanted = digest(authorization[7:].strip())
        for known, key in self._by_digest.items():  # constant time per comparison
            if hmac.compare_digest(known, wanted):
                return key
        return None

    def allow(self, key: ApiKey) -> bool:
        """Take one request from the key's bucket (a burst of twice its rate, at least one); False when empty."""
        if key.rate is None:
            return True
        burst = max(1.0, 2 * key.rate)
        with self._lock:
            now = time.monotonic()
            tokens, last = self._buckets.get(key.name, (burst, now))
            tokens = min(burst, tokens + (now - last) * key.rate)
            if tokens < 1:
                self._buckets[key.name] = (tokens, now)
                return False
            self._buckets[key.name] = (tokens - 1, now)
            return True


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its key's name, or the client address on a server without keys."""
    name: str | None
    key: ApiKey | None = None

    @property
    def learn(self) -> bool:
        return self.key is None or self.key.learn


def caller_of(request) -> Caller:
    """The caller of a Starlette request that went through `Authenticate`."""
    key = getattr(request.state, "api_key", None)
    if key is not None:
        return Caller(key.name, key)
    return Caller(request.client.host if request.client else None)


def agent_of(key: ApiKey | None, agent: str | None) -> str:
    """The job queue's agent: the key's name, or a sub-agent inside its namespace (`NAME/sub`);
    without keys, what the client says."""
    if key is None:
        return agent or "anonymous"
    if not agent or agent == key.name:
        return key.name
    return agent if agent.startswith(key.name + "/") else f"{key.name}/{agent}"


def owns(key: ApiKey | None, agent: str) -> bool:
    """Whether a caller may see or cancel a job of `agent` (admins and keyless servers: every job)."""
    return key is None or key.role == "admin" or agent == key.name or agent.startswith(key.name + "/")


_PROCESS_KEYS: dict[str, KeyRing] = {}


def check_keys_in_this_process(ring: KeyRing) -> None:
    """The key ring `Authenticate` checks in this process when the application's state names none
    (a Serve replica: its ASGI app is built after the deployment's constructor runs)."""
    _PROCESS_KEYS["keys"] = ring


class Authenticate:
    """ASGI middleware: once the application's `state.keys` (a `KeyRing`; else the one given to
    `check_keys_in_this_process`) holds any key, a request
    other than the health check, the console's files and the API description needs a known key (401 otherwise) within its rate (429 with
    Retry-After otherwise); the key is left in the request's state as `api_key` (None when the
    server is open)."""

    # the health check, the console's static page and the API's own description hold no data
    OPEN_PATHS = frozenset({"/healthz", "/", "/docs", "/openapi.json"})
    OPEN_PREFIXES = ("/console/",)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import asyncio

        ring: KeyRing | None = getattr(getattr(scope.get("app"), "state", None), "keys", None) \
            or _PROCESS_KEYS.get("keys")
        key = None
        path = scope.get("path", "")
        if ring is not None and path not in self.OPEN_PATHS and not path.startswith(self.OPEN_PREFIXES):
            if ring.due():
                await asyncio.to_thread(ring.refresh)  # the keys file may live on an object store
            if ring.has_keys:
                headers = dict(scope.get("headers") or [])
                key = ring.verify(headers.get(b"authorization", b"").decode("latin-1"))
                if key is None:
                    return await _refuse(send, 401, "missing or unknown API key: send `Authorization: Bearer KEY` "
                                                    "(keys come from `imoe api-keys create`)", "invalid_api_key",
                                         "authentication_error")
                if not ring.allow(key):
                    return await _refuse(send, 429, f"key {key.name!r} is over its rate of {key.rate:g} requests/s; "
                                                    "retry shortly", "rate_limit_exceeded", "rate_limit_error")
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


async def _refuse(send, status: int, message: str, code: str, kind: str) -> None:
    import json

    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status == 429:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
