"""A stand-in model service, served by `bentoml serve` in tests/test_model_client.py: the same BentoML machinery
as Sam3Model (a batched `segment`, traffic timeout, adaptive batching), with items that say how to misbehave."""

from __future__ import annotations

import time

import bentoml

TRAFFIC_TIMEOUT_S = 2
MAX_LATENCY_MS = 200


@bentoml.service(name="standin-model", traffic={"timeout": TRAFFIC_TIMEOUT_S})
class StandInModel:
    def __init__(self) -> None:
        self.received: list[str] = []  # request ids, in arrival order
        self.cancelled: list[str] = []

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=4, max_latency_ms=MAX_LATENCY_MS)
    def segment(self, items: list[dict]) -> list[dict]:
        """Each item: {"raise": true} fails the call, {"sleep": seconds} holds it; else {"ok": true}."""
        self.received += [item["request_id"] for item in items]
        if any(item.get("raise") for item in items):
            raise RuntimeError("the API raised")
        time.sleep(max(item.get("sleep", 0) for item in items))
        return [{"ok": True} for _ in items]

    @bentoml.api
    async def segment_sliced(self, item: dict) -> dict:
        self.received.append(item["request_id"])
        return {"ok": True, "sliced": True}

    @bentoml.api
    async def cancel(self, request_ids: list[str]) -> None:
        self.cancelled += request_ids

    @bentoml.api
    async def seen(self) -> dict:
        return {"received": self.received, "cancelled": self.cancelled}
