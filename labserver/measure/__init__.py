"""Measuring a server from the outside, as a user sees it, and the scripts built on that.

``client`` (one request in, one ``Trace`` out, over HTTP), ``protocols`` (the wire formats: /generate,
OpenAI), ``trace`` (TTFT, ITL, TPOT, E2E of one request), ``probes`` (/health at a steady pace),
``stats`` (percentiles, summaries, aggregate tokens/s), ``tables`` and ``plotting`` (text and figures);
open-loop load as ``vllm bench serve`` runs it: ``arrivals`` (Poisson, gamma), ``datasets`` (prompts of
token lengths), ``goodput`` (SLOs), ``load`` (``run_load``), ``sweep`` (rates to the knee) and ``load_cli``
(``python -m labserver load``); then ``demo``, ``bench``, ``bench_speed`` and ``bench_peer``, the scripts
behind ``make demo``, ``make bench`` and ``make bench-peer``. The client side imports nothing of the
server (checked by lint-imports), so it measures any server.
"""
