"""A directory standing in for R2 when none is configured (the embedded default). Paths never leave the root."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from storage.base import ImageObject, StoredObject
from storage.errors import ObjectNotFound, ObjectTooLarge, StorageUnavailable, UnsupportedImageUrl
from storage.references import resolve_image_key, validate_key

LOCAL_BUCKET = "local"


class LocalStorage:
    name = "local"

    def __init__(self, root: str | os.PathLike[str], public_base_url: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None

    def resolve_image_key(self, image_url: str) -> str:
        return resolve_image_key(image_url, LOCAL_BUCKET, None, self.public_base_url)

    def path_for(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise UnsupportedImageUrl("the object key leaves the storage root")
        return path

    def get_image(self, key: str, max_bytes: int) -> ImageObject:
        """The file's bytes; its version is a hash of them (BLAKE2b, 128 bits): a file has no ETag, and its mtime
        and size can stay the same across a rewrite."""
        with self._reading(key, max_bytes, "image") as handle:
            data = handle.read(max_bytes + 1)
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        return ImageObject(data, f"local:{self.root}/{key}#{digest}")

    def get_object(self, key: str, max_bytes: int) -> bytes:
        """Any object's bytes (a record the gateway wrote), refusing one over `max_bytes`."""
        path = self.path_for(key)
        try:
            with path.open("rb") as handle:
                data = handle.read(max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in local storage") from None
        if len(data) > max_bytes:
            raise ObjectTooLarge(f"the object is over the {max_bytes}-byte limit")
        return data

    def download(self, key: str, path: str, max_bytes: int) -> int:
        with self._reading(key, max_bytes, "object") as handle, open(path, "wb") as target:
            shutil.copyfileobj(handle, target)
            return target.tell()

    @contextlib.contextmanager
    def _reading(self, key: str, max_bytes: int, what: str):
        """The file open for reading; ObjectNotFound when there is none, ObjectTooLarge (naming `what`) when it
        holds more than `max_bytes`."""
        try:
            handle = self.path_for(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in local storage") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise ObjectTooLarge(f"the {what} is {size} bytes; the limit is {max_bytes}")
            yield handle

    def put_png(self, key: str, data: bytes) -> StoredObject:
        return self.put_object(key, data, "image/png")

    def put_object(self, key: str, data: bytes, content_type: str) -> StoredObject:
        """Written to a temporary file and renamed, so a reader never sees half an object (a directory keeps no
        content type)."""
        path = self.path_for(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as handle:
                handle.write(data)
            os.replace(handle.name, path)
        except OSError as exc:
            raise StorageUnavailable(f"local storage could not write {key!r} ({exc.strerror})") from None
        return StoredObject(key=key, url=self.url_for(key))

    def delete_object(self, key: str) -> None:
        try:
            self.path_for(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"local storage could not delete {key!r} ({exc.strerror})") from None

    def url_for(self, key: str) -> str:
        return f"{self.public_base_url}/{key}" if self.public_base_url else self.path_for(key).as_uri()
