"""The reaper re-sends only what the broker lost (issue 13, item 8), on SQLite with the filesystem
broker and on PostgreSQL with Redis, no workers running.

Before, every waiting item got one more message per grace period: with workers down, 1,000
uploads grew the `cpu` queue from 1,193 to 8,326 messages. Now a queue never holds more than one
message per waiting item, and a message the broker really lost is sent again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from app.broker import create_celery, queue_depth
from app.db.models import Dataset, Run, utcnow
from app.ids import new_id
from app.jobs.reaper import reap_once, resend
from app.settings import Settings
from tests.api.conftest import REDIS_HOST, _free_redis_db
from tests.integration.test_fencing import new_run, sessions  # noqa: F401 - the fixture, both databases

GRACE = 60
DATASETS, RUNS = 40, 5


@pytest.fixture
def celery(sessions: sessionmaker, tmp_path: Path) -> Iterator[Celery]:  # noqa: F811
    """A real broker: Redis (an empty db) next to PostgreSQL, the filesystem transport next to SQLite."""
    postgres = sessions.kw["bind"].dialect.name == "postgresql"
    url = f"{REDIS_HOST}/{_free_redis_db()}" if postgres else "filesystem://"
    app = create_celery(Settings(data_dir=tmp_path, broker_url=url, env="test"))
    yield app
    if postgres:
        redis.Redis.from_url(url).flushdb()


def waiting_items(sessions: sessionmaker) -> list[str]:  # noqa: F811
    """Returns ids of validating datasets and queued runs that have waited past the grace period."""
    long_ago = utcnow() - timedelta(seconds=GRACE * 5)
    with sessions() as session:
        ids = [new_id("ds") for _ in range(DATASETS)]
        session.add_all(Dataset(id=i, team_id="team_f", name="d", size_bytes=1, sha256="0" * 64,
                                blob_key=f"datasets/{i}.jsonl", created_at=long_ago) for i in ids)
        session.commit()
    runs = [new_run(sessions) for _ in range(RUNS)]
    with sessions() as session:
        session.execute(update(Run).where(Run.id.in_(runs)).values(queued_at=long_ago))
        session.commit()
    return ids + runs


def reaper_pass(sessions: sessionmaker, celery: Celery, later_s: float) -> int:  # noqa: F811
    now = utcnow() + timedelta(seconds=later_s)
    with sessions() as session:
        result = reap_once(session, now, lease_seconds=GRACE, queued_grace_seconds=GRACE)
        return resend(session, celery, result, now, GRACE)


def test_waiting_items_keep_one_message_each_while_no_worker_runs(
        sessions: sessionmaker, celery: Celery) -> None:  # noqa: F811
    waiting_items(sessions)
    with sessions() as session:  # other tests of the module left items waiting too
        waiting_datasets = session.query(Dataset).filter(Dataset.status == "validating").count()
        waiting_runs = session.query(Run).filter(Run.status == "queued").count()
    first = reaper_pass(sessions, celery, 0)
    assert first == waiting_datasets + waiting_runs  # nothing was in the broker: all were lost
    for period in range(1, 6):  # five more grace periods with no worker
        assert reaper_pass(sessions, celery, period * (GRACE + 1)) == 0
    assert queue_depth(celery, "cpu") == waiting_datasets
    assert queue_depth(celery, "train") == waiting_runs

    with celery.connection_for_write() as conn:  # the broker loses the cpu queue (a Redis restart)
        conn.default_channel.queue_purge("cpu")
    assert reaper_pass(sessions, celery, 7 * (GRACE + 1)) == waiting_datasets
    assert queue_depth(celery, "cpu") == waiting_datasets
