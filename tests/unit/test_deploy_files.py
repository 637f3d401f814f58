"""The deployment files: valid Compose, commands that exist, images that are pinned, non-root and
secret-free, and an API that never imports torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from h2t.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE_SETS = [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.multi-gpu.yml"],
                ["docker-compose.yml", "docker-compose.data-parallel.yml"],
                ["docker-compose.yml", "docker-compose.shared-gpu.yml"],
                ["docker-compose.yml", "docker-compose.cluster.yml"], ["docker-compose.worker-host.yml"]]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def _compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        if os.environ.get("H2T_REQUIRE_SERVERS") == "1":
            pytest.fail("docker-compose is not installed (.ci/run installs Debian's)")
        pytest.skip("docker-compose (a Compose parser) is not installed")
    return found


def resolved_compose(files: list[str], env_file: str = ".env.example") -> dict:
    """The configuration Compose itself resolves (variables substituted, overrides merged)."""
    args = [_compose(), "--env-file", env_file]
    for f in files:
        args += ["-f", f]
    result = subprocess.run([*args, "config"], cwd=REPO, capture_output=True, text=True, check=True)
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("files", COMPOSE_SETS, ids=lambda f: "+".join(f))
def test_compose_files_validate_with_a_real_compose_parser(files):
    args = [_compose(), "--env-file", ".env.example"]
    for f in files:
        args += ["-f", f]
    result = subprocess.run([*args, "config", "-q"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path):
    env = tmp_path / "empty.env"
    env.write_text("H2T_API_KEYS=k\n")
    result = subprocess.run([_compose(), "--env-file", str(env), "-f", "docker-compose.yml", "config", "-q"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


def _h2t_subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


@pytest.mark.parametrize("files", COMPOSE_SETS, ids=lambda f: "+".join(f))
def test_every_project_service_runs_an_h2t_command_that_exists(files):
    config = resolved_compose(files)
    subcommands = _h2t_subcommands()
    ours = {name: svc for name, svc in config["services"].items() if str(svc.get("image", "")).startswith("h2t-")}
    assert ours, "no project services found"
    for name, service in ours.items():
        command = service["command"]
        assert command[0] == "h2t", f"{name} runs {command}"
        assert command[1] in subcommands, f"{name}: h2t has no '{command[1]}' command"
        build_parser().parse_args(command[1:])  # its flags parse too
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'h2t = "h2t.cli:main"' in pyproject


def test_single_server_compose_has_the_required_shape():
    services = resolved_compose(["docker-compose.yml"])["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert "artifacts" in str(services[name]["volumes"])
    assert "readyz" in str(services["api"]["healthcheck"]["test"])
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert "--appendonly" in services["redis"]["command"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    multi = resolved_compose(["docker-compose.yml", "docker-compose.multi-gpu.yml"])["services"]
    pinned = [[d["device_ids"] for d in s["deploy"]["resources"]["reservations"]["devices"]]
              for n, s in multi.items() if n.startswith("worker")]
    assert sorted(pinned) == [[["0"]], [["1"]]]  # one device each, a different one per worker


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_use_pinned_bases_run_as_non_root_and_bake_in_no_secrets(dockerfile):
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert bases and all(re.search(r":\d+\.\d+\.\d+", b) for b in bases), bases  # exact version tags
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"(PASSWORD|API_KEYS|SECRET)\s*=", text)
    assert not re.search(r"(wget|curl)\s", text)  # no data or weights downloaded at build time
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", "runs", "data", "*.pt"} <= set(ignored)


def test_the_gpu_image_installs_onnxruntime_gpu_and_the_api_image_the_cpu_one():
    worker = (REPO / "docker" / "worker.Dockerfile").read_text()
    api = (REPO / "docker" / "api.Dockerfile").read_text()
    assert '".[train,gpu]"' in worker and '".[cpu]"' in api and "torch" not in api.split("RUN pip install")[1][:20]


def test_the_api_process_never_imports_torch():
    code = ("import os, sys; os.environ['H2T_API_KEYS'] = 'k'; os.environ['H2T_DATABASE_URL'] = 'sqlite://'; "
            "from service.api.app import create_app; create_app(); "
            "bad = [m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules]; "
            "sys.exit(str(bad) if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
