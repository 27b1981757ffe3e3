"""Concurrent calls for different rows, sent as one request once a few requests are already in flight.

Why: every async submission marks its row `processing` before its 202, with the same values for every row. At 32
concurrent submitters one PATCH per row was about a third of the CPU a 202 costs on the 2-core dev box, gateway,
PostgREST and PostgreSQL together; one PATCH for the rows waiting costs a fraction of that (bench/async_submit.py,
bench/NOTES.md). Nothing waits on purpose: while fewer than `max_in_flight` requests are under way a call is sent
at once, as without coalescing (at a few submissions per second nothing changes, even with Supabase a WAN round
trip away); only the calls that arrive while all of them are under way wait, and go together in the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping


class Coalescer:
    """`await coalescer(key)` returns once `key`'s request is done, or raises that key's exception.

    send(keys) -> {key: None (done) | the exception for that key}, for distinct keys (at most `max_keys`); an
    exception send raises is every key's. At most `max_in_flight` requests under way at a time, per event loop.

    A caller that is cancelled before its key was sent takes it back: it is not sent. One cancelled while its
    key's request is in flight re-raises the cancellation only once that request has ended, so that what it does
    next (e.g. mark the row failed) reaches the server after it, never before.
    """

    def __init__(
        self,
        send: Callable[[list[str]], Awaitable[Mapping[str, Exception | None]]],
        max_keys: int,
        max_in_flight: int,
    ) -> None:
        self._send = send
        self._max_keys = max_keys
        self._max_in_flight = max_in_flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._starting = False  # a sender was started and has not taken its first keys yet
        self._request_of: dict[asyncio.Future[None], asyncio.Future[None]] = {}  # caller -> its request's end

    async def __call__(self, key: str) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests run several in turn): nothing of the old one is usable
            self._loop, self._waiting, self._senders, self._starting, self._request_of = loop, [], set(), False, {}
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((key, done))
        self._start_sender(loop)
        try:
            await done
        except asyncio.CancelledError:
            waiting = [entry for entry in self._waiting if entry[1] is not done]
            if len(waiting) < len(self._waiting):
                self._waiting = waiting
            elif (request := self._request_of.get(done)) is not None:
                await asyncio.shield(request)
            raise

    def _start_sender(self, loop: asyncio.AbstractEventLoop) -> None:
        """Another sender, if keys wait, none is about to take them and fewer than max_in_flight are under way."""
        if self._waiting and not self._starting and len(self._senders) < self._max_in_flight:
            self._starting = True
            self._senders.add(loop.create_task(self._send_waiting()))

    async def _send_waiting(self) -> None:
        """One sender: the keys waiting (at most max_keys) in one request, again while any wait."""
        loop = asyncio.get_running_loop()
        self._starting = False
        batch: list[tuple[str, asyncio.Future[None]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max_keys], self._waiting[self._max_keys :]
                self._start_sender(loop)  # more than max_keys waited: the rest goes beside this request
                keys = list(dict.fromkeys(key for key, _ in batch))
                request = loop.create_future()
                self._request_of.update((done, request) for _, done in batch)
                try:
                    outcomes = await self._send(keys)
                except Exception as exc:
                    outcomes = dict.fromkeys(keys, exc)
                finally:
                    for _, done in batch:
                        self._request_of.pop(done, None)
                    request.set_result(None)
                for key, done in batch:
                    if not done.done():
                        error = outcomes[key]
                        if error is None:
                            done.set_result(None)
                        else:
                            done.set_exception(error)
        finally:
            # at once, not in a done-callback: a call made later in this loop iteration must see the free slot
            self._senders.discard(asyncio.current_task())
            for _, done in batch:  # only when this task itself was cancelled (the loop is closing)
                done.cancel()
            if not self._senders:  # the last sender: nobody else will send what still waits
                for _, done in self._waiting:
                    done.cancel()
                self._waiting = []
