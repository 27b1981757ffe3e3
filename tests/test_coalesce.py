"""tasks/coalesce.py: concurrent calls share one request, and each caller gets its own key's answer."""

from __future__ import annotations

import asyncio

import pytest

from tasks.coalesce import Coalescer


class Rows:
    """A send function over a set of existing rows that records each request's keys; `gate` holds a request open."""

    def __init__(self, existing: set[str], fail_with: Exception | None = None) -> None:
        self.existing = existing
        self.fail_with = fail_with
        self.requests: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def send(self, keys: list[str]) -> dict[str, Exception | None]:
        self.requests.append(keys)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return {key: None if key in self.existing else LookupError(key) for key in keys}


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_calls_made_together_go_in_one_request_and_each_gets_its_own_answer(max_in_flight):
    rows = Rows({"a", "b", "c"})
    coalescer = Coalescer(rows.send, max_keys=10, max_in_flight=max_in_flight)

    async def main():
        return await asyncio.gather(
            *(coalescer(key) for key in ("a", "b", "missing", "c", "a")), return_exceptions=True
        )

    outcomes = asyncio.run(main())
    assert rows.requests == [["a", "b", "missing", "c"]]  # one request, each key once
    assert outcomes[:2] == [None, None] and outcomes[3:] == [None, None]
    assert isinstance(outcomes[2], LookupError) and outcomes[2].args == ("missing",)


def test_calls_made_while_a_request_is_in_flight_go_together_in_the_next():
    rows = Rows({str(n) for n in range(25)})
    coalescer = Coalescer(rows.send, max_keys=10, max_in_flight=1)

    async def main():
        rows.gate = asyncio.Event()
        first = asyncio.ensure_future(coalescer("0"))
        await asyncio.sleep(0)  # its request is now in flight, held open
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(coalescer(str(n))) for n in range(1, 25)]
        await asyncio.sleep(0)
        rows.gate.set()
        await asyncio.gather(first, *later)

    asyncio.run(main())
    assert rows.requests[0] == ["0"]
    assert [len(keys) for keys in rows.requests[1:]] == [10, 10, 4]  # at most max_keys per request, in order
    assert [key for keys in rows.requests for key in keys] == [str(n) for n in range(25)]


def test_calls_are_sent_at_once_while_fewer_than_max_in_flight_requests_are_under_way():
    rows = Rows({str(n) for n in range(6)})
    coalescer = Coalescer(rows.send, max_keys=10, max_in_flight=2)

    async def main():
        rows.gate = asyncio.Event()
        calls = []
        for n in range(6):  # one at a time, each once the previous one's request is under way
            calls.append(asyncio.ensure_future(coalescer(str(n))))
            for _ in range(3):
                await asyncio.sleep(0)
        rows.gate.set()
        await asyncio.gather(*calls)

    asyncio.run(main())
    assert rows.requests == [["0"], ["1"], ["2", "3", "4", "5"]]  # two alone at once, the rest together after


def test_a_burst_larger_than_max_keys_goes_out_in_parallel_requests():
    """200 calls made at once: 4 requests of 50 under way together, not one after the other."""
    under_way, most = 0, 0
    sent: list[int] = []

    async def slow_send(keys: list[str]) -> dict[str, Exception | None]:
        nonlocal under_way, most
        under_way += 1
        most = max(most, under_way)
        await asyncio.sleep(0.05)
        under_way -= 1
        sent.append(len(keys))
        return dict.fromkeys(keys)

    coalescer = Coalescer(slow_send, max_keys=50, max_in_flight=4)

    async def main():
        await asyncio.gather(*(coalescer(str(n)) for n in range(200)))

    asyncio.run(main())
    assert sent == [50, 50, 50, 50] and most == 4


def test_a_failed_request_is_every_callers_failure_and_the_next_calls_are_sent_again():
    rows = Rows({"a", "b"}, fail_with=TimeoutError("no answer"))
    coalescer = Coalescer(rows.send, max_keys=10, max_in_flight=1)

    async def main():
        failed = await asyncio.gather(coalescer("a"), coalescer("b"), return_exceptions=True)
        rows.fail_with = None
        await coalescer("a")
        return failed

    failed = asyncio.run(main())
    assert [type(error) for error in failed] == [TimeoutError, TimeoutError]
    assert rows.requests == [["a", "b"], ["a"]]


def test_a_caller_that_goes_away_before_its_key_is_sent_takes_it_back():
    rows = Rows({"a", "b", "c"})
    coalescer = Coalescer(rows.send, max_keys=10, max_in_flight=1)

    async def main():
        rows.gate = asyncio.Event()
        first = asyncio.ensure_future(coalescer("a"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # "a" is in flight, held open
        leaving, staying = asyncio.ensure_future(coalescer("b")), asyncio.ensure_future(coalescer("c"))
        await asyncio.sleep(0)
        leaving.cancel()
        rows.gate.set()
        await asyncio.gather(first, staying)
        with pytest.raises(asyncio.CancelledError):
            await leaving

    asyncio.run(main())
    assert rows.requests == [["a"], ["c"]]  # "b" was never sent


def test_a_caller_that_goes_away_while_its_request_is_in_flight_returns_once_it_ended():
    """What the caller does next (the pipeline marks the row failed) must reach the server after that request."""
    rows = Rows({"a", "b"})
    coalescer = Coalescer(rows.send, max_keys=10, max_in_flight=1)

    async def main():
        rows.gate = asyncio.Event()
        leaving, staying = asyncio.ensure_future(coalescer("a")), asyncio.ensure_future(coalescer("b"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # both in flight, held open
        leaving.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not leaving.done()  # still waiting for the request it is part of
        rows.gate.set()
        await staying
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await coalescer("a")  # the coalescer still works

    asyncio.run(main())
    assert rows.requests == [["a", "b"], ["a"]]


def test_one_coalescer_serves_one_event_loop_after_another():
    rows = Rows({"a"})
    coalescer = Coalescer(rows.send, max_keys=10, max_in_flight=1)
    asyncio.run(coalescer("a"))
    asyncio.run(coalescer("a"))
    assert rows.requests == [["a"], ["a"]]


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_a_call_made_as_the_last_requests_end_is_still_sent(max_in_flight):
    """A call made in the loop iteration in which every request under way ends (their answers came in together)
    must still be sent, not left waiting for a later call that may never come."""
    rows = Rows({*(f"first{n}" for n in range(max_in_flight)), "late"})
    coalescer = Coalescer(rows.send, max_keys=10, max_in_flight=max_in_flight)

    async def main():
        rows.gate = asyncio.Event()
        firsts = []
        for n in range(max_in_flight):  # max_in_flight requests under way, held open
            firsts.append(asyncio.ensure_future(coalescer(f"first{n}")))
            for _ in range(3):
                await asyncio.sleep(0)
        late = []

        def answers_come_in_and_another_row_is_marked():
            rows.gate.set()
            late.append(asyncio.ensure_future(coalescer("late")))

        asyncio.get_running_loop().call_soon(answers_come_in_and_another_row_is_marked)
        await asyncio.gather(*firsts)
        for _ in range(20):
            await asyncio.sleep(0)
        sent = rows.requests[max_in_flight:]
        late[0].cancel()
        return sent

    assert asyncio.run(main()) == [["late"]]
