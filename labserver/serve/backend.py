"""The doors every backend shares: ``Backend``, the one base class, and the one place the engine's ids
become text for a stream.

A backend supplies how a request's outputs arrive: ``submit(ids, params, sink)`` (the engine core on a
thread, ``backends.ThreadBackend``; the engine process, ``process.client.EngineClient``), or its own
``outputs`` (the lab's variants, which step a generator themselves). The base class gives every backend
``stream`` (async, one ``TokenEvent`` at a time, then a ``Finish``), ``deliveries`` (the same events in
the groups a stream sends at once), ``complete`` and ``generate`` (blocking), and runs each request's
outputs through the one output processor (``engine.output.OutputProcessor``: text, the last token's
flush, the stream interval). A sink may be called on any thread: it hands each item to the event loop
with ``loop.call_soon_threadsafe``, and the consumer tells the backend how far it has read (``took``),
so a reader that stops reading stops costing decode steps.

Left out: stop strings (the OpenAI wire format's), admission limits (``limits``), which backend to
make (``backends.make_backend``).
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any, AsyncIterator, Callable

from ..config import SamplingParams
from ..engine.core import DONE
from ..engine.sequence import Completion, collect
from ..engine.output import OutputProcessor
from ..engine.protocols import EngineHealth, EngineProtocol
from ..engine.sequence import max_new_tokens


class Backend:
    """The doors every backend shares; subclasses supply ``submit`` (or ``outputs``) and their state.

    ``engine`` is an ``Engine``, or an engine process's ``Frontend``: whatever encodes prompts and knows
    the tokenizer, the limits and the context length. ``stream_interval``: tokens per send (``--stream-interval``).
    """

    kind = ""

    def __init__(self, engine: EngineProtocol, stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {stream_interval}")
        self.engine, self.stream_interval = engine, stream_interval
        self.stopping: BaseException | None = None  # set by end_all: what every open request ended with
        self._sinks: set = set()  # the sinks of the requests open on the event loop (``outputs``)

    # -- what a backend supplies ----------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, sink: Callable[[Any], None]):
        """Start one request; ``sink`` gets, on any thread, each ``TokenOutput``, the ``Finish``, then
        ``DONE`` (or an exception instead). Returns a handle with ``abort()`` and ``took(n)``."""
        raise NotImplementedError

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def alive(self) -> bool:
        return True

    def health(self) -> EngineHealth:
        raise NotImplementedError

    def start(self) -> "Backend":
        return self

    def close(self) -> None:
        pass

    # -- given, once for every backend --------------------------------------------------------------------
    def processor(self, ids: list[int], params: SamplingParams, interval: int | None = None) -> OutputProcessor:
        cap = max_new_tokens(params.max_tokens, self.engine.context_len, len(ids))
        return OutputProcessor(self.engine.tokenizer, cap, interval or self.stream_interval)

    def encoded(self, prompt: str | list[int]) -> list[int]:
        return prompt if isinstance(prompt, list) else self.engine.encode(prompt)

    async def outputs(self, ids: list[int], params: SamplingParams) -> AsyncIterator[list]:
        """The engine's items for one request, in the groups that arrived together; errors re-raise here.
        Leaving early aborts the request before the engine's next forward."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        handle = None

        def sink(item):
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                if handle is not None:
                    handle.abort()

        if self.stopping is not None:  # admitted just before the drain ended the open requests
            raise self.stopping
        handle = self.submit(ids, params, sink)
        self._sinks.add(sink)
        try:
            while True:
                items = [await inbox.get()]
                while not inbox.empty():
                    items.append(inbox.get_nowait())
                handle.took(len(items))
                yield items
                if items[-1] is DONE or isinstance(items[-1], BaseException):
                    return
        finally:
            self._sinks.discard(sink)
            handle.abort()

    def end_all(self, exc: BaseException) -> int:
        """End every request open on the event loop with ``exc``, as a dead engine ends them (the text held
        back is sent first, then the error); returns how many. Call it on the event loop's thread."""
        self.stopping = exc
        sinks = list(self._sinks)
        for sink in sinks:
            sink(exc)
        return len(sinks)

    async def deliveries(self, prompt, params: SamplingParams, interval: int | None = None) -> AsyncIterator[list]:
        """Lists of ``TokenEvent``s (and the ``Finish``, last) to send at once: each token at once with an
        interval of 1, else the first at once, then every ``interval`` tokens, the rest with the finish."""
        ids = self.encoded(prompt)
        out = self.processor(ids, params, interval)
        async for items in self.outputs(ids, params):
            for item in items:
                if isinstance(item, BaseException) and out.held:
                    yield out.release()  # what came before the error is sent first
                ready = _events(item, out)
                if ready:
                    yield ready

    async def stream(self, prompt, params: SamplingParams):
        """Async generator of ``TokenEvent``s then a ``Finish``; re-raises engine errors (``EngineDeadError``)."""
        async for group in self.deliveries(prompt, params, interval=1):
            for item in group:
                yield item

    async def complete(self, prompt, params: SamplingParams) -> Completion:
        return collect([item async for item in self.stream(prompt, params)])

    def generate(self, prompt, params: SamplingParams) -> Completion:
        """Blocking form for threads that are not an event loop (the Flask baseline, scripts)."""
        ids = self.encoded(prompt)
        out, inbox = self.processor(ids, params, 1), queue.SimpleQueue()
        handle = self.submit(ids, params, inbox.put)

        def items():
            while True:
                item = inbox.get()
                handle.took()
                yield item
                if item is DONE or isinstance(item, BaseException):
                    return

        try:
            return collect(event for item in items() for event in _events(item, out))
        finally:
            handle.abort()


def _events(item, out: OutputProcessor) -> list:
    """The events to send once ``item`` arrived: what ``out`` releases; at the end, all it holds (a
    cancelled request has no ``Finish``), then the error, if the item is one."""
    if item is DONE or isinstance(item, BaseException):
        rest = out.release()
        if item is not DONE:
            raise item
        return rest
    return out.add(item)
