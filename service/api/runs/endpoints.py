from __future__ import annotations

import logging
import shutil
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import PlainTextResponse, StreamingResponse

from service.api.auth import ApiKey
from service.api.deps import PageDep, SessionDep, SettingsDep
from service.api.errors import problems
from service.api.runs import events, service
from service.api.runs.schemas import MAX_TAGS, MetricsPublic, RunCreate, RunPublic, RunsPublic, RunUpdate
from service.store import runs
from service.store.errors import AppError, ServiceUnavailable
from service.store.orm import RunStatus
from service.store.queue import enqueue_training

router = APIRouter(prefix="/v1/runs", tags=["runs"], responses=problems(401, 422, 503))
log = logging.getLogger("h2t.api")


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=RunPublic, responses=problems(400, 404, 409, 413),
             summary="Queue a two-stage training run")
def create_run(body: RunCreate, request: Request, response: Response, session: SessionDep, settings: SettingsDep,
               _: ApiKey) -> RunPublic:
    row = service.create(session, body, settings)
    session.commit()  # the worker must find the row: enqueue only after the commit
    try:
        enqueue_training(request.app.state.celery, settings, row.id, body.devices)
    except Exception as exc:  # the broker is down: say so, and leave no run that will never start
        log.exception("could not enqueue run %s", row.id)
        runs.fail_unsent(session, row.id, f"broker unreachable: {exc}")
        session.commit()
        raise ServiceUnavailable(f"the task broker is unreachable; run {row.id} was not started") from exc
    log.info("run queued", extra={"run_id": row.id})
    response.headers["Location"] = f"/v1/runs/{row.id}"
    return service.public(session, row)


LIST_PARAMETERS = {"limit", "offset", "status", "dataset_id", "method", "stage1_from", "name", "search", "tag",
                   "sort"}
SORT_PATTERN = "^-?(" + "|".join(service.SORT_KEYS) + ")$"


@router.get("", response_model=RunsPublic, responses=problems(400),
            summary="Runs, newest first: filter by status, dataset, method, stage 1, name and tags; sort")
def list_runs(
    request: Request, session: SessionDep, _: ApiKey, page: PageDep,
    status: RunStatus | None = None,
    dataset_id: Annotated[str | None, Query(max_length=36)] = None,
    method: Annotated[Literal["h2t", "crt"] | None, Query(description="stage 2's method")] = None,
    stage1_from: Annotated[str | None, Query(max_length=36, description="runs that reused this run's stage 1")] = None,
    name: Annotated[str | None, Query(max_length=200, description="exactly this name")] = None,
    search: Annotated[str | None, Query(max_length=200, description="names containing this text, in any case")] = None,
    tag: Annotated[list[str] | None, Query(max_length=MAX_TAGS,
                                           description="repeat for several: runs carrying every one")] = None,
    sort: Annotated[str, Query(pattern=SORT_PATTERN, description=f"one of {', '.join(service.SORT_KEYS)}; "
                               "a leading - for descending")] = "-created_at",
) -> RunsPublic:
    unknown = sorted(set(request.query_params) - LIST_PARAMETERS)
    if unknown:  # a misspelt filter must not silently list everything
        raise AppError(f"unknown query parameter(s): {', '.join(unknown)}; runs filter by "
                       f"{', '.join(sorted(LIST_PARAMETERS - {'limit', 'offset', 'sort'}))} and sort by sort")
    where = service.RunFilter(status, dataset_id, method, stage1_from, name, tuple(tag or ()), search)
    rows, total = service.list_runs(session, page.limit, page.offset, where, sort)
    return RunsPublic(data=service.to_public_many(session, rows), count=total)


@router.patch("/{run_id}", response_model=RunPublic, responses=problems(400, 404, 413),
              summary="Rename or retag a run")
def update_run(run_id: str, body: RunUpdate, session: SessionDep, _: ApiKey) -> RunPublic:
    return service.public(session, service.update(session, run_id, body))


@router.get("/{run_id}", response_model=RunPublic, responses=problems(404))
def get_run(run_id: str, session: SessionDep, _: ApiKey) -> RunPublic:
    return service.public(session, runs.get(session, run_id))


@router.get("/{run_id}/metrics", response_model=MetricsPublic, responses=problems(404),
            summary="One row per stage and epoch")
def get_metrics(run_id: str, session: SessionDep, _: ApiKey) -> MetricsPublic:
    rows = service.metrics(session, run_id)
    return MetricsPublic(data=[service.metric_public(r) for r in rows], count=len(rows))


@router.get("/{run_id}/events", responses={**problems(404), 200: {"content": {"text/event-stream": {}}}},
            response_class=StreamingResponse,
            summary="Live events (server-sent): status changes, progress inside an epoch, each epoch's metrics")
def run_events(run_id: str, session: SessionDep, settings: SettingsDep, _: ApiKey) -> StreamingResponse:
    runs.get(session, run_id)  # 404 before the stream starts
    return StreamingResponse(events.run_events(settings.database_url, run_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{run_id}/logs", response_class=PlainTextResponse,
            responses={**problems(404), 200: {"content": {"text/plain": {}}}},
            summary="The run's log lines (every worker that trained it); follow=true streams them until it ends")
def run_logs(run_id: str, session: SessionDep, settings: SettingsDep, _: ApiKey,
             follow: bool = Query(False, description="keep the answer open and send new lines as they are "
                                  "written, until the run has finished")) -> Response:
    runs.get(session, run_id)
    path = settings.artifacts.run(run_id).log
    if follow:
        return StreamingResponse(events.follow_log(settings.database_url, run_id, path),
                                 media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, _ = events.new_log_text(path, 0)
    return PlainTextResponse(text.decode("utf-8", errors="replace"))


@router.delete("/{run_id}", status_code=status.HTTP_204_NO_CONTENT, responses=problems(404, 409),
               summary="Delete a finished run with its metrics, model and files (409 while others reuse its stage 1)")
def delete_run(run_id: str, request: Request, session: SessionDep, settings: SettingsDep, _: ApiKey,
               force: bool = Query(False, description="also delete the runs that reuse its stage 1")) -> Response:
    deleted = runs.delete(session, [run_id], force)
    session.commit()  # the files go only once the rows are gone
    for deleted_id in deleted:
        request.app.state.models.forget(deleted_id)
        shutil.rmtree(settings.artifacts.run(deleted_id).root, ignore_errors=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{run_id}/cancel", response_model=RunPublic, status_code=status.HTTP_202_ACCEPTED,
             responses=problems(404, 409),
             summary="Cancel: a queued run at once, a running one between two steps (within seconds)")
def cancel_run(run_id: str, session: SessionDep, _: ApiKey, force: bool = Query(
        False, description="end a running run as cancelled now, without waiting for its worker to stop")) -> RunPublic:
    row = runs.cancel(session, run_id, force)
    return service.public(session, row)
