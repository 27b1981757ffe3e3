"""What a failed call to the model service means to the caller: a real `bentoml serve` of a stand-in model service
(tests/model_standin.py) makes BentoML's client fail each way it can; only "cannot be reached" is a 503."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from _bentoml_impl.client.http import AsyncHTTPClient
from model_standin import MAX_LATENCY_MS, TRAFFIC_TIMEOUT_S, StandInModel
from served import ServedBento, free_port

from backend.errors import ApiError
from backend.model_client import ModelClient

pytestmark = pytest.mark.served

RETRY_AFTER_S = 7


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    bento = ServedBento(
        {},
        tmp_path_factory.mktemp("standin") / "serve.log",
        target="model_standin:StandInModel",
        directory=Path(__file__).parent,
    ).start()
    yield bento
    bento.stop()


@pytest.fixture
def idle(standin):
    """A call abandoned by an earlier test keeps its batch running (the issue's point): wait until it is done."""

    async def wait():
        client = await _client(standin.url)
        for _ in range(100):
            try:
                return await client.segment({}, sliced=False)
            except ApiError:
                await asyncio.sleep(0.2)
        raise AssertionError("the stand-in never became idle")

    asyncio.run(wait())
    return standin


async def _remote(url: str, timeout_s: float = 30) -> AsyncHTTPClient:
    """The client `bentoml.depends()` gives the gateway (RemoteProxy.to_async), with JSON instead of pickle."""
    remote = AsyncHTTPClient(url, service=StandInModel, server_ready_timeout=0, timeout=timeout_s)
    await remote.__aenter__()  # with the service given it only sets up the endpoints: no network
    return remote


async def _client(url: str, timeout_s: float = 30) -> ModelClient:
    return ModelClient(
        await _remote(url, timeout_s), timeout_s=TRAFFIC_TIMEOUT_S, retry_after_s=RETRY_AFTER_S, renew_every_s=10.0
    )


def _error(coroutine) -> ApiError | None:
    async def run():
        try:
            await coroutine
        except ApiError as error:
            return error
        return None

    return asyncio.run(run())


def test_a_served_answer_passes_through(idle):
    async def call():
        return await (await _client(idle.url)).segment({}, sliced=False)

    assert asyncio.run(call()) == {"ok": True}


def test_a_heavy_item_goes_alone_to_the_sliced_api(idle):
    async def call():
        return await (await _client(idle.url)).segment({}, sliced=True)

    assert asyncio.run(call()) == {"ok": True, "sliced": True}


def test_a_cancelled_call_tells_the_model_service_which_request_to_stop(idle):
    """The caller's cancellation must not stop the cancel itself: it goes in a task of its own."""

    async def cancel_a_slow_call():
        remote = await _remote(idle.url)
        client = ModelClient(remote, timeout_s=TRAFFIC_TIMEOUT_S, retry_after_s=RETRY_AFTER_S, renew_every_s=10.0)
        call = asyncio.ensure_future(client.segment({"sleep": 1.0}, sliced=False))
        await asyncio.sleep(0.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(50):
            seen = await remote.seen()
            if seen["cancelled"]:
                return seen
            await asyncio.sleep(0.1)
        return await remote.seen()

    seen = asyncio.run(cancel_a_slow_call())
    assert seen["cancelled"] == seen["received"][-1:]


def test_a_model_service_that_cannot_be_reached_is_503_model_unavailable():
    async def call():
        return await (await _client(f"http://127.0.0.1:{free_port()}")).segment({}, sliced=False)

    error = _error(call())
    assert (error.status, error.code) == (503, "model_unavailable")


def test_an_api_that_raises_is_500_inference_failed(idle):
    async def call():
        return await (await _client(idle.url)).segment({"raise": True}, sliced=False)

    error = _error(call())
    assert (error.status, error.code) == (500, "inference_failed")


def test_the_services_traffic_timeout_is_504_inference_timeout(idle):
    async def call():
        return await (await _client(idle.url)).segment({"sleep": TRAFFIC_TIMEOUT_S + 1}, sliced=False)

    error = _error(call())
    assert (error.status, error.code) == (504, "inference_timeout")
    assert "MODEL_TIMEOUT_S" in error.message


def test_the_clients_own_timeout_is_504_inference_timeout(idle):
    async def call():
        return await (await _client(idle.url, timeout_s=0.5)).segment({"sleep": 1.5}, sliced=False)

    error = _error(call())
    assert (error.status, error.code) == (504, "inference_timeout")


def test_requests_the_batcher_sheds_are_429_model_busy_with_retry_after(idle):
    """Items held 1 s each, far past MAX_LATENCY_MS: BentoML's dispatcher drops queued ones with a 503 (while it
    still learns the batch timing it keeps some waiting instead, and those meet the traffic timeout)."""
    assert MAX_LATENCY_MS < 1000

    async def burst():
        client = await _client(idle.url)
        return await asyncio.gather(
            *(client.segment({"sleep": 1.0}, sliced=False) for _ in range(8)), return_exceptions=True
        )

    outcomes = asyncio.run(burst())
    errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert errors and all(isinstance(error, ApiError) for error in errors), outcomes
    busy = [error for error in errors if error.code == "model_busy"]
    assert busy and {(error.status, error.code) for error in errors} <= {
        (429, "model_busy"),
        (504, "inference_timeout"),
    }
    assert all(error.headers == {"Retry-After": str(RETRY_AFTER_S)} for error in busy)
    assert str(RETRY_AFTER_S) in busy[0].message


async def _depends_client(url: str, timeout_s: float = 30) -> ModelClient:
    """The client the served gateway really gets: `bentoml.depends(...).to_async` is RemoteProxy's AsyncClient
    (`_bentoml_impl/client/proxy2.py`, aiohttp in BentoML 1.4.40), not the httpx AsyncHTTPClient used above."""
    from _bentoml_impl.client.proxy2 import AsyncClient

    remote = AsyncClient(url, service=StandInModel, server_ready_timeout=0, timeout=timeout_s)
    await remote.__aenter__()
    return ModelClient(remote, timeout_s=TRAFFIC_TIMEOUT_S, retry_after_s=RETRY_AFTER_S, renew_every_s=10.0)


def test_the_depends_client_to_an_unreachable_model_service_is_503_model_unavailable():
    """Seen served: SIGTERM while async jobs download their image fails them as 500 inference_failed
    (UnixClientConnectorError) instead of 503 -> interrupted."""

    async def call():
        return await (await _depends_client(f"http://127.0.0.1:{free_port()}")).segment({}, sliced=False)

    error = _error(call())
    assert (error.status, error.code) == (503, "model_unavailable")


def test_the_depends_clients_own_timeout_is_504_inference_timeout(idle):
    async def call():
        return await (await _depends_client(idle.url, timeout_s=0.5)).segment({"sleep": 1.5}, sliced=False)

    error = _error(call())
    assert (error.status, error.code) == (504, "inference_timeout")
