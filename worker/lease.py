"""The lease of one attempt: a heartbeat thread that also watches for a cancel request.

The training thread never queries the database to decide whether to stop: `should_stop()` reads
flags this thread sets. The thread looks at the run every `poll_seconds` (at most 1 s, so a
cancel is seen within about a second) and refreshes the heartbeat every `heartbeat_seconds`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Run
from app.services.execution import StaleAttempt, fence

log = logging.getLogger("tuneyard.worker.lease")


class Lease:
    """Keeps attempt `attempt` of a run alive; `cancel_requested` and `lost` say why to stop."""

    def __init__(self, sessions: sessionmaker[Session], run_id: str, attempt: int, *,
                 heartbeat_seconds: float, poll_seconds: float = 1.0) -> None:
        self._sessions = sessions
        self.run_id = run_id
        self.attempt = attempt
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = min(poll_seconds, heartbeat_seconds)
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{run_id}", daemon=True)

    def start(self) -> Lease:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lost.is_set()

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while not self._done.wait(self.poll_seconds):
            try:
                if time.monotonic() - last_beat >= self.heartbeat_seconds:
                    status = self._beat()
                    last_beat = time.monotonic()
                else:
                    status = self._peek()
            except StaleAttempt:
                log.warning("run %s: attempt %d lost its lease; stopping", self.run_id, self.attempt)
                self.lost.set()
                return
            except Exception:  # a database hiccup: keep training, the next beat retries
                log.exception("run %s: heartbeat failed", self.run_id)
                continue
            if status == "cancelling" and not self.cancel_requested.is_set():
                log.info("run %s: cancel requested", self.run_id)
                self.cancel_requested.set()

    def _beat(self) -> str:
        with self._sessions() as session:
            status = fence(session, self.run_id, self.attempt)
            session.commit()
            return status

    def _peek(self) -> str:
        with self._sessions() as session:
            row = session.execute(select(Run.status, Run.attempt).where(Run.id == self.run_id)).one_or_none()
        if row is None or row.attempt != self.attempt or row.status not in ("running", "cancelling"):
            raise StaleAttempt(self.run_id, self.attempt)
        return row.status


class Heartbeat:
    """Calls `beat()` every `seconds` on a thread until stopped; `lost` is set once a beat is refused.

    The lease of jobs that need no cancel watch (evals): `beat` raises `stale` when the job
    was taken away, and the job's own next fenced write then ends it.
    """

    def __init__(self, name: str, beat: Callable[[], None], seconds: float,
                 stale: type[Exception]) -> None:
        self.name = name
        self._beat = beat
        self.seconds = seconds
        self._stale = stale
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{name}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._done.wait(self.seconds):
            try:
                self._beat()
            except self._stale:
                log.warning("%s lost its lease; its next write ends it", self.name)
                self.lost.set()
                return
            except Exception:  # a database hiccup: the next beat retries
                log.exception("%s: heartbeat failed", self.name)
