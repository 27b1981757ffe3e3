"""Object storage for images and masks: Cloudflare R2 through boto3, or a local directory by default."""

from storage.base import ImageObject, ObjectStore, StoredObject
from storage.errors import (
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
    StorageTimeout,
    StorageUnavailable,
    UnsupportedImageUrl,
)
from storage.local import LocalStorage
from storage.r2 import R2Storage

__all__ = [
    "ImageObject",
    "LocalStorage",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectTooLarge",
    "R2Storage",
    "StorageError",
    "StorageTimeout",
    "StorageUnavailable",
    "StoredObject",
    "UnsupportedImageUrl",
]
