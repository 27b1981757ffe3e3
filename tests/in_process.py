"""The model service's worker called in this process, as the gateway's ModelClient calls it over BentoML."""

from __future__ import annotations

import asyncio

from backend.segmenter import Segmenter


class InProcessModel:
    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter

    async def segment(self, item: dict, sliced: bool) -> dict:
        if sliced:
            return await asyncio.to_thread(self.segmenter.segment_sliced, item)
        return (await asyncio.to_thread(self.segmenter.segment, [item]))[0]
