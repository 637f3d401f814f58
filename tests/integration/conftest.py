"""Integration fixtures: per test a fresh PostgreSQL database migrated by Alembic, a private Redis queue,
real worker processes started with `python -m h2t worker`. No fakes, no eager Celery.

Servers: H2T_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test) and
H2T_TEST_REDIS_URL (default redis://127.0.0.1:6379/15). Tests skip when they are unreachable,
unless H2T_REQUIRE_SERVERS=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.store.db import session_scope
from service.store.migrate import upgrade_head
from service.store.orm import ArtifactRow, MetricRow
from service.store.settings import Settings
from tests.conftest import SHARED_DATA
from tests.helpers import wait_for

PG_URL = os.environ.get("H2T_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("H2T_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
API_KEY = "integration-test-key"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _unavailable(reason: str) -> None:
    if os.environ.get("H2T_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (H2T_REQUIRE_SERVERS=1)")
    pytest.skip(f"{reason}; start PostgreSQL and Redis (see .ci/run) to run integration tests")


@pytest.fixture(scope="session")
def admin_engine() -> Iterator[sa.Engine]:
    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        _unavailable(f"PostgreSQL at {PG_URL} is unreachable: {exc.orig}")
    yield engine
    engine.dispose()


class Databases:
    """PostgreSQL databases for the tests, every one dropped by `drop` or at the end of the session.

    `empty()` is a database with no schema (for the tests of the migrations themselves); `migrated()`
    is a copy (`CREATE DATABASE ... TEMPLATE`) of one template database that Alembic migrated to head
    once per session, which costs a file copy instead of a migration per test.
    """

    def __init__(self, admin_engine: sa.Engine) -> None:
        self.admin_engine = admin_engine
        self.created: list[str] = []
        self.template: str | None = None

    def _url(self, name: str) -> str:
        return self.admin_engine.url.set(database=name).render_as_string(hide_password=False)

    def _create(self, template: str | None = None) -> str:
        name = f"h2t_it_{uuid.uuid4().hex[:12]}"
        clause = f' TEMPLATE "{template}"' if template else ""
        with self.admin_engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"{clause}'))
        self.created.append(name)
        return self._url(name)

    def empty(self) -> str:
        return self._create()

    def migrated(self) -> str:
        if self.template is None:
            url = self._create()
            upgrade_head(url)
            self.template = sa.make_url(url).database
            _release(url)
            # Copying needs a template nobody is connected to: refuse connections from now on, and make
            # sure none is left over (whatever upgrade_head may have kept open).
            with self.admin_engine.connect() as connection:
                connection.execute(sa.text(f'ALTER DATABASE "{self.template}" WITH ALLOW_CONNECTIONS false'))
                connection.execute(
                    sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": self.template},
                )
        return self._create(template=self.template)

    def drop(self, url: str) -> None:
        name = sa.make_url(url).database
        _release(url)
        with self.admin_engine.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            self.drop(self._url(name))


def _release(url: str) -> None:
    """Closes the pooled connections the code under test holds to `url` (engines are cached per URL)."""
    from service.store.db import get_engine

    get_engine(url).dispose()


@pytest.fixture(scope="session")
def databases(admin_engine: sa.Engine) -> Iterator[Databases]:
    made = Databases(admin_engine)
    yield made
    made.drop_all()


@pytest.fixture(scope="session")
def make_database(databases: Databases) -> Callable[[], str]:
    """Creates empty PostgreSQL databases on demand (no schema: the migrations' own tests)."""
    return databases.empty


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {REDIS_URL} is unreachable: {exc}")
    return REDIS_URL


@pytest.fixture
def database_url(databases: Databases) -> Iterator[str]:
    """This test's own migrated database, dropped when the test ends (after its workers are stopped)."""
    url = databases.migrated()
    yield url
    databases.drop(url)


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Per test: its own migrated database, queue and artifact dir; fast heartbeats."""
    queue = f"h2t-it-{uuid.uuid4().hex[:8]}"
    yield Settings(
        database_url=database_url,
        broker_url=redis_url,
        artifact_dir=tmp_path / "artifacts",
        data_root=SHARED_DATA,
        api_keys=(API_KEY,),
        queue_name=queue,
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=3.0,
        sweep_interval_s=1.0,
        max_upload_bytes=2 * 2**20,
        max_archive_members=50,
        max_archive_bytes=4 * 2**20,
        max_archive_member_bytes=2 * 2**20,
        max_image_pixels=512 * 512,
    )
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)


def settings_env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "H2T_DATABASE_URL": settings.database_url,
        "H2T_BROKER_URL": settings.broker_url,
        "H2T_ARTIFACT_DIR": str(settings.artifact_dir),
        "H2T_DATA_ROOT": str(settings.data_root),
        "H2T_API_KEYS": ",".join(settings.api_keys),
        "H2T_QUEUE_NAME": settings.queue_name,
        "H2T_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
        "H2T_HEARTBEAT_TIMEOUT_S": str(settings.heartbeat_timeout_s),
        "H2T_SWEEP_INTERVAL_S": str(settings.sweep_interval_s),
        "H2T_RESEND_AFTER_S": str(settings.resend_after_s),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn_worker(settings: Settings, log_path: Path, **env: str) -> WorkerProcess:
    """A real `python -m h2t worker` process configured by `settings` and extra `H2T_*` variables `env`,
    logging to `log_path`."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "h2t", "worker"],
            cwd=REPO,
            env={**settings_env(settings), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return WorkerProcess(process, log_path)


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(**env: str) -> WorkerProcess:
        worker = spawn_worker(settings, tmp_path / f"worker-{len(started)}.log", **env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(signal.SIGKILL)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    from service.api.app import create_app

    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as test_client:
        yield test_client


def stored_metric_rows(database_url: str) -> list[tuple[str, int, int]]:
    """Every metric row of a test's database as (run_id, stage, epoch), sorted: a duplicate shows."""
    with session_scope(database_url) as session:
        return sorted(
            tuple(row) for row in session.execute(sa.select(MetricRow.run_id, MetricRow.stage, MetricRow.epoch))
        )


def stored_artifacts(database_url: str) -> list[tuple[str, str]]:
    """Every artifact row of a test's database as (run_id, kind), sorted: a duplicate shows."""
    with session_scope(database_url) as session:
        return sorted(tuple(row) for row in session.execute(sa.select(ArtifactRow.run_id, ArtifactRow.kind)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def api_server(settings: Settings, log_path: Path, **env: str) -> Iterator[str]:
    """`python -m h2t serve` on a spare port, configured by `settings` (and `env`); yields its base URL."""
    port = _free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "h2t", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "WARNING"],
            cwd=REPO, env={**settings_env(settings), **env}, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _answers(base_url), 60, "the API server to answer /healthz")
        assert process.poll() is None, f"the API server exited:\n{log_path.read_text()[-3000:]}"
        yield base_url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
