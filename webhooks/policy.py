"""Which callback URLs we are willing to POST to: decided before the job is accepted, with no network call.

A callback URL is accepted only when its origin (scheme://host[:port], default ports normalised) is one the
operator listed in WEBHOOK_ALLOWED_ORIGINS. On top of that, the SSRF rules image_url follows (origins.py): no
credentials in the URL; and no IP literals in any form (`127.0.0.1`, `[::1]`, `2130706433`, `0x7f.1`, `0177.0.0.1`),
no fragments, https only except for `localhost` when the allow-list names it explicitly (local testing). The URL
we then send to is rebuilt from the checked parts, so it cannot reach anything the check did not see; redirects
are never followed (sender.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit

from origins import Origin, UrlRefused, http_origin

MAX_URL_LENGTH = 2048
# Anything a URL parser might strip, fold or treat as a separator differently from the HTTP client.
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")
# A plain ASCII DNS name (IDNs go in their xn-- form), no trailing dot.
_DNS_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
# WHATWG URL: a host whose last label is a number (decimal, or 0x hex; octal is decimal digits) is an IPv4 address.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


class UnsupportedCallbackUrl(Exception):
    """The callback URL is refused (API code `unsupported_callback_url`); the message says why and is safe to show."""


class CallbackPolicy:
    """The allow-list of callback origins.

    `allowed_origins`: entries like `https://hooks.example.com` or `http://localhost:8080` (a path, query or
    fragment is not part of an origin and is refused). Raises ValueError naming the bad entry when one breaks the
    rules above. An empty list turns webhooks off: every callback URL is then refused.
    """

    def __init__(self, allowed_origins: Iterable[str]) -> None:
        self._allowed = frozenset(_allowed_origin(entry) for entry in allowed_origins)

    @property
    def enabled(self) -> bool:
        return bool(self._allowed)

    def check(self, url: str) -> str:
        """The URL to POST to (scheme and host lower-cased, default port dropped), or UnsupportedCallbackUrl."""
        if not self.enabled:
            raise UnsupportedCallbackUrl(
                "webhooks are off on this server (WEBHOOK_ALLOWED_ORIGINS is empty): leave callback_url out"
            )
        try:
            parts, origin = _parse(url)
        except UrlRefused as exc:
            raise UnsupportedCallbackUrl(f"callback_url: {exc}") from None
        if origin not in self._allowed:
            raise UnsupportedCallbackUrl(f"callback_url: the origin {origin} is not in WEBHOOK_ALLOWED_ORIGINS")
        query = f"?{parts.query}" if parts.query else ""
        return f"{origin}{parts.path or '/'}{query}"


def _allowed_origin(entry: str) -> Origin:
    try:
        parts, origin = _parse(entry.strip())
    except UrlRefused as exc:
        raise ValueError(f"WEBHOOK_ALLOWED_ORIGINS entry {entry!r}: {exc}") from None
    if parts.path not in ("", "/") or "?" in entry:
        raise ValueError(f"WEBHOOK_ALLOWED_ORIGINS entry {entry!r}: an origin is scheme://host[:port], with no path")
    return origin


def _parse(url: str) -> tuple[SplitResult, Origin]:
    if len(url) > MAX_URL_LENGTH:
        raise UrlRefused(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if _UNSAFE.search(url):
        raise UrlRefused("the URL contains spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UrlRefused("the URL cannot be parsed") from None
    origin = http_origin(parts)
    if "#" in url:
        raise UrlRefused("the URL has a fragment")
    if _is_ip_literal(parts.netloc, origin.host):
        raise UrlRefused("IP addresses are not accepted; use the host's DNS name")
    if not _DNS_NAME.fullmatch(origin.host):
        raise UrlRefused("the host is not a plain DNS name (letters, digits, '-' and '.'; IDNs in xn-- form)")
    if origin.scheme != "https" and not _is_loopback_name(origin.host):
        raise UrlRefused("callback URLs must use https (http only for localhost)")
    return parts, origin


def _is_ip_literal(netloc: str, host: str) -> bool:
    """IPv6 (in brackets), or a host whose last label is a number: the WHATWG URL standard parses that as IPv4."""
    return "[" in netloc or ":" in host or bool(_NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]))


def _is_loopback_name(host: str) -> bool:
    """`localhost` and `*.localhost`, which resolve to the loopback interface (RFC 6761 section 6.3)."""
    return host == "localhost" or host.endswith(".localhost")
