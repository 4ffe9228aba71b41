"""Who may read the report of an id the client chose (issue 21 §3).

A response id is random unless the client picked its base, with the ``X-Request-Id`` header or the body's
``request_id`` field (``cmpl-<base>`` / ``chatcmpl-<base>``). A random id is its own secret: knowing it is
what grants access, as for the response itself. A chosen id is not a secret, so its report is scoped to
the credentials it was sent with: when the API server receives a completion or chat request with a chosen
id, it records a hash of the request's ``Authorization`` header under that id, and a report of that id is
answered only to a caller presenting the same header (anyone else gets the 404 of an unknown id, so the
answer does not even reveal that the id exists). Clients that send no ``Authorization`` header share one
scope, as they share everything else on such a server; with ``--api-key`` keys handed out per client,
each client reads only its own chosen ids.

The records are one small file per chosen id, ``scopes-<run>/<sha256>``, in the run's private directory
(any API-server process can check them); each process keeps at most :data:`MAX_SCOPES` of the files it
wrote and deletes the oldest beyond that, so their number is bounded like the reports'. The check fails
closed: an id without a record is answered only if it has the form of vLLM's random ids, so pushing a
victim's record out with many chosen ids of one's own opens nothing.

No vLLM import.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from vllm_attnmatch.ipc.metrics import STATS_DIR_ENV, atomic_write, run_id

#: Chosen ids whose scope each API-server process keeps (oldest forgotten first); several times the
#: reports an engine keeps, so a scope outlives the report it guards.
MAX_SCOPES = 16384
#: vLLM's own random base ids (``vllm.utils.random_uuid``: 64 random bits in 16 hex digits).
RANDOM_BASE_ID = re.compile(r"[0-9a-f]{16}")
#: Response-id prefixes vLLM puts before the base id.
RESPONSE_PREFIXES = ("chatcmpl-", "cmpl-")


def credential_scope(authorization: str | None) -> str:
    """A hash of the caller's ``Authorization`` header (the credential itself is never stored)."""
    return hashlib.sha256(b"attnmatch-scope\0" + (authorization or "").encode("utf-8", "surrogateescape")).hexdigest()


def base_id(response_id: str) -> str | None:
    """``cmpl-<base>`` / ``chatcmpl-<base>`` -> ``<base>``; None for any other form."""
    for prefix in RESPONSE_PREFIXES:
        if response_id.startswith(prefix):
            return response_id[len(prefix):]
    return None


def _scope_file(directory: str | Path, run: str, chosen_id: str) -> Path:
    name = hashlib.sha256(chosen_id.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return Path(directory, f"scopes-{run}", name)


class ScopeRecorder:
    """Records, in the API server, the credential scope of each chosen id; bounded per process."""

    def __init__(self, directory: str | Path | None = None, run: str | None = None, limit: int = MAX_SCOPES) -> None:
        self.directory = directory if directory is not None else os.environ.get(STATS_DIR_ENV)
        self.run = run if run is not None else run_id()
        self.limit = limit
        self._written: OrderedDict[Path, None] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, chosen_id: str, authorization: str | None) -> None:
        if not self.directory or not chosen_id:
            return
        path = _scope_file(self.directory, self.run, chosen_id)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(path, credential_scope(authorization))
        with self._lock:
            self._written[path] = None
            self._written.move_to_end(path)
            while len(self._written) > self.limit:
                old, _ = self._written.popitem(last=False)
                try:
                    old.unlink()
                except OSError:
                    pass


def may_read(response_id: str, authorization: str | None, directory: str | Path | None = None,
             run: str | None = None) -> bool:
    """Whether a caller with ``authorization`` may read the reports of ``response_id``: yes for a random
    id (no scope recorded), and for a chosen id only with the credentials it was sent with."""
    directory = directory if directory is not None else os.environ.get(STATS_DIR_ENV)
    run = run if run is not None else run_id()
    base = base_id(response_id)
    if not directory or base is None:
        return True
    try:
        stored = _scope_file(directory, run, base).read_text(encoding="utf-8")
    except OSError:
        # No record: an id of vLLM's random form is its own secret; any other was chosen and its scope is
        # gone (pushed out by newer chosen ids), so it is refused rather than answered to anyone.
        return RANDOM_BASE_ID.fullmatch(base) is not None
    return hmac.compare_digest(stored, credential_scope(authorization))
