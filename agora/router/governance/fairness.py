"""Fair queueing: when the endpoints are saturated, wait here, not on the engines.

Each model has a number of dispatch slots: ``slots_per_endpoint`` on every endpoint
that serves it and can be picked. A request takes a slot and gives it back when its
answer ends. With no slot free it waits in its priority band, and a freed slot goes to

1. the highest band with a request waiting (``interactive`` before ``batch``), then
2. within the band, the next tenant in a weighted round-robin (deficit round-robin:
   a tenant of weight 2 dispatches two requests for every one of a tenant of weight 1),
   its requests in arrival order.

``sheddable`` requests never wait: with no slot free they are refused at once with a
503. A full queue is a 429; a request that waited ``max_wait_s`` gets a 503. A client
that leaves while waiting leaves the queue.

``interactive_reserve`` keeps that many slots per endpoint for the interactive band, so
a flood of batch traffic never takes the last slots from interactive users.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agora.openai.errors import APIError
from agora.router.governance.store import BANDS


@dataclass
class _Waiter:
    tenant: str
    future: asyncio.Future
    enqueued: float


@dataclass
class _Band:
    tenants: OrderedDict[str, deque[_Waiter]] = field(default_factory=OrderedDict)
    credit: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(q) for q in self.tenants.values())


class _Gate:
    """The slots and the waiting requests of one model."""

    def __init__(self) -> None:
        self.active = {band: 0 for band in BANDS}
        self.bands = {band: _Band() for band in BANDS}


class Slot:
    def __init__(self, queue: FairQueue, model: str, band: str, waited: float) -> None:
        self.queue, self.model, self.band, self.waited = queue, model, band, waited
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.queue._release(self)


class FairQueue:
    """``capacity(model)`` -> how many endpoints serve it and can be picked now."""

    def __init__(self, capacity: Callable[[str | None], int], slots_per_endpoint: int, max_queue: int,
                 max_wait_s: float, interactive_reserve: int = 0,
                 weight: Callable[[str], float] | None = None) -> None:  # fmt: skip
        self.capacity, self.slots, self.max_queue, self.max_wait = capacity, slots_per_endpoint, max_queue, max_wait_s
        self.reserve = interactive_reserve
        self.weight = weight or (lambda tenant: 1.0)
        self.gates: dict[str | None, _Gate] = {}
        self._ticker: asyncio.Task | None = None

    def waiting(self) -> int:
        return sum(len(b) for g in self.gates.values() for b in g.bands.values())

    def _limit(self, model: str | None, band: str) -> int:
        per_endpoint = self.slots if band == "interactive" else self.slots - min(self.reserve, self.slots - 1)
        return self.capacity(model) * per_endpoint

    def _free(self, gate: _Gate, model: str | None, band: str) -> bool:
        return sum(gate.active.values()) < self._limit(model, band)

    async def acquire(self, model: str | None, tenant: str, band: str) -> Slot:
        gate = self.gates.get(model)
        if gate is None:
            gate = self.gates[model] = _Gate()
        t0 = time.monotonic()
        # Nobody of this band or above waiting and a slot free: go now.
        ahead = any(len(gate.bands[b]) for b in BANDS[: BANDS.index(band) + 1])
        if not ahead and self._free(gate, model, band):
            gate.active[band] += 1
            return Slot(self, model, band, 0.0)
        if band == "sheddable":
            raise APIError(503, "the endpoints are saturated and this request is sheddable: try again later",
                           "service_unavailable", code="shed", headers={"Retry-After": "1"})  # fmt: skip
        if self.waiting() >= self.max_queue:
            raise APIError(429, f"the gateway queue is full ({self.max_queue} requests waiting)", "rate_limit_error",
                           code="gateway_saturated", headers={"Retry-After": "1"})  # fmt: skip
        waiter = _Waiter(tenant, asyncio.get_running_loop().create_future(), t0)
        b = gate.bands[band]
        b.tenants.setdefault(tenant, deque()).append(waiter)
        self._tick()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.max_wait)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return Slot(self, model, band, time.monotonic() - t0)  # granted just as the wait ended
            self._forget(gate, band, waiter)
            raise APIError(503, f"waited {self.max_wait:g} s in the gateway queue without a free endpoint",
                           "service_unavailable", code="queue_timeout", headers={"Retry-After": "1"}) from None  # fmt: skip
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                gate.active[band] -= 1  # granted, but the client left: give the slot on
                self._dispatch(model, gate)
            else:
                self._forget(gate, band, waiter)
            raise
        return Slot(self, model, band, time.monotonic() - t0)

    def _forget(self, gate: _Gate, band: str, waiter: _Waiter) -> None:
        q = gate.bands[band].tenants.get(waiter.tenant)
        if q is not None and waiter in q:
            q.remove(waiter)
        waiter.future.cancel()

    def _release(self, slot: Slot) -> None:
        gate = self.gates[slot.model]
        gate.active[slot.band] -= 1
        self._dispatch(slot.model, gate)

    def _dispatch(self, model: str | None, gate: _Gate) -> None:
        for band in BANDS:
            b = gate.bands[band]
            while len(b) and self._free(gate, model, band):
                waiter = self._next(b)
                if waiter is None:
                    break
                if waiter.future.done():  # cancelled meanwhile
                    continue
                gate.active[band] += 1
                waiter.future.set_result(None)
            if len(b):
                return  # strict priority: nothing below a band that still waits

    def _next(self, b: _Band) -> _Waiter | None:
        """Deficit round-robin over the band's tenants."""
        for _ in range(2 * len(b.tenants) + 1):
            if not b.tenants:
                return None
            tenant, q = next(iter(b.tenants.items()))
            if not q:
                del b.tenants[tenant]
                b.credit.pop(tenant, None)
                continue
            credit = b.credit.get(tenant, 0.0)
            if credit < 1.0:
                credit += max(self.weight(tenant), 0.01)
            if credit >= 1.0:
                b.credit[tenant] = credit - 1.0
                waiter = q.popleft()
                if not q:
                    del b.tenants[tenant]
                    b.credit.pop(tenant, None)
                elif b.credit[tenant] < 1.0:
                    b.tenants.move_to_end(tenant)  # its turn is over
                return waiter
            b.credit[tenant] = credit
            b.tenants.move_to_end(tenant)
        return None

    def _tick(self) -> None:
        """While requests wait, look again now and then: capacity also grows when an endpoint comes back."""
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._run_ticker())

    async def _run_ticker(self) -> None:
        while self.waiting():
            await asyncio.sleep(0.05)
            for model, gate in list(self.gates.items()):
                self._dispatch(model, gate)
