"""The dashboard (`/ui/`) and the API documentation (`/docs`, Swagger UI), served from files shipped with the
package: nothing is loaded from the internet, so both work on an offline GPU server.

The pages themselves hold no data and need no key; the dashboard asks the user for an API key and sends it
with every /v1 call, as any client does. A strict Content-Security-Policy keeps every page to this origin.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"  # Swagger UI 5 and ReDoc, as files
DOCS_ASSETS_URL = "/docs-assets"

# The dashboard's pages: scripts, styles and connections to this origin only; images also as blob: (the
# thumbnails of dropped files) and data: (the empty favicon). Swagger UI's page starts it with an inline
# script and it injects inline styles, so the docs page allows those, still from this origin only.
UI_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
DOCS_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
               "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'")


class ContentSecurityPolicy:
    """Adds the policy of its path to every answer under /ui and /docs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        policy = UI_POLICY if path == "/ui" or path.startswith("/ui/") else \
            DOCS_POLICY if path.startswith(("/docs", DOCS_ASSETS_URL)) else None
        if policy is None:
            return await self.app(scope, receive, send)

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"content-security-policy", policy.encode()),
                                      (b"x-content-type-options", b"nosniff"),
                                      (b"referrer-policy", b"no-referrer")]
            await send(message)

        await self.app(scope, receive, with_policy)


router = APIRouter(include_in_schema=False)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui")
def ui_without_slash() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.api_route("/ui/", methods=["GET", "HEAD"])
def dashboard() -> FileResponse:
    # no-cache: a browser revalidates the page, so a new release's page never runs with old scripts
    return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def install_ui_and_docs(app: FastAPI) -> None:
    """Mount the dashboard's assets, and the documentation pages on local copies of their scripts."""
    app.mount("/ui/assets", StaticFiles(directory=UI_DIR / "assets"), name="ui-assets")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.include_router(router)
    title = f"{app.title}: API documentation"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=title, swagger_js_url=f"{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css", swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
            # validatorUrl none: Swagger UI would otherwise ask swagger.io to validate the document
            # persistAuthorization stays off: the key typed into "Authorize" is not kept in the browser
            swagger_ui_parameters={"validatorUrl": None})

