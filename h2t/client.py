"""A small Python client of the service's REST API, and the `h2t datasets|runs|models|predict` commands on it.

    from h2t.client import Client
    client = Client("http://gpu-host:8000", "my-key")      # or H2T_URL / H2T_API_KEY
    run = client.submit_run({"dataset_id": dataset_id, "stage2": {"rho": 0.5}}, name="rho 0.5")
    for kind, data in client.events(run["id"]):           # status, progress, epoch ... until it ends
        ...

Answers are the API's JSON as dicts. Every failure is an `ApiError` carrying the problem's one-sentence detail
and the exit code the commands end with, so scripts can tell the cases apart:
0 done; 1 the run ended failed or cancelled; 2 the request was refused (bad input, a conflict);
3 the API key was missing or refused; 4 not found; 5 the service could not be reached or failed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail

    @property
    def exit_code(self) -> int:
        if self.status in (401, 403):
            return 3
        if self.status == 404:
            return 4
        if self.status == 0 or self.status >= 500:
            return 5
        return 2


class Client:
    """One method per API call; `url` and `api_key` default to H2T_URL and H2T_API_KEY."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.url = (url or os.environ.get("H2T_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("H2T_API_KEY")
        if not key:
            raise ApiError(401, "no API key: pass --api-key or set H2T_API_KEY")
        self._http = httpx.Client(base_url=self.url, headers={"X-API-Key": key}, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- datasets -------------------------------------------------------------------------------------

    def create_dataset(self, spec: dict[str, Any]) -> dict:
        return self._call("POST", "/v1/datasets", json=spec)

    def upload_dataset(self, archive: Path, image_size: int | None = None, name: str | None = None,
                       groups: dict | None = None) -> dict:
        """`groups`: the dataset's many/medium/few definition (models.contract.config.GroupConfig's fields)."""
        fields = {key: str(value) for key, value in (("image_size", image_size), ("name", name)) if value is not None}
        if groups is not None:
            fields["groups"] = json.dumps(groups)
        with open(archive, "rb") as f:
            return self._call("POST", "/v1/datasets", files={"archive": (archive.name, f)}, data=fields)

    def datasets(self, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/v1/datasets", params={"limit": limit, "offset": offset})

    def dataset(self, dataset_id: str) -> dict:
        return self._call("GET", f"/v1/datasets/{dataset_id}")

    def delete_dataset(self, dataset_id: str, force: bool = False) -> None:
        self._call("DELETE", f"/v1/datasets/{dataset_id}", params={"force": force})

    # --- runs -----------------------------------------------------------------------------------------

    def submit_run(self, body: dict[str, Any], name: str | None = None, tags: list[str] | None = None) -> dict:
        labels = {"name": name} if name else {}
        if tags:
            labels["tags"] = tags
        return self._call("POST", "/v1/runs", json={**body, **labels})

    def runs(self, **filters: Any) -> dict:
        """GET /v1/runs with its filters (status, dataset_id, method, stage1_from, name, search, tag=[...], sort,
        limit, offset); None values are left out."""
        return self._call("GET", "/v1/runs", params={k: v for k, v in filters.items() if v not in (None, [], ())})

    def run(self, run_id: str) -> dict:
        return self._call("GET", f"/v1/runs/{run_id}")

    def metrics(self, run_id: str) -> list[dict]:
        return self._call("GET", f"/v1/runs/{run_id}/metrics")["data"]

    def cancel_run(self, run_id: str, force: bool = False) -> dict:
        return self._call("POST", f"/v1/runs/{run_id}/cancel", params={"force": force})

    def delete_run(self, run_id: str, force: bool = False) -> None:
        self._call("DELETE", f"/v1/runs/{run_id}", params={"force": force})

    def logs(self, run_id: str) -> str:
        return self._call("GET", f"/v1/runs/{run_id}/logs", text=True)

    def follow_logs(self, run_id: str) -> Iterator[str]:
        """The run's log lines as they are written, until the run has ended."""
        with self._stream(f"/v1/runs/{run_id}/logs", {"follow": True}) as response:
            yield from response.iter_lines()

    def events(self, run_id: str) -> Iterator[tuple[str, dict]]:
        """(event, data) of the run's event stream: status, progress, epoch; ends after its final status."""
        kind = "message"
        with self._stream(f"/v1/runs/{run_id}/events", {}) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    yield kind, json.loads(line.removeprefix("data: "))

    # --- models ---------------------------------------------------------------------------------------

    def models(self, limit: int = 50, offset: int = 0) -> dict:
        return self._call("GET", "/v1/models", params={"limit": limit, "offset": offset})

    def model(self, model_id: str) -> dict:
        return self._call("GET", f"/v1/models/{model_id}")

    def calibration(self, model_id: str) -> dict:
        return self._call("GET", f"/v1/models/{model_id}/calibration")

    def download_model(self, model_id: str, path: Path) -> Path:
        with self._stream(f"/v1/models/{model_id}/onnx", {}) as response, open(path, "wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
        return path

    def delete_model(self, model_id: str) -> None:
        self._call("DELETE", f"/v1/models/{model_id}")

    def predict(self, model_id: str, images: list[Path], top_k: int = 5) -> dict:
        files = [("images", (path.name, path.read_bytes())) for path in images]
        return self._call("POST", f"/v1/models/{model_id}/predict", files=files, data={"top_k": str(top_k)})

    # --- plumbing -------------------------------------------------------------------------------------

    def import_model(self, onnx: Path, manifest: dict[str, Any]) -> dict:
        """POST /v1/models: an ONNX file exported by h2t with what was measured of it (schemas.ImportManifest)."""
        with open(onnx, "rb") as f:
            return self._call("POST", "/v1/models", files={"onnx": (onnx.name, f, "application/octet-stream")},
                              data={"manifest": json.dumps(manifest)})

    # --- the model registry ---------------------------------------------------------------------------

    def registered(self, name: str | None = None) -> dict:
        return self._call("GET", f"/v1/registry/{name}" if name else "/v1/registry")

    def register(self, name: str, description: str | None = None) -> dict:
        return self._call("POST", "/v1/registry", json={"name": name, "description": description})

    def add_version(self, name: str, model_id: str) -> dict:
        return self._call("POST", f"/v1/registry/{name}/versions", json={"model_id": model_id})

    def set_alias(self, name: str, alias: str, version: int) -> dict:
        return self._call("PUT", f"/v1/registry/{name}/aliases/{alias}", json={"version": version})

    def remove_alias(self, name: str, alias: str) -> None:
        self._call("DELETE", f"/v1/registry/{name}/aliases/{alias}")

    def unregister(self, name: str) -> None:
        self._call("DELETE", f"/v1/registry/{name}")

    def _call(self, method: str, path: str, text: bool = False, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach {self.url}: {exc}") from None
        _raise_for_problem(response)
        if response.status_code == 204:
            return None
        return response.text if text else response.json()

    def _stream(self, path: str, params: dict[str, Any]) -> Any:
        client = self

        class _Streamed:
            def __enter__(self) -> httpx.Response:
                try:
                    self.context = client._http.stream("GET", path, params=params, timeout=httpx.Timeout(
                        client._http.timeout.connect, read=None))
                    response = self.context.__enter__()
                except httpx.HTTPError as exc:
                    raise ApiError(0, f"cannot reach {client.url}: {exc}") from None
                if response.is_error:
                    response.read()
                    self.context.__exit__(None, None, None)
                    _raise_for_problem(response)
                return response

            def __exit__(self, *exc: object) -> None:
                self.context.__exit__(*exc)

        return _Streamed()


def _raise_for_problem(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        detail = response.json().get("detail") or response.reason_phrase
    except ValueError:
        detail = response.text[:200] or response.reason_phrase
    if not isinstance(detail, str):  # a validation error's list of fields
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    if response.status_code == 401:
        detail = f"the API key was refused ({detail})"
    raise ApiError(response.status_code, detail)
