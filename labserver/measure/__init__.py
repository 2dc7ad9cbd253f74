"""Measuring a server from the outside, as a user sees it, and the scripts built on that.

``client`` (one request in, one ``Trace`` out, over HTTP), ``protocols`` (the wire formats: /generate,
OpenAI), ``trace`` (TTFT, ITL, TPOT, E2E of one request), ``probes`` (/health at a steady pace),
``stats`` (percentiles, summaries, aggregate tokens/s), ``tables`` and ``plotting`` (text and figures);
then ``demo``, ``bench``, ``bench_speed`` and ``bench_peer``, the scripts behind ``make demo``,
``make bench`` and ``make bench-peer``. The client side imports nothing of the server (checked by
lint-imports), so it measures any server.
"""
