"""Sessions, CSRF tokens and the login rate limit of the web review.

The session is Starlette's signed cookie (HttpOnly, SameSite, Secure behind TLS): it holds the user's id,
a fingerprint of their password hash (a password change ends their sessions) and the CSRF token. Every
state-changing request must carry that token (form field `csrf_token` or header `X-CSRF-Token`); SameSite
alone is not enough (older browsers, same-site subdomains).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_token(session: dict[str, object]) -> str:
    """The session's CSRF token, created on first use."""
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = new_token()
        session["csrf"] = token
    return token


def csrf_ok(session: dict[str, object], presented: str | None) -> bool:
    expected = session.get("csrf")
    if not isinstance(expected, str) or not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())


class EndedSessions:
    """Session ids ended by signing out, remembered for the session lifetime: the session cookie is signed,
    not stored here, so a copy taken before sign-out would otherwise stay valid until it expires. In memory
    (one serve process); a restart with a fixed CHROMOBATCH_WEB_SECRET forgets them, which the deploy docs say."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()

    def end(self, sid: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._ended[sid] = now + self.lifetime
            if len(self._ended) > 10_000:  # forget those past the lifetime (their cookies have expired)
                for key in [k for k, until in self._ended.items() if until < now]:
                    del self._ended[key]

    def ended(self, sid: str) -> bool:
        with self._lock:
            until = self._ended.get(sid)
        return until is not None and until >= time.monotonic()


class LoginLimiter:
    """At most `per_user` failed logins per account name and `per_client` per client address within
    `window` seconds; a success clears the account's failures. In memory: one serve process (uvicorn
    --workers 1, as `chromobatch serve` runs it)."""

    def __init__(self, *, per_user: int = 5, per_client: int = 20, window: float = 900.0) -> None:
        self.per_user, self.per_client, self.window = per_user, per_client, window
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._fails.setdefault(key, deque())
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def blocked(self, user: str, client: str) -> float:
        """Seconds until another try is allowed (0: allowed now)."""
        now = time.monotonic()
        with self._lock:
            wait = 0.0
            for key, limit in ((f"u:{user.lower()}", self.per_user), (f"c:{client}", self.per_client)):
                q = self._recent(key, now)
                if len(q) >= limit:
                    wait = max(wait, self.window - (now - q[0]))
            return wait

    def failed(self, user: str, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (f"u:{user.lower()}", f"c:{client}"):
                self._recent(key, now).append(now)
            if len(self._fails) > 100_000:  # a flood of names: forget the oldest rather than grow without end
                for key in list(self._fails)[:50_000]:
                    del self._fails[key]

    def succeeded(self, user: str) -> None:
        with self._lock:
            self._fails.pop(f"u:{user.lower()}", None)
