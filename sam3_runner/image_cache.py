"""A byte-bounded LRU of encoded images, so a second prompt on the same photo skips decoding and the ViT trunk.

What is kept per image is the ViT trunk's output (`Sam3VisionEncoderOutput.last_hidden_state` of one image: at full
size 72x72 tokens x 1024 channels, 10.6 MB in bf16), on the model's device, and the image's display size (what
post-processing needs instead of the pixels). The FPN neck is recomputed from it on every request: the levels the
detector reads (288/144/72 x 256 channels) are 5.25x the trunk's bytes and the neck took 2.4% of the vision time
(bench/image_cache.py, full size on the CPU: `bench/results/2026-11-30-x86_64-2-cores-image-cache.json`).

Keys are the object's identity and version (the gateway's `image_identity`: bucket, key and ETag, or a content
hash), so an overwritten object is never answered from the old entry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncodedImage:
    """One image's trunk output [tokens, channels] (the model's dtype, on its device) and display size in pixels."""

    trunk: torch.Tensor
    height: int
    width: int

    @property
    def nbytes(self) -> int:
        return self.trunk.numel() * self.trunk.element_size()


class ImageCache:
    """Thread-safe LRU whose entries' bytes never exceed `max_bytes` (0: nothing is kept).

    An entry taken with `get` stays valid after it is evicted: the caller holds the tensor, the cache only drops its
    own reference. `hits` and `misses` are counted by the caller through `count`, per image it needed: a lookup
    that comes too early to decide (the segmenter's, before decoding) must not count twice.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self._entries: OrderedDict[str, EncodedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> EncodedImage | None:
        """The entry for `key` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: EncodedImage) -> None:
        """Keep a copy of `entry` (a row of a batch's output would keep the whole batch's memory alive), evicting the
        least recently used entries until the total fits. An entry larger than the bound is not kept."""
        if entry.nbytes > self.max_bytes:
            return
        entry = EncodedImage(entry.trunk.clone(), entry.height, entry.width)
        with self._lock:
            if (old := self._entries.pop(key, None)) is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1

    def count(self, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses

    def stats(self) -> dict:
        with self._lock:
            return {
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "entries": len(self._entries),
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
