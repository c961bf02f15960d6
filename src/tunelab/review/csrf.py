"""Cross-site request forgery defences of the review app: every POST must come from a page of
the app itself (its Origin, else its Referer, is the request's own scheme://host:port) and
carry the form's token.

SameSite=Strict cookies are not enough: a page on another port of the same host
(http://127.0.0.1:9999 against the app on :8000) is the *same site*, so the browser sends the
cookie with its forged form. Such a page can also write cookies for the host, which defeats a
plain double-submit token; the Origin check stops it. The tokens are the second, independent
lock: the per-session token is an HMAC of the session cookie, the login form's an HMAC of a
random nonce kept in its own cookie (signed double-submit: there is no session yet to bind to).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError
from starlette.responses import Response

from tunelab.review.store import Setting, Store

SECRET_KEY = "csrf_secret"
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def load_secret(store: Store) -> bytes:
    """The project's CSRF key, created on first use and kept in the database, so tokens survive
    a restart and hold across several server processes on one project."""

    def get_or_create(s) -> str:
        row = s.get(Setting, SECRET_KEY)
        if row is None:
            row = Setting(key=SECRET_KEY, value=secrets.token_hex(32))
            s.add(row)
            s.flush()  # two servers starting at once: the loser's insert fails here and is retried
        return row.value

    return bytes.fromhex(store.write(get_or_create, retry=(IntegrityError,)))


class Tokens:
    def __init__(self, secret: bytes):
        self._secret = secret

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()

    def session(self, cookie: str) -> str:
        """The token of every form a signed-in reviewer sees (changes when their token does)."""
        return self._mac("session", cookie)

    def login(self, nonce: str) -> str:
        return self._mac("login", nonce)

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(24)

    @staticmethod
    def valid(expected: str, given: object) -> bool:
        return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


def _origin(scheme: str | None, netloc: str | None) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the default port filled in; None when it cannot be read."""
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is not a number
        return None
    return (parts.scheme, parts.hostname, port) if parts.hostname and port else None


def request_origin(scope) -> tuple[str, str, int] | None:
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
    return _origin(scope["scheme"], host)


def sender_origin(scope) -> tuple[str, str, int] | None:
    """Where the browser says the request comes from: Origin, else Referer; None when neither
    is there or it is `null` (sandboxed frames, pages with Referrer-Policy: no-referrer)."""
    headers = dict(scope["headers"])
    for name in (b"origin", b"referer"):
        value = headers.get(name, b"").decode("latin-1").strip()
        if value:
            if value == "null":
                return None
            parts = urlsplit(value)
            return _origin(parts.scheme, parts.netloc)
    return None


class SameOrigin:
    """Refuse any state-changing request whose Origin/Referer is not the app's own origin,
    before its body is read. Browsers send Origin with every form POST, so only non-browser
    clients meet the "neither header" refusal; they can send `Origin: <the app's URL>`.
    Behind a TLS proxy the app must see the public scheme and host (uvicorn's
    --proxy-headers with X-Forwarded-Proto, and the Host header passed on)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in UNSAFE:
            sender, own = sender_origin(scope), request_origin(scope)
            if sender is None or sender != own:
                await Response("refused: this form was not sent from a page of the review app; open the app "
                               "and submit it from there\n", status_code=403, media_type="text/plain")(scope, receive, send)
                return
        await self.app(scope, receive, send)
