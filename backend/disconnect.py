"""Work for a client that has gone is cancelled.

Under `bentoml serve` (uvicorn, BentoML's middlewares, the mounted FastAPI app) a client that disconnects does not
cancel its handler: the handler runs to its end and only `request.is_disconnected()` turns true (checked with
BentoML 1.4.40, uvicorn 0.54). So the handler's work runs beside a watcher of the connection, and is cancelled
(the row then says why; backend/model_client.py tells the model service) when the client leaves first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from backend.errors import ApiError

T = TypeVar("T")
DISCONNECTED = "the client disconnected before the answer"


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The work's result; if the client disconnects first, the work is cancelled (with DISCONNECTED as the
    CancelledError's message), awaited, and a 499 nobody reads is answered."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself was cancelled (the gateway's timeout, shutdown)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel(DISCONNECTED)
    await asyncio.wait({task})
    raise ApiError(499, "client_disconnected", DISCONNECTED)


async def _disconnect(request: Request) -> None:
    """Returns once the client has gone. The body is read already, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
