"""Checkers for the notebooks' exercises: call one with your function, read PASS or FAIL with the numbers.

Each ``check_*`` prints one line per thing it compared and returns ``True`` only if all passed, as ``cmp``
does in nn-zero-to-hero (makemore part 4); ``lab/checking.py`` holds that machinery (PASS, FAIL, TODO).

Where a check needs a timing it can trust on a busy machine, it uses ``fake_engine`` (sleeps of a known
length) instead of the model and says so. Reference solutions: ``notebooks/solutions/``.
"""

# One module per notebook; a notebook reads them all as ``checks.check_...``.
from .baseline import check_blocking_prediction, check_queued
from .streaming import check_parse_sse_line, check_my_stream, check_sse_endpoint
from .event_loop import check_stream_tokens, check_one_thread
from .cancellation import check_hang_up, check_stop_string, check_wait_or_cancel
from .concurrency import (check_aggregate_tokens_per_s, check_itl_prediction, check_batched_tokens_per_s,
                          check_one_round)
from .load import check_poisson_arrivals, check_queue_prediction
from .process import check_new_text, check_hold_back, check_sse_from_ids, check_should_restart
from .kv_cache import check_block_allocator, check_prefix_lookup, check_chunk_choice
