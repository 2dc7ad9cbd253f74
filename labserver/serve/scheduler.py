"""Continuous batching: the engine thread decodes every running sequence in one forward per step.

``BatchScheduler`` keeps the doors of ``worker.EngineWorker`` (``stream``, ``complete``, ``generate``,
``running``, ``close``: one thread owns the model, events go back through each request's own queue) and
changes what a round does. A round prefills the waiting requests that fit a budget of prompt tokens
(``prefill_tokens``; the first always fits) in one forward, then runs one ``decode_step`` for all running
sequences together. Prompts prefilled together keep the weights busier than one prompt does (8 prompts
of 43 tokens here: ~290 ms together, ~350 ms one by one; 8 streams started at once then also decode in
step from the first token, and their rates differ less), and the budget bounds how long the running
streams wait for a prefill. Requests join and leave between steps: a finished or cancelled sequence
frees its cache slot before the next step, and a request waits while all ``max_batch`` slots are taken.

Each event's ``step_ms`` is the whole batched step and its ``batch`` says how many sequences shared it,
so the lab's per-token plots stay an honest measurement. nano-vllm's ``scheduler.py`` is the model.

Left out: chunked prefill of long prompts (one longer than the budget prefills alone), prefill mixed
into decode steps, preemption and priorities (first come, first served), and prefix caching.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .engine_thread import DONE, EngineWorker, Request


class BatchScheduler(EngineWorker):
    """Runs ``engine.prefill_steps`` / ``engine.decode_step`` for many requests on the engine thread."""

    kind = "batched"

    def __init__(self, engine, name: str = "labserver-scheduler", prefill_tokens: int = 256):
        if not hasattr(engine, "decode_step"):
            raise TypeError(f"{type(engine).__name__} has no decode_step: use the 'thread' backend")
        self._waiting: deque[Request] = deque()  # encoded, not yet prefilled
        self._running: list[Request] = []  # prefilled, decoding together
        self.prefill_tokens = prefill_tokens
        super().__init__(engine, name)  # starts the thread: the queues must exist first

    def _busy(self) -> bool:
        return bool(self._waiting or self._running)

    def _start(self, req: Request) -> None:
        req.seq = self.engine.begin(req.prompt, req.params, req.cancel)  # encodes: may raise PromptTooLong
        self._waiting.append(req)

    def _round(self) -> None:
        for req in [r for r in (*self._waiting, *self._running) if r.cancel.is_set()]:
            self._retire(req, DONE)
        joining = self._joining()
        if joining:
            self._step(joining, lambda: self.engine.prefill_steps([r.seq for r in joining]))
        if self._running:
            batch = list(self._running)
            self._step(batch, lambda: self.engine.decode_step([r.seq for r in batch], batched=True))

    def _joining(self) -> list[Request]:
        """The waiting requests to prefill this round: in order, while a slot is free and their prompts fit
        ``prefill_tokens`` (the first always fits)."""
        joining, tokens = [], 0
        while self._waiting and len(joining) < self.engine.runner.free_slots:
            tokens += len(self._waiting[0].seq.ids)
            if joining and tokens > self.prefill_tokens:
                break
            joining.append(self._waiting.popleft())
        return joining

    def _step(self, reqs: list[Request], run) -> None:
        try:
            events = run()
        except Exception as exc:  # a failed forward fails every sequence that was in it
            for req in reqs:
                self._retire(req, exc)
            return
        for req, event in zip(reqs, events):
            if event is not None:
                req.sink(event)
            if req.seq.finished:
                self._retire(req, DONE)
            elif req not in self._running:
                self._running.append(req)

    def _retire(self, req: Request, last: Any) -> None:
        for group in (self._waiting, self._running):
            if req in group:
                group.remove(req)
        finish = self.engine.end(req.seq)  # frees the cache slot before the next step
        if last is DONE and req.seq.finished:
            req.sink(finish)
        req.sink(last)

    def _shutdown(self) -> None:
        for req in (*self._waiting, *self._running):
            self.engine.end(req.seq)
            req.sink(DONE)
