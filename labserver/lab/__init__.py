"""The notebooks' experiments: one module per notebook (``baseline``, ``streaming``, ``event_loop``,
``cancellation``, ``concurrency``; a notebook imports its own as ``lab``), what several of them share
(``runs``: one request measured while /health is probed; ``display``: tables and labels; ``claims``: the
sentences a notebook prints about its own run), and the exercise checkers (``checks``, one module per
notebook, reporting through ``checking``). The server never imports this package.

Also: ``sizing`` (demo lengths from the prefill and step measured at a notebook's top), ``harness`` (a
student's endpoint or bridge served on the fake engine for its checker), ``cpu`` (the appendix notebook).
"""
