"""`image_url` -> an object key in our bucket, or a refusal. Nothing here touches the network.

Accepted: a plain object key; `r2://BUCKET/KEY` or `s3://BUCKET/KEY` for the configured bucket; an http(s) URL on
the configured R2 endpoint (path style, /BUCKET/KEY) or under the configured public base URL. Everything else,
other hosts, IP literals, credentials in URLs, file://, is refused. Objects are then read with our own signed
client, never by following the caller's URL, so there is no redirect to follow and no other host to reach.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from origins import Origin, UrlRefused, http_origin
from storage.errors import UnsupportedImageUrl

MAX_KEY_LENGTH = 1024
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def validate_key(key: str) -> str:
    """A key we are willing to read or write: relative, no traversal, no control characters."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise UnsupportedImageUrl(f"an object key must be 1 to {MAX_KEY_LENGTH} characters")
    if _CONTROL.search(key) or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise UnsupportedImageUrl("the object key is not a clean relative path (no '..', '//', '\\', control chars)")
    return key


def resolve_image_key(
    image_url: str, bucket: str, endpoint_url: str | None = None, public_base_url: str | None = None
) -> str:
    """The object key that `image_url` names in `bucket`, or UnsupportedImageUrl."""
    reference = image_url.strip()
    if not _SCHEME.match(reference):
        return validate_key(reference)
    try:
        parts = urlsplit(reference)
    except ValueError:
        raise UnsupportedImageUrl("the image URL cannot be parsed") from None
    scheme = parts.scheme.lower()
    if scheme in ("r2", "s3"):
        if parts.netloc != bucket:
            raise UnsupportedImageUrl(f"{scheme}:// URLs must name the configured bucket {bucket!r}")
        return validate_key(unquote(parts.path.removeprefix("/")))
    if scheme not in ("http", "https"):
        raise UnsupportedImageUrl(f"the scheme {scheme}:// is not supported; send an object key or an R2 URL")
    try:
        origin = http_origin(parts)
    except UrlRefused as exc:
        raise UnsupportedImageUrl(str(exc)) from None
    if public_base_url and _is_origin_of(origin, public_base_url):
        prefix = urlsplit(public_base_url).path.rstrip("/") + "/"
        if parts.path.startswith(prefix):
            return validate_key(unquote(parts.path[len(prefix) :]))
    if endpoint_url and _is_origin_of(origin, endpoint_url):
        bucket_part, _, key = parts.path.removeprefix("/").partition("/")
        if bucket_part != bucket:
            raise UnsupportedImageUrl(f"only objects in the configured bucket {bucket!r} can be read")
        return validate_key(unquote(key))
    raise UnsupportedImageUrl("the image URL is not on the configured R2 endpoint or public base URL")


def _is_origin_of(origin: Origin, base: str) -> bool:
    try:
        return http_origin(base) == origin
    except UrlRefused:
        return False
