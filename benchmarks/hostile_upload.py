"""Hostile archive uploads against a real `h2t serve` process: the server's memory and its liveness.

Starts the API with uvicorn in a subprocess (the embedded SQLite store by default, or a fresh
PostgreSQL database with `--store postgres`) with the default archive limits of
`service/store/settings.py` (64 MiB per member), and uploads to `POST /v1/datasets` (multipart, field
`archive`, `image_size`):

1. a zip of a couple of MiB holding one member that inflates to 2 GiB of zeros (deflate), its size
   declared truthfully in the headers;
2. the same bomb (2 GiB - 1 byte) whose zip headers claim the member is 1 KiB, so only the size
   seen while inflating can catch it;
3. a tar.gz holding one 2 GiB member of zeros;
4. a realistic archive: a few thousand small valid PNGs (`--pngs`), which must be accepted (201).

Every archive is built with streaming writes: the 2 GiB is never held in memory nor written to disk.
During each upload a thread polls `GET /healthz` every `--poll-ms` and another samples the server
process tree's resident memory (VmRSS of the process and its children every 10 ms, and the kernel's
high-water mark VmHWM), and the server's written bytes (`wchar` of /proc/<pid>/io) are compared
before and after. Prints a table; exits 1 unless every bomb is refused with a 4xx problem+json, the
server's peak RSS stays under 500 MiB, `/healthz` never takes 100 ms or more, the server writes far
less than the bomb, nothing is left in the artifact store after a refusal, and the realistic
archive is accepted.

  python benchmarks/hostile_upload.py                    # embedded store, 3000 PNGs (about a minute)
  python benchmarks/hostile_upload.py --store postgres   # a fresh database beside H2T_TEST_PG_URL
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

PG_URL = os.environ.get("H2T_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
API_KEY = "hostile-upload-key"
MiB, GiB = 2**20, 2**30
BOMB_BYTES = 2 * GiB
RSS_LIMIT = 500 * MiB
HEALTHZ_LIMIT_S = 0.100
CHUNK = bytes(MiB)


# --- archives, built with streaming writes ----------------------------------------------------------


def zip_bomb(path: Path, size: int, claimed: int | None = None) -> None:
    """One deflated member of `size` zeros. With `claimed`, both zip headers then declare that size
    instead (the member stays under the zip64 limit so the size fields are plain 32-bit ones)."""
    info = zipfile.ZipInfo("train/zeros/bomb.png", date_time=(2024, 1, 1, 0, 0, 0))
    info.compress_type, info.file_size = zipfile.ZIP_DEFLATED, size
    with zipfile.ZipFile(path, "w") as archive, archive.open(info, "w", force_zip64=claimed is None) as member:
        left = size
        while left:
            member.write(CHUNK[:min(left, MiB)])
            left -= min(left, MiB)
    if claimed is None:
        return
    assert size < 2**31  # zipfile wrote no zip64 extra fields: the sizes are the 32-bit header fields
    with open(path, "r+b") as f:
        data = f.read()
        assert data[:4] == b"PK\x03\x04"
        f.seek(22)  # local file header: uncompressed size
        f.write(struct.pack("<I", claimed))
        eocd = data.rfind(b"PK\x05\x06")
        central = struct.unpack("<I", data[eocd + 16:eocd + 20])[0]
        assert data[central:central + 4] == b"PK\x01\x02"
        f.seek(central + 24)  # central directory entry: uncompressed size
        f.write(struct.pack("<I", claimed))


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def tar_bomb(path: Path, size: int) -> None:
    info = tarfile.TarInfo("train/zeros/bomb.png")
    info.size = size
    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(info, io.BufferedReader(_Zeros(size), MiB))


def png_archive(path: Path, images: int, seed: int = 0) -> None:
    """`images` 32x32 noise PNGs in train/ (10 classes, long-tailed) and test/ (20 per class)."""
    rng = random.Random(seed)
    classes = [f"class{i}" for i in range(10)]
    test = 20 * len(classes)
    weights = [0.6 ** i for i in range(len(classes))]
    train = [max(2, round((images - test) * w / sum(weights))) for w in weights]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for split, counts in (("train", train), ("test", [20] * len(classes))):
            for cls, count in zip(classes, counts, strict=True):
                for i in range(count):
                    buffer = io.BytesIO()
                    Image.frombytes("RGB", (32, 32), rng.randbytes(32 * 32 * 3)).save(buffer, "PNG")
                    archive.writestr(f"{split}/{cls}/{i:05d}.png", buffer.getvalue())


# --- the server and what is measured of it -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for task in Path(f"/proc/{pids[i]}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
        i += 1
    return pids


def _status_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def written_bytes(pid: int) -> int:
    """Bytes the process tree passed to write(2) and friends (files, sockets, pipes)."""
    total = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


@dataclass
class Sampler:
    """Samples the server tree's RSS every 10 ms and times GET /healthz every `interval_s`."""

    pid: int
    base_url: str
    interval_s: float
    peak_rss: int = 0
    latencies: list[float] = field(default_factory=list)
    health_errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Sampler:
        self._threads = [threading.Thread(target=self._rss, daemon=True),
                         threading.Thread(target=self._health, daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _rss(self) -> None:
        while not self._stop.is_set():
            rss = sum(_status_kib(p, "VmRSS") for p in _tree(self.pid)) * 1024
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(0.01)

    def _health(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10) as client:
            client.get("/healthz")  # a kept-alive connection before the clock starts
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                self.latencies.append(elapsed)
                self.health_errors += not ok
                time.sleep(max(0.0, self.interval_s - elapsed))


def _percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1] if q < 100 else max(values)


@dataclass
class Result:
    case: str
    upload_bytes: int
    status: int
    content_type: str
    body: str
    seconds: float
    latencies: list[float]
    health_errors: int
    peak_rss: int
    hwm: int
    written: int
    left_behind: int
    expect_refusal: bool

    @property
    def problems(self) -> list[str]:
        found = []
        if self.expect_refusal:
            if not (400 <= self.status < 500 and self.content_type.startswith("application/problem+json")):
                found.append(f"answered {self.status} {self.content_type}, not a 4xx problem+json")
            if self.written > 256 * MiB:
                found.append(f"the server wrote {self.written / MiB:.0f} MiB")
            if self.left_behind:
                found.append(f"{self.left_behind} files left in the artifact store")
        elif self.status != 201:
            found.append(f"answered {self.status}, not 201")
        if max(self.peak_rss, self.hwm) >= RSS_LIMIT:
            found.append(f"peak server RSS {max(self.peak_rss, self.hwm) / MiB:.0f} MiB")
        if self.health_errors or not self.latencies or max(self.latencies) >= HEALTHZ_LIMIT_S:
            found.append(f"/healthz max {max(self.latencies, default=float('nan')) * 1000:.0f} ms, "
                         f"{self.health_errors} errors")
        return found


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def upload(case: str, path: Path, base_url: str, pid: int, artifacts: Path, poll_s: float,
           expect_refusal: bool) -> Result:
    before_files, before_written = _files(artifacts), written_bytes(pid)
    with Sampler(pid, base_url, poll_s) as sampler, open(path, "rb") as f:
        time.sleep(0.2)  # a few idle samples first
        started = time.perf_counter()
        response = httpx.post(f"{base_url}/v1/datasets", headers={"X-API-Key": API_KEY}, timeout=600,
                              files={"archive": (path.name, f, "application/octet-stream")},
                              data={"image_size": "32"})
        seconds = time.perf_counter() - started
        time.sleep(0.2)
    hwm = sum(_status_kib(p, "VmHWM") for p in _tree(pid)) * 1024
    left = _files(artifacts) - before_files
    return Result(case, path.stat().st_size, response.status_code, response.headers.get("content-type", ""),
                  response.text, seconds, sampler.latencies, sampler.health_errors, sampler.peak_rss, hwm,
                  written_bytes(pid) - before_written, len(left) if expect_refusal else 0, expect_refusal)


def _server_limits(env: dict[str, str]) -> dict[str, object]:
    """The settings the server will read from `env` (its own process, so nothing of ours leaks in)."""
    code = ("import json; from service.store.settings import Settings; s = Settings(); print(json.dumps("
            "{'max_archive_member_bytes': s.max_archive_member_bytes, 'max_upload_bytes': s.max_upload_bytes, "
            "'artifact_dir': str(s.artifact_dir.resolve())}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("embedded", "postgres"), default="embedded")
    parser.add_argument("--pngs", type=int, default=3000, help="images in the realistic archive")
    parser.add_argument("--poll-ms", type=float, default=20, help="GET /healthz every this many ms")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="h2t-hostile-"))
    home = workdir / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("H2T_")}  # the default limits
    env.update({"H2T_HOME": str(home), "H2T_API_KEYS": API_KEY, "PYTHONUNBUFFERED": "1"})
    admin, db_name = None, None
    server = None
    try:
        if args.store == "postgres":
            admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
            db_name = f"h2t_hostile_{uuid.uuid4().hex[:12]}"
            with admin.connect() as connection:
                connection.execute(sa.text(f'CREATE DATABASE "{db_name}"'))
            env["H2T_DATABASE_URL"] = admin.url.set(database=db_name).render_as_string(hide_password=False)
        limits = _server_limits(env)
        assert limits["max_archive_member_bytes"] < BOMB_BYTES - 1, "the bomb must be over the member cap"
        subprocess.run([sys.executable, "-m", "h2t", "migrate"], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL)

        print(f"building archives in {workdir} ...", flush=True)
        archives = [
            ("zip: one member inflating to 2 GiB of zeros", workdir / "bomb.zip", True),
            ("zip: 2 GiB of zeros, headers claim 1 KiB", workdir / "bomb-lying.zip", True),
            ("tar.gz: one member of 2 GiB of zeros", workdir / "bomb.tar.gz", True),
            (f"zip: {args.pngs} valid 32x32 PNGs", workdir / "pngs.zip", False),
        ]
        zip_bomb(archives[0][1], BOMB_BYTES)
        zip_bomb(archives[1][1], BOMB_BYTES - 1, claimed=1024)
        tar_bomb(archives[2][1], BOMB_BYTES)
        png_archive(archives[3][1], args.pngs)

        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        log = open(workdir / "api.log", "w")  # noqa: SIM115 (closed with the server below)
        server = subprocess.Popen([sys.executable, "-m", "h2t", "serve", "--port", str(port), "--log-level",
                                   "WARNING"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{(workdir / 'api.log').read_text()[-3000:]}")
            time.sleep(0.2)
        idle = Sampler(server.pid, base_url, args.poll_ms / 1000)
        with idle:
            time.sleep(2)
        rss_idle = idle.peak_rss

        results = [upload(case, path, base_url, server.pid, Path(limits["artifact_dir"]), args.poll_ms / 1000, refuse)
                   for case, path, refuse in archives]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
        if admin is not None:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            admin.dispose()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nhostile uploads: h2t serve (uvicorn), {args.store} store, default limits "
          f"(member {limits['max_archive_member_bytes'] // MiB} MiB, upload {limits['max_upload_bytes'] // MiB} MiB); "
          f"/healthz every {args.poll_ms:g} ms from 0.2 s before each upload to 0.2 s after its answer; "
          f"server RSS when idle {rss_idle / MiB:.0f} MiB\n")
    print("| archive | upload | answer | time | /healthz n | p50 ms | p99 ms | max ms | peak RSS MiB (sampled / VmHWM) "
          "| server wrote MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.case} | {r.upload_bytes / MiB:.1f} MiB | {r.status} | {r.seconds:.2f} s | {len(r.latencies)} "
              f"| {_percentile(r.latencies, 50) * 1000:.1f} | {_percentile(r.latencies, 99) * 1000:.1f} "
              f"| {max(r.latencies, default=float('nan')) * 1000:.1f} | {r.peak_rss / MiB:.0f} / {r.hwm / MiB:.0f} "
              f"| {r.written / MiB:.1f} |")
    print()
    for r in results:
        body = r.body if len(r.body) <= 300 else r.body[:300] + "..."
        print(f"{r.case}: {r.status} {r.content_type}\n  {body}")
    failures = [f"{r.case}: {p}" for r in results for p in r.problems]
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall bombs refused with a 4xx problem+json; peak server RSS under 500 MiB; /healthz under 100 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
