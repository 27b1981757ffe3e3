"""Concurrent calls for different rows, sent as one request: the ones that arrive while a request is in flight go
together in the next.

Why: every async submission marks its row `processing` before its 202, with the same values for every row. At 32
concurrent submitters one PATCH per row was about a third of the CPU a 202 costs on the 2-core dev box, gateway,
PostgREST and PostgreSQL together; one PATCH for the rows waiting costs a fraction of that (bench/async_submit.py,
bench/NOTES.md). Nothing waits on purpose: with no request in flight a call is sent at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping


class Coalescer:
    """`await coalescer(key)` returns once `key`'s request is done, or raises that key's exception.

    send(keys) -> {key: None (done) | the exception for that key}, for distinct keys (at most `max_keys`); an
    exception send raises is every key's. One request in flight at a time per event loop.

    A caller that is cancelled before its key was sent takes it back: it is not sent. One cancelled while its
    key's request is in flight re-raises the cancellation only once that request has ended, so that what it does
    next (e.g. mark the row failed) reaches the server after it, never before.
    """

    def __init__(self, send: Callable[[list[str]], Awaitable[Mapping[str, Exception | None]]], max_keys: int) -> None:
        self._send = send
        self._max_keys = max_keys
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._in_flight: asyncio.Future[None] | None = None  # done when the request under way has ended

    async def __call__(self, key: str) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests run several in turn): nothing of the old one is usable
            self._loop, self._waiting, self._sender, self._in_flight = loop, [], None, None
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((key, done))
        if self._sender is None:
            self._sender = loop.create_task(self._send_waiting())
        try:
            await done
        except asyncio.CancelledError:
            waiting = [entry for entry in self._waiting if entry[1] is not done]
            if len(waiting) < len(self._waiting):
                self._waiting = waiting
            elif self._in_flight is not None:
                await asyncio.shield(self._in_flight)
            raise

    async def _send_waiting(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[tuple[str, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max_keys], self._waiting[self._max_keys :]
                keys = list(dict.fromkeys(key for key, _ in batch))
                self._in_flight = in_flight = loop.create_future()
                try:
                    outcomes = await self._send(keys)
                except Exception as exc:
                    outcomes = dict.fromkeys(keys, exc)
                finally:
                    self._in_flight = None
                    in_flight.set_result(None)
                for key, done in batch:
                    if not done.done():
                        error = outcomes[key]
                        if error is None:
                            done.set_result(None)
                        else:
                            done.set_exception(error)
        finally:
            self._sender = None
            for _, done in batch + self._waiting:  # only when this task itself was cancelled (the loop is closing)
                done.cancel()
            self._waiting = []
