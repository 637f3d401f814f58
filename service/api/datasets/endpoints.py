from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Query, Request, Response, status
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from service.api.auth import ApiKey
from service.api.bodies import json_or_multipart_body, media_type, parse_form_fields, parse_json
from service.api.datasets import service
from service.api.datasets.schemas import (
    DATASET_CREATE,
    ArchiveDatasetForm,
    BuiltinDatasetCreate,
    DatasetPublic,
    DatasetsPublic,
)
from service.api.deps import PageDep, SessionDep, SettingsDep
from service.api.errors import problems
from service.store import datasets
from service.store.errors import InvalidInput, PayloadTooLarge, ServiceUnavailable, UnsupportedMediaType
from service.store.orm import NAME_LENGTH
from service.store.queue import enqueue_scan
from service.store.settings import Settings

log = logging.getLogger("h2t.api")
router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=problems(401, 422, 503))

_ARCHIVE_FIELD = "archive"
_CREATE_BODY = json_or_multipart_body(DATASET_CREATE, ArchiveDatasetForm, {_ARCHIVE_FIELD: {
    "type": "string", "format": "binary",
    "description": "zip or tar.gz with train/<class>/<image> and test/<class>/<image>"}})


async def _spool_upload(upload: UploadFile, dest: Path, max_bytes: int) -> None:
    written = 0
    with open(dest, "wb") as out:
        while chunk := await upload.read(1 << 20):
            written += len(chunk)
            if written > max_bytes:
                raise PayloadTooLarge(f"the archive is larger than {max_bytes} bytes")
            out.write(chunk)


def _start_scan(request: Request, session: Session, settings: Settings, dataset_id: str) -> None:
    """Sends the scan after the commit (the worker must find the row); a broker that is down leaves no
    dataset scanning forever."""
    try:
        enqueue_scan(request.app.state.celery, settings, dataset_id)
    except Exception as exc:
        log.exception("could not send the scan of dataset %s", dataset_id)
        datasets.scan_failed(session, dataset_id, f"broker unreachable: {exc}")
        session.commit()
        raise ServiceUnavailable(f"the task broker is unreachable; dataset {dataset_id} was not scanned") from exc


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetPublic, openapi_extra=_CREATE_BODY,
             responses={**problems(400, 413, 415), 202: {
                 "model": DatasetPublic, "description": "a dataset by reference, scanning: see GET /v1/datasets/{id}"}},
             summary="Create a dataset: builtin (201), by reference under the data root (202, scanned by a "
                     "worker), or from an uploaded ImageFolder archive (201)")
async def create_dataset(request: Request, response: Response, session: SessionDep, settings: SettingsDep,
                         _: ApiKey) -> DatasetPublic:
    content_type = media_type(request)
    if content_type == "application/json":
        body = await parse_json(request, DATASET_CREATE)
        if isinstance(body, BuiltinDatasetCreate):
            row = service.create_builtin(session, settings, body)
        else:
            # resolving the paths touches the data root's file system: off the event loop
            row = await asyncio.to_thread(service.create_reference, session, settings, body)
            session.commit()
            await asyncio.to_thread(_start_scan, request, session, settings, row.id)
            response.status_code = status.HTTP_202_ACCEPTED
    elif content_type == "multipart/form-data":
        async with request.form(max_files=1, max_fields=10) as form:  # closed on the way out: its spooled file
            archive = form.get(_ARCHIVE_FIELD)
            if not isinstance(archive, UploadFile):
                raise InvalidInput(f"multipart body needs a file field named {_ARCHIVE_FIELD!r}")
            fields = parse_form_fields(form, ArchiveDatasetForm, (_ARCHIVE_FIELD,))
            default_name = Path(archive.filename or "upload").name.split(".")[0][:NAME_LENGTH]
            settings.artifacts.uploads.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=settings.artifacts.uploads) as tmp:
                upload_path = Path(tmp) / "upload"
                await _spool_upload(archive, upload_path, settings.max_upload_bytes)
                # checking and decoding every member is seconds of CPU: off the event loop, so other requests go on
                row = await asyncio.to_thread(service.create_from_archive, session, settings, upload_path, fields,
                                              default_name)
        try:
            session.commit()
        except BaseException:
            shutil.rmtree(settings.artifacts.dataset(row.id), ignore_errors=True)
            raise
    else:
        raise UnsupportedMediaType(
            f"send application/json (a builtin dataset) or multipart/form-data (an archive), not {content_type!r}")
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return service.to_public(row)


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep, _: ApiKey, page: PageDep) -> DatasetsPublic:
    rows, total = service.list_datasets(session, page.limit, page.offset)
    return DatasetsPublic(data=[service.to_public(r) for r in rows], count=total)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses=problems(404))
def get_dataset(dataset_id: str, session: SessionDep, _: ApiKey) -> DatasetPublic:
    return service.to_public(service.get(session, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(404, 409),
               summary="Delete a dataset (409 while runs use it; force=true deletes them too)")
def delete_dataset(dataset_id: str, session: SessionDep, settings: SettingsDep, _: ApiKey,
                   force: bool = Query(False, description="also delete the runs on it (none may be queued or "
                                       "training), with their models and files")) -> Response:
    folders = service.delete(session, settings, dataset_id, force)
    session.commit()  # the files go only once the rows are gone
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
