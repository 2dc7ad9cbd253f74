"""The messages between the API processes and the engine process: msgspec structs packed as msgpack.

Only numbers cross the boundary, as in vLLM V1 (``EngineCoreRequest`` in, ``EngineCoreOutputs`` out):
prompt token ids and sampling parameters go in, sampled token ids with their step times come out. Text
never crosses: the API process tokenizes before and detokenizes after (``client``).

In, from an API process's DEALER to the engine's ROUTER (which prefixes the sender's identity):

- ``Hello(output, pid)``: "send my outputs to the PULL socket at this address" (and "I am this process":
  if it dies, its requests stop); answered with ``Ready``.
- ``Add(rid, prompt, params)``: a request; ``rid`` is unique per API process.
- ``Abort(rids)``: the clients of these requests left: stop them before the next forward.
- ``Taken(rid, taken)``: the request's reader has taken this many events (sent every ``ACK_EVERY``): a
  request whose reader is ``engine.core.MAX_BACKLOG`` events behind sits out the decode steps.
- ``Bye()``: this API process is closing; its requests are aborted.

Out, from the engine's PUSH (one per API process) to that process's PULL:

- ``Ready(pid, context_len, route, restarts)``: who answers, and how often it has been restarted.
- ``Outputs(running, waiting, no_progress_s, prefilled, tokens, ends)``: what one or more engine steps produced
  for this API process, and the engine's counts and progress (``EngineCore.health``); an empty one
  every ``BEAT_S`` seconds says "still alive".
  A request's ``End`` always comes after its tokens.

Every struct is ``array_like`` (packed as a list, not a map: no field names on the wire) and tagged, so
one decoder tells the kinds apart. Left out: versioning of the frames (both sides run the same code).
"""

from __future__ import annotations

from typing import Union

import msgspec

from ...config import SamplingParams

BEAT_S = 0.25  # an idle engine still says it is alive this often
ACK_EVERY = 16  # a reader says how far it has read this often (in events): well under MAX_BACKLOG


class _Frame(msgspec.Struct, array_like=True, tag=True, omit_defaults=True):
    pass


class Hello(_Frame):
    output: str
    pid: int = 0


class Add(_Frame):
    rid: int
    prompt: list[int]
    params: SamplingParams  # msgspec packs a dataclass by its fields and runs __post_init__ on decode


class Abort(_Frame):
    rids: list[int]


class Taken(_Frame):
    rid: int
    taken: int


class Bye(_Frame):
    pass


class Ready(_Frame):
    pid: int
    context_len: int
    route: dict
    restarts: int = 0


class Token(msgspec.Struct, array_like=True):
    rid: int
    token_id: int
    index: int
    step_ms: float
    prefill_time_ms: float | None = None
    batch: int | None = None


class End(msgspec.Struct, array_like=True):
    """A request's last word: its ``Finish`` fields, or the error that ended it, or neither (cancelled)."""

    rid: int
    finish_reason: str | None = None
    usage: dict | None = None
    timings: dict | None = None
    error_type: str | None = None
    error: str | None = None


class Outputs(_Frame):
    running: int
    waiting: int
    no_progress_s: float = 0.0  # since the engine loop last came round while it had work (0: idle)
    prefilled: int = 0  # prompts the engine has prefilled since it started
    tokens: list[Token] = []
    ends: list[End] = []
    kv: dict | None = None  # the KV cache's usage and prefix-cache counters (``Engine.kv_report``)


encode = msgspec.msgpack.Encoder().encode
decode_in = msgspec.msgpack.Decoder(Union[Hello, Add, Abort, Taken, Bye]).decode
decode_out = msgspec.msgpack.Decoder(Union[Ready, Outputs]).decode
