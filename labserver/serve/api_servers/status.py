"""What the launcher of ``--api-servers N`` knows about its API processes, for ``/health`` in any of them.

An API process cannot see its siblings; the launcher (``api_servers.ApiServers``) can: it writes a small
JSON document whenever what it knows changes (a process died, was replaced, began to serve), and every
API process reads it when ``/health`` is asked, under ``"api_servers"``. A file rewritten whole (written
beside, then ``os.replace``, atomic on POSIX) rather than shared memory or a message on the engine channel:

- a reader sees the old document or the new one, never half of one, and takes no lock, so an API process
  killed with ``kill -9`` mid-read leaves nothing held (a ``multiprocessing.Lock`` held by a dead process
  stays locked, and the launcher would hang on it);
- it needs nothing from the engine process, which may be dead or restarting when the question matters;
- it costs one small read per ``/health``.

States: ``ok`` (all N serve); ``restarting`` (fewer serve, a replacement is starting: ``attempt`` of
``max_restarts``); ``failed`` (fewer serve and none will be replaced: replacements used up; the others
serve on). ``reason`` names the last death and what came of it.

    >>> api_state(serving=2, of=2, restarts=1, max_restarts=3, replacing=False)
    {'state': 'ok'}
    >>> api_state(serving=1, of=2, restarts=1, max_restarts=3, replacing=True)
    {'state': 'restarting', 'attempt': 1, 'max_restarts': 3}
    >>> api_state(serving=1, of=2, restarts=3, max_restarts=3, replacing=False)
    {'state': 'failed'}

Left out: anything the launcher cannot see (an API process that is alive but wedged), and the engine
process (each API process reports it under ``"engine"``, from its own client).
"""

from __future__ import annotations

import json
import os


def api_state(serving: int, of: int, restarts: int, max_restarts: int, replacing: bool) -> dict:
    """``{"state": ...}``, and the attempt in progress, as the module docstring describes."""
    if serving >= of:
        return {"state": "ok"}
    if replacing:
        return {"state": "restarting", "attempt": restarts, "max_restarts": max_restarts}
    return {"state": "failed"}


def write_status(path: str, status: dict) -> None:
    """Replace the document at ``path`` with ``status`` in one step (readers never see half of it)."""
    fresh = f"{path}.{os.getpid()}.tmp"
    with open(fresh, "w", encoding="utf-8") as f:
        json.dump(status, f)
    os.replace(fresh, path)


def read_status(path: str) -> dict:
    """The launcher's last document, or ``{"state": "unknown", "reason": ...}`` if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        return {"state": "unknown", "reason": f"the launcher's status cannot be read: {exc}"}
