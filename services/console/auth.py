"""Console users, logins and sessions.

Users live in a JSON file (``{"users": {"name": {"hash": "$argon2id$..."}}}``, mode
0600) written by ``pfmon console user add``; passwords are hashed with argon2id
(argon2-cffi). A login opens a session: a random token in an HttpOnly, SameSite=Strict
cookie (Secure when the page is served over TLS) and a CSRF token that every action
must carry in the ``X-CSRF-Token`` header. Failed logins are limited per client
address and per user name.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from shared.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_hasher = PasswordHasher()


def check_user_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"user name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    return name


def load_users(path: Path) -> dict[str, str]:
    """``{name: argon2 hash}`` from the users file; a missing file is no users."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the users file: {exc.strerror or exc}") from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict):
        raise ConfigError(f'{path}: expected {{"users": {{name: {{"hash": ...}}}}}}')
    out: dict[str, str] = {}
    for name, entry in users.items():
        digest = entry.get("hash") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or not digest.startswith("$argon2"):
            raise ConfigError(f"{path}: users.{name}.hash: expected an argon2 hash")
        out[check_user_name(name)] = digest
    return out


def add_user(path: Path, name: str, password: str) -> bool:
    """Add or replace ``name``; the file is written 0600. Returns True if it was new."""
    check_user_name(name)
    if len(password) < 8:
        raise ConfigError("the password is too short: at least 8 characters")
    users = load_users(path)
    new = name not in users
    users[name] = _hasher.hash(password)
    data = {"users": {n: {"hash": h} for n, h in sorted(users.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return new


@dataclass
class Session:
    user: str
    csrf: str
    expires: float


@dataclass
class Auth:
    """Users, sessions and the login rate limit of one console."""

    users_file: Path
    session_ttl: float = 8 * 3600.0
    attempts: int = 5
    window: float = 300.0
    clock: Callable[[], float] = time.monotonic
    sessions: dict[str, Session] = field(default_factory=dict)
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def limited(self, *keys: str) -> float:
        """Seconds until a login from ``keys`` (address, user) may be tried; 0 = now."""
        now = self.clock()
        wait = 0.0
        for key in keys:
            q = self._failures.get(key)
            if not q:
                continue
            while q and now - q[0] > self.window:
                q.popleft()
            if len(q) >= self.attempts:
                wait = max(wait, self.window - (now - q[0]))
        return wait

    def login(self, user: str, password: str, address: str) -> tuple[str, Session] | None:
        """(cookie token, new session), or None (a failure counted on address and user)."""
        digest = load_users(self.users_file).get(user)
        ok = False
        if digest is not None:
            try:
                ok = _hasher.verify(digest, password)
            except (VerificationError, InvalidHashError):
                ok = False
        else:
            # same work for an unknown name: no timing hint of which names exist
            _hasher.hash(password)
        if not ok:
            now = self.clock()
            for key in (f"addr:{address}", f"user:{user}"):
                self._failures.setdefault(key, deque()).append(now)
            return None
        now = self.clock()
        for stale in [t for t, s in self.sessions.items() if s.expires < now]:
            del self.sessions[stale]
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), self.clock() + self.session_ttl)
        self.sessions[token] = session
        return token, session

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        s = self.sessions.get(token)
        if s is None:
            return None
        if s.expires < self.clock():
            del self.sessions[token]
            return None
        return s

    def logout(self, token: str | None) -> None:
        if token:
            self.sessions.pop(token, None)

    @staticmethod
    def csrf_ok(session: Session, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(session.csrf, sent or "")
