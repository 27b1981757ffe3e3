"""The origin of an http(s) URL a caller sent us: the one rule set that image_url and callback_url checks share.

An origin is (scheme, host, port) with the host lower-cased and the default port filled in (RFC 6454), so
`https://a.example` and `https://A.example:443/x` have the same origin. URLs carrying credentials (userinfo) are
refused outright: they would either leak into logs or be sent somewhere we did not intend.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlRefused(ValueError):
    """The URL is not one we accept; the message is safe to show to the caller."""


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        """`scheme://host` plus `:port` when it is not the scheme's default."""
        port = "" if DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}"


def http_origin(url: str | SplitResult) -> Origin:
    """The origin of an http(s) URL.

    Raises UrlRefused when the URL cannot be parsed, is not http or https, has credentials, has no host, or has a
    port outside 0-65535.
    """
    try:
        parts = url if isinstance(url, SplitResult) else urlsplit(url)
    except ValueError:
        raise UrlRefused("the URL cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UrlRefused(f"the scheme {scheme}:// is not supported")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("URLs with credentials are not accepted")
    try:
        port = parts.port
    except ValueError:
        raise UrlRefused("the URL has an invalid port") from None
    if not parts.hostname:
        raise UrlRefused("the URL has no host")
    return Origin(scheme, parts.hostname.lower(), DEFAULT_PORTS[scheme] if port is None else port)
