"""Reference solutions for notebook 3, the event loop.

    python notebooks/solutions/03_event_loop.py    # runs every checker (they use fake_engine: no model)
"""
import asyncio
from concurrent.futures import ThreadPoolExecutor

DONE = object()


async def stream_tokens(gen):
    loop = asyncio.get_running_loop()
    # A sentinel, not `except StopIteration`: asyncio cannot carry StopIteration through a Future.
    while (item := await loop.run_in_executor(None, next, gen, DONE)) is not DONE:
        yield item


# One worker thread for every step of every stream: what the engine thread is, minus its queue and its
# round-robin scheduling. The default pool would start a second thread as soon as two streams ask at once.
ENGINE_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")


async def stream_on_one_thread(gen):
    loop = asyncio.get_running_loop()
    while (item := await loop.run_in_executor(ENGINE_POOL, next, gen, DONE)) is not DONE:
        yield item


def run_checks(engine=None) -> bool:
    from labserver.lab import checks

    return all([checks.check_stream_tokens(stream_tokens), checks.check_one_thread(stream_on_one_thread)])


if __name__ == "__main__":
    raise SystemExit(0 if run_checks() else 1)
