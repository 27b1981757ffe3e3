"""What can go wrong with object storage, in terms a caller can act on."""


class StorageError(Exception):
    """Base class; messages are safe to show (no secrets, no internal URLs with credentials)."""


class UnsupportedImageUrl(StorageError):
    """The image reference points somewhere we do not fetch from (refused before any network call)."""


class ObjectNotFound(StorageError):
    pass


class ObjectTooLarge(StorageError):
    pass


class StorageUnavailable(StorageError):
    """The store refused us or could not be reached (credentials, bucket, network)."""


class StorageTimeout(StorageError):
    pass
