"""Cloudflare R2 through boto3's S3 client: SigV4, region "auto", timeouts and retries."""

from __future__ import annotations

import contextlib

import boto3
import botocore.exceptions
from botocore.config import Config

from storage.base import ImageObject, StoredObject
from storage.errors import ObjectNotFound, ObjectTooLarge, StorageTimeout, StorageUnavailable
from storage.references import resolve_image_key, validate_key

_CHUNK = 1024 * 1024
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_REFUSED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403", "InvalidToken", "ExpiredToken"}


class R2Storage:
    name = "r2"

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        public_base_url: str | None = None,
        presign_ttl_s: int = 0,
        timeout_s: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        self.bucket = bucket
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.presign_ttl_s = presign_ttl_s
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name="auto",
            config=Config(
                signature_version="s3v4",
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"max_attempts": max_attempts, "mode": "standard"},  # backoff on throttling and 5xx
                max_pool_connections=64,
                # R2 does not implement every newer default checksum header; only send them when required.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def resolve_image_key(self, image_url: str) -> str:
        return resolve_image_key(image_url, self.bucket, self.endpoint_url, self.public_base_url)

    def get_image(self, key: str, max_bytes: int) -> ImageObject:
        """The object's bytes, refusing (while streaming) anything over `max_bytes`, and its identity: endpoint,
        bucket, key and the ETag of the same response (R2 and S3 give a new ETag to every write that changes the
        bytes; none: no identity)."""
        with self._reading(key, max_bytes, "image") as (response, chunks):
            data = b"".join(chunks)
            etag = response.get("ETag")
        identity = f"{self.endpoint_url}/{self.bucket}/{key}#{etag}" if etag else None
        return ImageObject(data, identity)

    def get_object(self, key: str, max_bytes: int) -> bytes:
        """Any object's bytes (a record the gateway wrote), refusing one over `max_bytes`."""
        with _translated_errors(key):
            body = self._client.get_object(Bucket=self.bucket, Key=validate_key(key))["Body"]
            try:
                data = body.read(max_bytes + 1)
            finally:
                body.close()
        if len(data) > max_bytes:
            raise ObjectTooLarge(f"the object is over the {max_bytes}-byte limit")
        return data

    def download(self, key: str, path: str, max_bytes: int) -> int:
        with self._reading(key, max_bytes, "object") as (_, chunks), open(path, "wb") as handle:
            received = 0
            for chunk in chunks:
                handle.write(chunk)
                received += len(chunk)
        return received

    @contextlib.contextmanager
    def _reading(self, key: str, max_bytes: int, what: str):
        """The object's GET response and its body's chunks, refusing one over `max_bytes` (by its length, then
        while streaming: ObjectTooLarge naming `what`); the body is closed at the end."""
        with _translated_errors(key):
            response = self._client.get_object(Bucket=self.bucket, Key=validate_key(key))
            body = response["Body"]
            try:
                length = response.get("ContentLength")
                if length is not None and length > max_bytes:
                    raise ObjectTooLarge(f"the {what} is {length} bytes; the limit is {max_bytes}")
                yield response, _bounded(body.iter_chunks(_CHUNK), max_bytes, what)
            finally:
                body.close()

    def put_png(self, key: str, data: bytes) -> StoredObject:
        return self.put_object(key, data, "image/png")

    def put_object(self, key: str, data: bytes, content_type: str) -> StoredObject:
        with _translated_errors(key):
            self._client.put_object(Bucket=self.bucket, Key=validate_key(key), Body=data, ContentType=content_type)
            return StoredObject(key=key, url=self.url_for(key))

    def delete_object(self, key: str) -> None:
        """S3's DELETE succeeds for a key that does not exist."""
        with _translated_errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=validate_key(key))

    def url_for(self, key: str) -> str:
        if self.public_base_url:
            return f"{self.public_base_url}/{key}"
        if self.presign_ttl_s:
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.presign_ttl_s
            )
        return f"{self.endpoint_url}/{self.bucket}/{key}"


def _bounded(chunks, max_bytes: int, what: str):
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if received > max_bytes:
            raise ObjectTooLarge(f"the {what} is over the {max_bytes}-byte limit")
        yield chunk


class _translated_errors:
    """boto3's exceptions -> storage errors whose messages are safe to return."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError):
            return False
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise ObjectNotFound(f"no object {self.key!r} in the bucket") from None
            if code in _REFUSED:
                raise StorageUnavailable(f"R2 refused the request ({code}): check the R2 credentials") from None
            if code == "NoSuchBucket":
                raise StorageUnavailable("the configured R2 bucket does not exist") from None
            raise StorageUnavailable(f"R2 answered with an error ({code or 'unknown'})") from None
        if isinstance(exc, botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectTimeoutError):
            raise StorageTimeout("R2 did not answer in time") from None
        raise StorageUnavailable(f"R2 could not be reached ({type(exc).__name__})") from None
