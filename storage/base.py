"""The interface the pipeline uses, whatever holds the objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StoredObject:
    key: str
    url: str


@dataclass(frozen=True)
class ImageObject:
    """An image's bytes and the identity they were read under: the store, bucket and key, and the object's version
    (R2's ETag, a content hash), so that equal identities mean equal bytes and an overwritten object gets a new
    one. None when the store names no version: such bytes are never cached by identity."""

    data: bytes
    identity: str | None


class ObjectStore(Protocol):
    name: str

    def resolve_image_key(self, image_url: str) -> str: ...

    def get_image(self, key: str, max_bytes: int) -> ImageObject: ...

    def get_object(self, key: str, max_bytes: int) -> bytes: ...

    def download(self, key: str, path: str, max_bytes: int) -> int:
        """Writes the object to the file `path` as it streams in (a video: never whole in memory), refusing one over
        `max_bytes` (ObjectTooLarge, the file then holds a part); returns its size in bytes."""

    def put_png(self, key: str, data: bytes) -> StoredObject: ...

    def put_object(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def url_for(self, key: str) -> str:
        """The URL a client reads the object at (public base URL, presigned, or the bucket's own)."""

    def delete_object(self, key: str) -> None:
        """Removes the object; one that does not exist is not an error."""
