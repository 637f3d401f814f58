"""Bad and hostile requests: each gets a 4xx problem+json, leaves nothing behind, and the service
keeps serving."""

from __future__ import annotations

import io
import struct
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from service.store.db import session_scope
from service.store.orm import ArtifactRow, DatasetRow, MetricRow, RunRow
from tests.helpers import TINY_DATASET, create_tiny_dataset, submit_run

pytestmark = pytest.mark.integration


def png(size: tuple[int, int] = (12, 12), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def make_tar(files: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            archive.addfile(info)
    return buffer.getvalue()


def good_files(classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> dict[str, bytes]:
    files = {}
    for split in ("train", "test"):
        for c, cls in enumerate(classes):
            for i in range(per_class):
                files[f"{split}/{cls}/{i}.png"] = png(seed=100 * c + i)
    return files


def upload(client, data: bytes, filename: str = "data.zip", **fields):
    return client.post("/v1/datasets", files={"archive": (filename, data, "application/octet-stream")}, data=fields)


def _zip_entries(entries: list[tuple[str, bytes]]) -> bytes:
    """A zip whose members may repeat a name (zipfile warns, but writes them)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_with(**extra: bytes) -> bytes:
    return make_zip({**good_files(), **extra})


def _tar_entries(entries: list[tuple[str, bytes]], encoding: str = "utf-8") -> bytes:
    """A tar.gz of these members in this order: names may repeat, and `encoding` may write names that are
    not UTF-8."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT, encoding=encoding) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip_patched(data: bytes, flags: int = 0, method: int | None = None) -> bytes:
    """A zip whose every member has its general-purpose flags or-ed with `flags` and, if given, its
    compression method replaced, in the local and the central header alike: what no zip writer makes."""
    out = bytearray(data)
    count, _, central = struct.unpack_from("<HLL", data, len(data) - 12)  # end of central directory, no comment
    for _ in range(count):
        name_length, extra_length, comment_length = struct.unpack_from("<3H", data, central + 28)
        (local,) = struct.unpack_from("<L", data, central + 42)
        for flags_at, method_at in ((central + 8, central + 10), (local + 6, local + 8)):
            struct.pack_into("<H", out, flags_at, struct.unpack_from("<H", data, flags_at)[0] | flags)
            if method is not None:
                struct.pack_into("<H", out, method_at, method)
        central += 46 + name_length + extra_length + comment_length
    return bytes(out)


def _nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


class Case:
    def __init__(self, name: str, status: int, send, detail: str = "") -> None:
        self.name, self.status, self.send, self.detail = name, status, send, detail

    def __repr__(self) -> str:
        return self.name


def _declared_bomb() -> bytes:
    """A zip whose one member declares (and holds) 5 MiB of zeros: compressed to a few KiB."""
    return make_zip({**good_files(), "train/cat/big.png": b"\0" * (5 * 2**20)})


CASES = [
    Case("no API key", 401, lambda c, ids: c.get("/v1/datasets", headers={"X-API-Key": ""})),
    Case("wrong API key", 401, lambda c, ids: c.get("/v1/runs", headers={"X-API-Key": "nope"})),
    Case(
        "text/plain body",
        415,
        lambda c, ids: c.post("/v1/datasets", content=b"hello", headers={"content-type": "text/plain"}),
    ),
    Case(
        "malformed JSON",
        422,
        lambda c, ids: c.post("/v1/datasets", content=b"{not json", headers={"content-type": "application/json"}),
    ),
    Case("unknown builtin", 422, lambda c, ids: c.post("/v1/datasets", json={"builtin": "imagenet"})),
    Case(
        "imbalance factor 0",
        422,
        lambda c, ids: c.post("/v1/datasets", json={"builtin": "digits", "imbalance_factor": 0}),
    ),
    Case("extra JSON field", 422, lambda c, ids: c.post("/v1/datasets", json={"builtin": "digits", "x": 1})),
    Case("builtin without its files", 422, lambda c, ids: c.post("/v1/datasets", json={"builtin": "cifar10"})),
    Case(
        "multipart without archive",
        422,
        lambda c, ids: c.post("/v1/datasets", data={"name": "x"}, files={"other": ("a.txt", b"x")}),
    ),
    Case(
        "not an archive", 422, lambda c, ids: upload(c, b"\x89PNG this is not an archive at all"), "not a readable zip"
    ),
    Case("absolute path", 422, lambda c, ids: upload(c, zip_with(**{"/etc/evil.png": png()})), "absolute"),
    Case(
        "parent traversal",
        422,
        lambda c, ids: upload(c, make_zip({**good_files(), "train/../../evil.png": png()})),
        "'..'",
    ),
    Case(
        "zip symlink",
        422,
        lambda c, ids: upload(c, make_zip(good_files(), {"train/cat/link.png": "/etc/passwd"})),
        "symbolic link",
    ),
    Case(
        "tar symlink",
        422,
        lambda c, ids: upload(
            c, make_tar(good_files(), {"train/cat/l.png": (tarfile.SYMTYPE, "/etc/passwd")}), "data.tar.gz"
        ),
        "is a link",
    ),
    Case(
        "tar hard link",
        422,
        lambda c, ids: upload(
            c, make_tar(good_files(), {"train/cat/h.png": (tarfile.LNKTYPE, "train/cat/0.png")}), "data.tar.gz"
        ),
        "is a link",
    ),
    Case("non-image file", 422, lambda c, ids: upload(c, zip_with(**{"train/cat/notes.txt": b"hi"})), "not an image"),
    Case(
        "truncated image",
        422,
        lambda c, ids: upload(c, zip_with(**{"train/cat/bad.png": png()[:60]})),
        "not a readable image",
    ),
    Case(
        "image not an image",
        422,
        lambda c, ids: upload(c, zip_with(**{"train/cat/fake.jpg": b"GIF89a garbage"})),
        "not a readable image",
    ),
    Case(
        "huge image dimensions",
        422,
        lambda c, ids: upload(c, zip_with(**{"train/cat/wide.png": png((600, 600))})),
        "pixel limit",
    ),
    Case("too many members", 413, lambda c, ids: upload(c, make_zip(good_files(per_class=15))), "members"),
    Case("body over the upload limit", 413, lambda c, ids: upload(c, b"\0" * (3 * 2**20)), "exceeds"),
    Case("archive unpacks too large", 413, lambda c, ids: upload(c, _declared_bomb()), "unpacks to more"),
    Case("the same member twice", 422, lambda c, ids: upload(c, _zip_entries(
        [(name, data) for name, data in good_files().items()] + [("train/cat/0.png", png(seed=9))])), "appears twice"),
    Case("one member unpacks too large", 413,
         lambda c, ids: upload(c, zip_with(**{"train/cat/huge.png": b"\0" * (2 * 2**20 + 1)})), "huge.png' unpacks"),
    Case("file outside train/test", 422, lambda c, ids: upload(c, zip_with(**{"train/x.png": png()})), "train/<class>"),
    Case("only one class", 422, lambda c, ids: upload(c, make_zip(good_files(classes=("cat",)))), "two class"),
    Case("test class unknown to train", 422, lambda c, ids: upload(c, zip_with(**{"test/cow/0.png": png()})), "lacks"),
    Case("image_size out of range", 422, lambda c, ids: upload(c, make_zip(good_files()), image_size="4")),
    Case("corrupt tar.gz", 422, lambda c, ids: upload(c, make_tar(good_files())[:200], "data.tar.gz"), "corrupt"),
    Case("run on unknown dataset", 404, lambda c, ids: c.post("/v1/runs", json={"dataset_id": "nope"})),
    Case(
        "run with rho 2",
        422,
        lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"], "stage2": {"rho": 2}}),
    ),
    Case(
        "crt with rho",
        422,
        lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"], "stage2": {"method": "crt", "rho": 0.5}}),
    ),
    Case(
        "run with unknown field",
        422,
        lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"], "learning_rate": 1}),
    ),
    Case(
        "run with negative epochs",
        422,
        lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"], "stage1": {"epochs": -1}}),
    ),
    Case(
        "run groups other than its dataset's",
        422,
        lambda c, ids: c.post(
            "/v1/runs", json={"dataset_id": ids["dataset"], "groups": {"slices": [[0, 3], [3, 6], [6, 100]]}}
        ),
    ),
    Case(
        "validation split a builtin dataset cannot give",
        422,
        lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"], "validation": {"source": "dataset"}}),
        "validation.source",
    ),
    Case(
        "validation fraction out of range",
        422,
        lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"],
                                                "validation": {"source": "carve", "fraction": 1.5}}),
    ),
    Case(
        "stage1_from unknown run",
        404,
        lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"], "stage1_from": "nope"}),
    ),
    Case(
        "stage1_from an unfinished run",
        409,
        lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"], "stage1_from": ids["cancelled_run"]}),
    ),
    Case("unknown run", 404, lambda c, ids: c.get("/v1/runs/nope")),
    Case("metrics of unknown run", 404, lambda c, ids: c.get("/v1/runs/nope/metrics")),
    Case("unknown dataset", 404, lambda c, ids: c.get("/v1/datasets/nope")),
    Case("cancel unknown run", 404, lambda c, ids: c.post("/v1/runs/nope/cancel")),
    Case("cancel a cancelled run", 409, lambda c, ids: c.post(f"/v1/runs/{ids['cancelled_run']}/cancel")),
    Case("delete a dataset in use", 409, lambda c, ids: c.delete(f"/v1/datasets/{ids['dataset']}")),
    Case("page size 0", 422, lambda c, ids: c.get("/v1/runs?limit=0")),
    Case("unknown run status filter", 422, lambda c, ids: c.get("/v1/runs?status=exploded")),
    Case("offset past a 64-bit integer", 422, lambda c, ids: c.get(f"/v1/runs?offset={2**63}")),
    Case("NUL in a run id", 422, lambda c, ids: c.get("/v1/runs/a%00b"), "cannot store"),
    Case("NUL in a dataset name", 422,
         lambda c, ids: c.post("/v1/datasets", json={"builtin": "digits", "name": "a\u0000b"}), "cannot store"),
    Case("infinite mixup alpha", 422, lambda c, ids: c.post(  # JSON as Python's json module writes infinity
        "/v1/runs", content=f'{{"dataset_id": "{ids["dataset"]}", "stage1": {{"mixup_alpha": Infinity}}}}',
        headers={"content-type": "application/json"})),
    Case("non-ASCII API key", 401, lambda c, ids: c.get("/v1/runs", headers={"X-API-Key": "clé".encode()}), "invalid"),
    # health and metrics
    Case("POST to /healthz", 405, lambda c, ids: c.post("/healthz"), "Method Not Allowed"),
    Case("/readyz with a body over the limit", 413,
         lambda c, ids: c.request("GET", "/readyz", content=b"x" * (65 * 2**10)), "exceeds"),
    Case("PUT to /metrics", 405, lambda c, ids: c.put("/metrics", content=b"h2t_runs 1"), "Method Not Allowed"),
    # datasets
    Case("dataset offset not a number", 422, lambda c, ids: c.get("/v1/datasets?offset=abc")),
    Case("dataset name over its length", 422,
         lambda c, ids: c.post("/v1/datasets", json={**TINY_DATASET, "name": "n" * 1000})),
    Case("delete unknown dataset", 404, lambda c, ids: c.delete("/v1/datasets/nope"), "not found"),
    Case("NUL in a dataset id to delete", 422, lambda c, ids: c.delete("/v1/datasets/a%00b"), "cannot store"),
    Case("member name over 255 bytes", 422,
         lambda c, ids: upload(c, zip_with(**{f"train/cat/{'a' * 300}.png": png()})), "over 255 bytes"),
    Case("tar member name over 255 bytes in UTF-8", 422, lambda c, ids: upload(  # 130 characters, 260 bytes
        c, _tar_entries([*good_files().items(), (f"train/cat/{'é' * 130}.png", png())]), "data.tar.gz"),
        "over 255 bytes"),
    Case("class folder over 255 bytes in UTF-8", 422, lambda c, ids: upload(
        c, make_zip({k.replace("cat", "é" * 150): v for k, v in good_files().items()})), "over 255 bytes"),
    Case("the same tar member twice", 422, lambda c, ids: upload(
        c, _tar_entries([*good_files().items(), ("train/dog/1.png", png(seed=9))]), "data.tar.gz"), "appears twice"),
    Case("tar member name not UTF-8", 422, lambda c, ids: upload(
        c, _tar_entries([*good_files().items(), ("train/c\xff\xfe/0.png", png())], "latin-1"), "data.tar.gz"),
        "not UTF-8"),
    Case("zip member name flagged UTF-8 that is not", 422, lambda c, ids: upload(
        c, zip_with(**{"train/cat/ÿÿÿÿ.png": png()}).replace("ÿÿÿÿ".encode(), b"\xff" * 8)), "corrupt or unsupported"),
    Case("encrypted zip member", 422, lambda c, ids: upload(c, _zip_patched(make_zip(good_files()), flags=0x1)),
         "encrypted"),
    Case("zip member that does not decompress", 422, lambda c, ids: upload(
        c, _zip_patched(make_zip(good_files()), method=zipfile.ZIP_BZIP2)), "does not decompress"),
    Case("two archive files", 400, lambda c, ids: c.post("/v1/datasets", files=[
        ("archive", ("a.zip", make_zip(good_files()))), ("archive", ("b.zip", make_zip(good_files())))]),
        "Too many files"),
    Case("multipart without a boundary", 400, lambda c, ids: c.post(
        "/v1/datasets", content=b"archive", headers={"content-type": "multipart/form-data"}), "boundary"),
    # runs
    Case("run body over 64 KiB", 413,
         lambda c, ids: c.post("/v1/runs", json={"dataset_id": ids["dataset"], "pad": "x" * 2**16}), "exceeds"),
    Case("run body not UTF-8", 400, lambda c, ids: c.post(
        "/v1/runs", content=b'{"dataset_id": "\xff"}', headers={"content-type": "application/json"})),
    Case("run body nested 20,000 deep", 400, lambda c, ids: c.post(
        "/v1/runs", content=_nested_json(20_000), headers={"content-type": "application/json"})),
    Case("dataset body nested 20,000 deep", 422, lambda c, ids: c.post(
        "/v1/datasets", content=_nested_json(20_000), headers={"content-type": "application/json"})),
    Case("page size of 31 digits", 422, lambda c, ids: c.get(f"/v1/runs?limit={10**30}")),
    Case("NUL in a run id to cancel", 422, lambda c, ids: c.post("/v1/runs/a%00b/cancel"), "cannot store"),
    Case("NUL in stage1_from", 422, lambda c, ids: c.post(
        "/v1/runs", json={"dataset_id": ids["dataset"], "stage1_from": "a\u0000b"}), "cannot store"),
    # models
    Case("models page size over 500", 422, lambda c, ids: c.get("/v1/models?limit=501")),
    Case("unknown model", 404, lambda c, ids: c.get("/v1/models/nope"), "not found"),
    Case("model of a cancelled run", 409, lambda c, ids: c.get(f"/v1/models/{ids['cancelled_run']}"),
         "no exported model"),
    Case("ONNX of an unknown model", 404, lambda c, ids: c.get("/v1/models/nope/onnx"), "not found"),
    Case("NUL in a model id", 422, lambda c, ids: c.get("/v1/models/a%00b/onnx"), "cannot store"),
    Case("calibration of a cancelled run", 409, lambda c, ids: c.get(f"/v1/models/{ids['cancelled_run']}/calibration"),
         "no exported model"),
    Case("predict with a run that has no model", 409, lambda c, ids: c.post(
        f"/v1/models/{ids['cancelled_run']}/predict", files={"images": ("a.png", png())}), "no exported model"),
    Case("predict declaring a terabyte body", 413, lambda c, ids: c.post(  # refused before any of it is read
        "/v1/models/nope/predict", content=b"{}", headers={"content-type": "application/json",
                                                           "content-length": str(2**40)}), "exceeds"),
    Case("NUL in a model id to predict", 422,
         lambda c, ids: c.post("/v1/models/a%00b/predict", json={"images": ["AAAA"]}), "cannot store"),
    Case("predict with a non-ASCII API key", 401, lambda c, ids: c.post(
        "/v1/models/nope/predict", json={"images": ["AAAA"]}, headers={"X-API-Key": "ключ".encode()}), "invalid"),
]


@pytest.fixture
def existing(client) -> dict[str, str]:
    """A dataset and a cancelled run for the cases that need real ids."""
    dataset = create_tiny_dataset(client)
    run = submit_run(client, dataset)["id"]
    assert client.post(f"/v1/runs/{run}/cancel").json()["status"] == "cancelled"
    return {"dataset": dataset, "cancelled_run": run}


def _state(settings) -> tuple[tuple[int, ...], list[str]]:
    with session_scope(settings.database_url) as session:
        counts = tuple(
            session.scalar(select(func.count()).select_from(t)) for t in (DatasetRow, RunRow, MetricRow, ArtifactRow)
        )
    files = sorted(str(p.relative_to(settings.artifact_dir)) for p in settings.artifact_dir.rglob("*") if p.is_file())
    return counts, files


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_bad_input_gets_a_problem_json_4xx_and_leaves_nothing_behind(client, settings, existing, case):
    before = _state(settings)
    assert before == ((1, 1, 0, 0), [])  # this test's database holds the `existing` dataset and run, nothing else
    response = case.send(client, existing)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == case.status and body["title"] and body["detail"]
    assert case.detail in body["detail"]
    assert _state(settings) == before
    # the service keeps serving
    assert client.get("/healthz").status_code == 200
    assert client.get(f"/v1/datasets/{existing['dataset']}").status_code == 200


def test_a_good_archive_is_accepted_and_deleting_it_removes_its_files(client, settings):
    response = upload(client, make_zip({f"pets/{k}": v for k, v in good_files().items()}), name="pets", image_size="16")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["class_names"] == ["cat", "dog"] and body["train_counts"] == [3, 3] and body["test_counts"] == [3, 3]
    assert body["kind"] == "archive" and body["image_size"] == 16
    folder = settings.artifact_dir / "datasets" / body["id"]
    assert len(list(folder.rglob("*.png"))) == 12
    listed = client.get("/v1/datasets").json()["data"]
    assert [(d["id"], d["kind"]) for d in listed] == [(body["id"], "archive")]
    assert client.delete(f"/v1/datasets/{body['id']}").status_code == 204
    assert not folder.exists() and client.get(f"/v1/datasets/{body['id']}").status_code == 404
    assert client.get("/v1/datasets").json()["data"] == [] and _state(settings) == ((0, 0, 0, 0), [])


def test_a_tar_gz_archive_is_accepted(client, settings):
    response = upload(client, make_tar(good_files()), "data.tar.gz")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["class_names"] == ["cat", "dog"] and body["train_counts"] == [3, 3] and body["test_counts"] == [3, 3]
    assert len(list((settings.artifact_dir / "datasets" / body["id"]).rglob("*.png"))) == 12
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [body["id"]]
