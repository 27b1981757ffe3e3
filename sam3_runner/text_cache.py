"""A bounded LRU of encoded prompts, so a repeated noun phrase never runs the text encoder again."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

# Encodes texts -> (features [N, T, D], attention mask [N, T]) in one batch.
Encoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


class TextEmbeddingCache:
    def __init__(self, encoder: Encoder, capacity: int = 1024) -> None:
        self._encoder = encoder
        self._capacity = max(0, capacity)
        self._entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry and the hit/miss counts (after the engine's warm-up)."""
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def lookup(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and masks stacked in the order of `texts`; only unseen texts are encoded, together."""
        with self._lock:
            unique = list(dict.fromkeys(texts))
            missing = [text for text in unique if text not in self._entries]
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
            found = {text: self._entries[text] for text in unique if text in self._entries}
            if missing:
                features, masks = self._encoder(missing)
                for i, text in enumerate(missing):
                    found[text] = (features[i], masks[i])
                    self._remember(text, found[text])
            for text in unique:
                if text in self._entries:
                    self._entries.move_to_end(text)
        return (torch.stack([found[text][0] for text in texts]), torch.stack([found[text][1] for text in texts]))

    def _remember(self, text: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self._capacity == 0:
            return
        self._entries[text] = entry
        self._entries.move_to_end(text)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
