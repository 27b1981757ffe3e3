"""Which image references are read, and from where: decided before any network call."""

from __future__ import annotations

import pytest

from storage import LocalStorage, UnsupportedImageUrl
from storage.references import resolve_image_key

BUCKET, ENDPOINT, PUBLIC = "images-bucket", "https://acct.r2.cloudflarestorage.com", "https://cdn.example.com/media"


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("uploads/u1/cat.jpg", "uploads/u1/cat.jpg"),
        ("r2://images-bucket/uploads/cat.jpg", "uploads/cat.jpg"),
        ("s3://images-bucket/a%20b.png", "a b.png"),
        ("https://acct.r2.cloudflarestorage.com/images-bucket/uploads/cat.jpg?X-Amz-Signature=x", "uploads/cat.jpg"),
        ("https://acct.r2.cloudflarestorage.com:443/images-bucket/k.jpg", "k.jpg"),
        ("https://cdn.example.com/media/uploads/cat.jpg", "uploads/cat.jpg"),
    ],
)
def test_accepted_references(url, key):
    assert resolve_image_key(url, BUCKET, ENDPOINT, PUBLIC) == key


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.com/images-bucket/cat.jpg",
        "https://acct.r2.cloudflarestorage.com.evil.com/images-bucket/cat.jpg",
        "http://acct.r2.cloudflarestorage.com/images-bucket/cat.jpg",  # scheme differs from the endpoint
        "https://acct.r2.cloudflarestorage.com/other-bucket/cat.jpg",
        "https://user:pw@acct.r2.cloudflarestorage.com/images-bucket/cat.jpg",
        "https://@acct.r2.cloudflarestorage.com/images-bucket/cat.jpg",  # empty userinfo
        "https://cdn.example.com/elsewhere/cat.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:9000/images-bucket/cat.jpg",
        "http://[::1]/x",
        "http://2130706433/x",
        "file:///etc/passwd",
        "ftp://acct.r2.cloudflarestorage.com/images-bucket/cat.jpg",
        "r2://other-bucket/cat.jpg",
        "../secrets.txt",
        "uploads/../../etc/passwd",
        "/etc/passwd",
        "uploads//cat.jpg",
        "uploads\\cat.jpg",
        "uploads/cat\x00.jpg",
        "https://acct.r2.cloudflarestorage.com:99999/images-bucket/cat.jpg",
        "",
        "x" * 1025,
    ],
)
def test_refused_references(url):
    with pytest.raises(UnsupportedImageUrl):
        resolve_image_key(url, BUCKET, ENDPOINT, PUBLIC)


def test_local_storage_stays_inside_its_root(tmp_path):
    store = LocalStorage(tmp_path / "root")
    (tmp_path / "secret.txt").write_text("no")
    with pytest.raises(UnsupportedImageUrl):
        store.get_image("../secret.txt", 100)
    stored = store.put_png("masks/u/t.png", b"\x89PNG")
    assert (tmp_path / "root" / "masks" / "u" / "t.png").read_bytes() == b"\x89PNG"
    assert stored.url.startswith("file://") and stored.key == "masks/u/t.png"
