"""The interface the pipeline uses, whatever holds the objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StoredObject:
    key: str
    url: str


class ObjectStore(Protocol):
    name: str

    def resolve_image_key(self, image_url: str) -> str: ...

    def get_image(self, key: str, max_bytes: int) -> bytes: ...

    def put(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def put_png(self, key: str, data: bytes) -> StoredObject: ...
