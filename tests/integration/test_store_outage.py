"""A PostgreSQL outage injected into a private cluster this test creates itself (`initdb`, `pg_ctl` on a
spare port; never the machine's shared server): runs queued and one training when the store stops
for 20 s all finish once, and the API answers 503 problem+json with Retry-After meanwhile."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.store.db import get_engine
from service.store.migrate import upgrade_head
from service.store.sweep import sweep_once
from tests.helpers import create_tiny_dataset, get_run, submit_run, tiny_run_config, wait_for, wait_for_run
from tests.integration.conftest import API_KEY, spawn_worker, stored_artifacts, stored_metric_rows

pytestmark = pytest.mark.integration

OUTAGE_S = 20.0


def _missing(reason: str) -> None:
    if os.environ.get("H2T_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (H2T_REQUIRE_SERVERS=1)")
    pytest.skip(f"{reason}: the PostgreSQL outage test needs PostgreSQL's server binaries to start a private cluster")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: on the PATH, or Debian's versioned folders (newest first)."""
    on_path = shutil.which("pg_ctl")
    folders = [Path(on_path).resolve().parent] if on_path else []
    folders += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    return next((f for f in folders if (f / "initdb").exists() and (f / "pg_ctl").exists()), None)


@dataclass
class PrivatePostgres:
    """A throwaway cluster (trust auth, fsync off) in its own folder, on its own port; `stop` and `start`
    inject the outage. initdb and the server refuse to run as root, so as root they run as the
    `postgres` OS user, which owns the cluster's folder."""

    bin: Path
    folder: Path
    port: int
    user: str | None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/h2t"

    def _run(self, program: str, *args: str) -> None:
        as_user = {"user": self.user, "group": self.user, "extra_groups": []} if self.user else {}
        result = subprocess.run([str(self.bin / program), *args], capture_output=True, text=True, timeout=120,
                                **as_user)
        if result.returncode != 0:
            log = self.folder / "server.log"
            raise RuntimeError(f"{program} {' '.join(args)} failed ({result.returncode}): {result.stderr}"
                               f"{log.read_text()[-2000:] if log.exists() else ''}")

    def initdb(self) -> None:
        self._run("initdb", "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "-t", "60", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster with a database `h2t` migrated to head; stopped and removed at the end."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        _missing("initdb and pg_ctl are not installed (neither on the PATH nor under /usr/lib/postgresql)")
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            import pwd

            pwd.getpwnam(user)
        except KeyError:
            _missing("running as root, and there is no `postgres` OS user to run initdb and the server as")
    folder = Path(tempfile.mkdtemp(prefix="h2t-pg-"))  # short: the server's unix socket lives here too
    if user:
        shutil.chown(folder, user, user)
    cluster = PrivatePostgres(bin_dir, folder, _free_port(), user)
    started = False
    try:
        cluster.initdb()
        cluster.start()
        started = True
        admin = sa.create_engine(cluster.url.replace("/h2t", "/postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text("CREATE DATABASE h2t"))
        admin.dispose()
        upgrade_head(cluster.url)
        yield cluster
    finally:
        get_engine(cluster.url).dispose()
        if started:
            with contextlib.suppress(RuntimeError):  # already stopped by a failed test
                cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _is_store_down_problem(response) -> bool:
    return (response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
            and response.headers.get("retry-after", "").isdigit() and response.json()["status"] == 503)


def _training(run: dict) -> dict | None:
    """The run, when it is training past its first stored epoch."""
    return run if run["status"] == "running" and (run["stage"], run["epoch"]) >= (1, 1) else None


def test_runs_queued_and_training_when_the_database_stops_for_20_s_all_finish_once(
        settings, private_postgres, tmp_path):
    """Four runs, one of them training, when the store stops for 20 s: the worker's store retries span the
    outage, the sweepers do not mistake the heartbeats the store could not take for a dead worker, and
    every run succeeds on its first attempt with each metric row written once and one model."""
    settings = settings.model_copy(update={"database_url": private_postgres.url})
    worker = spawn_worker(settings, tmp_path / "worker.log")
    try:
        with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
            dataset = create_tiny_dataset(client)
            ids = [submit_run(client, dataset)["id"] for _ in range(4)]
            try:  # the outage starts while the first run trains, after its first epoch is stored
                training = wait_for(lambda: _training(get_run(client, ids[0])), 120, "the first run to store an epoch")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{worker.log()[-3000:]}") from None
            assert training["attempts"] == 1

            private_postgres.stop()
            down_at = time.monotonic()
            with pytest.raises(sa.exc.OperationalError):  # the sweeps meanwhile find the store gone
                sweep_once(settings, client.app.state.celery)
            answers = []
            while time.monotonic() - down_at < OUTAGE_S:
                answers.append(client.get(f"/v1/runs/{ids[1]}"))
                answers.append(client.post("/v1/runs", json={"dataset_id": dataset, **tiny_run_config()}))
                time.sleep(0.5)
            # a sweep at the worst moment: the store is back and the worker's next heartbeat not in yet (the
            # worker is paused for that instant); the claim looks 20 s stale (the timeout is 3 s), but it was
            # the store that was silent
            worker.process.send_signal(signal.SIGSTOP)
            try:
                private_postgres.start()
                requeued = sweep_once(settings, client.app.state.celery)
            finally:
                worker.process.send_signal(signal.SIGCONT)
            assert requeued == []

            assert answers and all(_is_store_down_problem(a) for a in answers), \
                [(a.status_code, a.headers.get("content-type"), a.headers.get("retry-after")) for a in answers
                 if not _is_store_down_problem(a)][:5]
            try:
                finals = [wait_for_run(client, run_id, ("succeeded",), 150) for run_id in ids]
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{worker.log()[-4000:]}") from None
            listed = client.get("/v1/runs", params={"limit": 100}).json()
            models = client.get("/v1/models", params={"limit": 100}).json()
    finally:
        worker.stop(signal.SIGKILL)
    retries = worker.log().count("the store is unreachable while")
    print(f"\n{len(answers)} answers during the {OUTAGE_S:.0f} s outage, all 503 problem+json with Retry-After; "
          f"{retries} store retries in the worker; attempts {[f['attempts'] for f in finals]}")

    assert [(f["status"], f["attempts"], f["model_id"]) for f in finals] == [("succeeded", 1, i) for i in ids]
    assert listed["count"] == 4  # no POST answered 503 wrote a run
    assert sorted(m["id"] for m in models["data"]) == sorted(ids)
    tiny_epochs = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]  # the tiny run: 3 + 2 epochs, each recorded once
    assert stored_metric_rows(settings.database_url) == sorted((r, s, e) for r in ids for s, e in tiny_epochs)
    per_run = ["onnx", "stage1_checkpoint", "stage2_checkpoint"]  # one row of each kind per run
    assert stored_artifacts(settings.database_url) == sorted((r, kind) for r in ids for kind in per_run)
