"""Continuous batching on an asyncio event loop: one `DecodeBatch` per model that requests join at the
next step boundary instead of waiting for the batch ahead of them to finish.

A request waits in a FIFO until it fits: at most `max_rows` rows decode together and at most
`capacity` distinct adapters (the replica's resident LRU), so `max_loaded_experts: 1` still decodes
one expert at a time; a request that needs more experts than that decodes without others joining
it, its experts run pass by pass within the capacity (`DecodeBatch`). Its adapters are loaded (`load`) when it is admitted; adapters the batch stops
using are reported (`released`) so that an eviction deferred while they decoded can happen. One
decoding step runs at a time, on the loop, which is yielded between steps: arrivals are taken in
while the batch decodes. Plain asyncio, no Ray: the Serve replica (`serve_apps/imoe.py`) wraps it.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from imoe_ray.serving.generation import DecodeBatch, GenerationRequest
from imoe_ray.serving.lora_bank import BASE


@dataclass
class Part:
    """New tokens of one request since the last part, and how it went so far."""
    tokens: list[int]
    finish_reason: str | None          # "stop", "stop_string", "length" or None (more to come)
    load_ms: float                     # adapters loaded when the request was admitted
    queued_ms: float                   # waiting before its first step
    generate_ms: float                 # from its first step to this part
    batch_rows: int                    # the most rows decoded in one step with it
    logprobs: list[dict] = field(default_factory=list)  # per new token, when the request asked


@dataclass
class Ticket:
    request: GenerationRequest
    arrived: float = field(default_factory=time.perf_counter)
    started: float | None = None
    key: int | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    load_ms: float = 0.0
    batch_rows: int = 0
    every_step: bool = False           # wake the reader at every token (streaming), else at the end
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> Part:
        tokens, self.tokens = self.tokens, []
        logprobs, self.logprobs = self.logprobs, []
        now = time.perf_counter()
        started = self.started or now
        return Part(tokens, self.finish_reason, self.load_ms, (started - self.arrived) * 1000,
                    (now - started) * 1000, self.batch_rows, logprobs)


class ContinuousBatcher:
    def __init__(self, batch: DecodeBatch, max_rows: int, capacity: int,
                 load: Callable[[str], Awaitable[object]] | None = None,
                 released: Callable[[set[str]], None] | None = None):
        self.batch, self.max_rows, self.capacity = batch, max_rows, capacity
        self._load, self._released = load, released
        self.waiting: collections.deque[Ticket] = collections.deque()
        self._decoding: dict[int, Ticket] = {}
        self._task: asyncio.Task | None = None

    def submit(self, request: GenerationRequest) -> Ticket:
        """Queue a request; it joins the batch at the next step where it fits."""
        ticket = Ticket(request)
        if len(request.experts) > self.max_rows:  # its own error: requests that arrived with it go on
            ticket.error = ValueError(f"a request mixing {len(request.experts)} experts needs that many rows; "
                                      f"this replica decodes at most {self.max_rows} (serve.max_batch_size)")
            ticket.ready.set()
            return ticket
        self.waiting.append(ticket)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return ticket

    async def parts(self, ticket: Ticket, every_s: float | None = None) -> AsyncIterator[Part]:
        """The request's tokens: in one part at the end (`every_s` None), or as they come, at most
        one part per `every_s` after the first. Leaving early (the client went away) ends the request."""
        last = float("-inf")
        ticket.every_step = every_s is not None
        try:
            while True:
                await ticket.ready.wait()
                if every_s is not None and ticket.finish_reason is None and ticket.error is None:
                    await asyncio.sleep(max(0.0, every_s - (time.perf_counter() - last)))
                ticket.ready.clear()
                if ticket.error is not None:
                    raise ticket.error
                if every_s is None and ticket.finish_reason is None:
                    continue
                last = time.perf_counter()
                part = ticket.take()
                yield part
                if part.finish_reason is not None:
                    return
        finally:
            self.cancel(ticket)

    def cancel(self, ticket: Ticket) -> None:
        if ticket.finish_reason is not None or ticket.error is not None:
            return
        if ticket in self.waiting:
            self.waiting.remove(ticket)
        elif ticket.key is not None:
            self.batch.leave(ticket.key)

    def in_use(self) -> set[str]:
        """Adapters the batch decodes with now."""
        return self.batch.adapters() - {BASE}

    # ---- the loop ----
    async def _run(self) -> None:
        try:
            await self._loop()
        except BaseException as e:  # cancelled with the replica, or a bug: nobody is left waiting forever
            error = e if isinstance(e, Exception) else RuntimeError("the decoding loop stopped")
            for ticket in self.waiting:
                ticket.error = error
                ticket.ready.set()
            self.waiting.clear()
            self._fail_all(error)
            raise

    async def _loop(self) -> None:
        while self.waiting or self.batch.requests:
            await self._admit()
            if not self.batch.requests:
                continue
            before = self.in_use()
            try:
                out = self.batch.step()
            except Exception as e:  # the batch is lost: its requests fail, later ones start afresh
                self._fail_all(e)
                continue
            for key, (token, finish) in out.items():
                ticket = self._decoding[key]
                if finish == "error":
                    ticket.error = self.batch.errors[key]
                    del self._decoding[key]
                    ticket.ready.set()
                    continue
                if finish not in ("stop", "cancelled"):
                    ticket.tokens.append(token)
                    if key in self.batch.token_logprobs:
                        ticket.logprobs.append(self.batch.token_logprobs[key])
                if finish is not None:
                    ticket.finish_reason = finish
                    del self._decoding[key]
                if finish is not None or ticket.every_step:
                    ticket.ready.set()
            gone = before - self.in_use()
            if gone and self._released is not None:
                self._released(gone)
            await asyncio.sleep(0)

    async def _admit(self) -> None:
        while self.waiting:
            ticket = self.waiting[0]
            need = set(ticket.request.experts) - {BASE}
            have = self.in_use()
            if self.batch.requests and (len(self.batch) + len(ticket.request.experts) > self.max_rows
                                        or len(have | need) > self.capacity):
                return
            self.waiting.popleft()
            if self._load is not None and need - have:
                started = time.perf_counter()
                try:
                    for name in [*have, *need]:  # the batch's own first: the LRU must not evict them
                        await self._load(name)
                except Exception as e:
                    ticket.error = e
                    ticket.ready.set()
                    continue
                ticket.load_ms = (time.perf_counter() - started) * 1000
            try:
                ticket.key, ticket.started = self.batch.join(ticket.request), time.perf_counter()
            except Exception as e:  # this request alone is refused; the batch goes on
                ticket.error = e
                ticket.ready.set()
                continue
            self._decoding[ticket.key] = ticket
        rows = len(self.batch)
        for ticket in self._decoding.values():
            ticket.batch_rows = max(ticket.batch_rows, rows)

    def _fail_all(self, error: Exception) -> None:
        for ticket in self._decoding.values():
            ticket.error = error
            ticket.ready.set()
        self._decoding.clear()
        old = self.batch
        self.batch = DecodeBatch(old.model, old.bank, old.pad_id, decode=old.decode, capacity=old.capacity,
                                 ensure=old.ensure)
