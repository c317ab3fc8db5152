"""The web review's FastAPI application: routes, roles, CSRF, the login rate limit, security headers.

Every route but the login page and the static files needs a signed-in user; every state-changing route (all
POSTs) needs the session's CSRF token and, but for logging in and out, the reviewer or admin role. URLs carry
database keys only, and the request log names method, path (no query string), status and user: case IDs may
be patient identifiers and never reach a URL or a log line. Errors a user can act on (an unknown case, a bad
label, a signed case) come back as a page or, to the page's script, as JSON with the message.

Database work never runs on the event loop: GET routes are plain functions (FastAPI runs them in its thread
pool) and POST routes hand theirs to the pool after reading the form, so one reviewer's sign-off (which renders
the PDF) does not hold up another's page.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.middleware.sessions import SessionMiddleware

from chromobatch import CLASSES
from chromobatch.errors import (
    CaseNotFound,
    CaseNotProcessed,
    CaseSigned,
    CellNotFound,
    ChromobatchError,
    ChromosomeNotFound,
    ReviewChanged,
    ReviewError,
)
from chromobatch.store.db import Database
from chromobatch.store.states import ReviewState
from chromobatch.web import edits, pages
from chromobatch.web.security import (
    CSRF_FIELD,
    CSRF_HEADER,
    EndedSessions,
    LoginLimiter,
    csrf_ok,
    csrf_token,
    new_token,
)
from chromobatch.web.users import UserInfo, authenticate, get_user

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "chromobatch_session"
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; object-src 'none'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@dataclass(frozen=True)
class WebOptions:
    """How the application runs: where reports go, the session key, cookie flags."""

    reports_dir: Path = Path("reports")
    #: Signs the session cookies; empty: a random key per process (sessions end when it restarts).
    secret: str = ""
    #: Secure cookies (only sent over HTTPS): on behind a TLS proxy.
    cookie_secure: bool = False
    session_hours: float = 10.0
    low_confidence_flag: str = "low_confidence"


class _Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(database: Database, options: WebOptions | None = None) -> FastAPI:
    """The application over one database (the serve command's, or a test's)."""
    opts = options or WebOptions()
    secret = opts.secret or secrets.token_urlsafe(48)
    app = FastAPI(title="chromobatch review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=secret, session_cookie=SESSION_COOKIE,
                       max_age=int(opts.session_hours * 3600), same_site="strict", https_only=opts.cookie_secure)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["CLASSES"] = CLASSES
    limiter = LoginLimiter()
    ended = EndedSessions(lifetime=opts.session_hours * 3600 + 60)
    app.state.database, app.state.options, app.state.limiter = database, opts, limiter

    @app.middleware("http")
    async def headers_and_log(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        response: Response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        uid = request.scope.get("session", {}).get("uid")
        log.info("%s %s %d user=%s %.0f ms", request.method, request.url.path, response.status_code,
                 uid if uid is not None else "-", (time.perf_counter() - t0) * 1000)
        return response

    # ----------------------------------------------------------------------------------------------
    # helpers

    def user_of(request: Request) -> UserInfo | None:
        uid, sid = request.session.get("uid"), request.session.get("sid")
        if not isinstance(uid, int) or not isinstance(sid, str) or ended.ended(sid):
            return None
        user = get_user(database, uid)
        if user is None or user.session_key != request.session.get("key"):
            return None
        return user

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    def render(request: Request, name: str, user: UserInfo | None, status: int = 200, **ctx: Any) -> HTMLResponse:
        flash = request.session.pop("flash", None)
        return templates.TemplateResponse(request, name, {"user": user, "csrf": csrf_token(request.session),
                                                          "flash": flash, **ctx}, status_code=status)

    def viewer(request: Request) -> UserInfo:
        user = user_of(request)
        if user is None:
            raise _Denied(401, "sign in first")
        return user

    async def posted(request: Request, *, edit: bool = True) -> tuple[UserInfo, Any]:
        """The signed-in user and the form of a state-changing request: CSRF token checked, role checked."""
        user = await run_in_threadpool(viewer, request)
        form = await request.form()
        presented = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
        if not csrf_ok(request.session, presented if isinstance(presented, str) else None):
            log.warning("%s %s: CSRF token missing or wrong (user %d)", request.method, request.url.path, user.id)
            raise _Denied(403, "the form's security token is missing or out of date: reload the page and try again")
        if edit and not user.can_edit:
            raise _Denied(403, f"your role ({user.role}) may look at cases but not change them")
        return user, form

    def done(request: Request, where: str, payload: dict[str, Any] | None = None,
             message: str | None = None) -> Response:
        if message:
            request.session["flash"] = message
        if wants_json(request):
            return JSONResponse({"ok": True, "message": message, **(payload or {})})
        return RedirectResponse(where, status_code=303)

    @app.exception_handler(_Denied)
    async def denied(request: Request, exc: _Denied) -> Response:
        if exc.status == 401 and request.method == "GET" and not wants_json(request):
            return RedirectResponse("/login", status_code=303)
        return _error(request, exc.status, str(exc))

    @app.exception_handler(ChromobatchError)
    async def library_error(request: Request, exc: ChromobatchError) -> Response:
        status = 400
        if isinstance(exc, CaseNotFound | CellNotFound | ChromosomeNotFound):
            status = 404
        elif isinstance(exc, CaseSigned | ReviewChanged | CaseNotProcessed):
            status = 409
        return _error(request, status, str(exc))

    @app.exception_handler(PermissionError)
    async def forbidden(request: Request, exc: PermissionError) -> Response:
        return _error(request, 403, str(exc))

    def _error(request: Request, status: int, message: str) -> Response:
        if wants_json(request) or request.method != "GET" and request.headers.get(CSRF_HEADER):
            return JSONResponse({"ok": False, "error": message}, status_code=status)
        return render(request, "error.html", user_of(request), status=status, message=message)

    # ----------------------------------------------------------------------------------------------
    # signing in and out

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        return render(request, "login.html", None)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        # stripped as authenticate() strips it: the limiter must count "alice " as "alice"
        name, password = str(form.get("username") or "").strip(), str(form.get("password") or "")
        presented = form.get(CSRF_FIELD)
        if not csrf_ok(request.session, presented if isinstance(presented, str) else None):
            return render(request, "login.html", None, status=403,
                          error="the form's security token is missing or out of date: please try again")
        client = request.client.host if request.client else "?"
        wait = limiter.blocked(name, client)
        if wait > 0:
            log.warning("login refused: too many failed attempts (client %s)", client)
            return render(request, "login.html", None, status=429,
                          error=f"too many failed sign-ins: try again in {int(wait // 60) + 1} minutes")
        user = await run_in_threadpool(authenticate, database, name, password)
        if user is None:
            limiter.failed(name, client)
            log.warning("failed sign-in (client %s)", client)
            return render(request, "login.html", None, status=401, error="wrong user name or password")
        limiter.succeeded(name)
        request.session.clear()  # a new session on sign-in: no fixation
        request.session.update({"uid": user.id, "key": user.session_key, "csrf": new_token(), "sid": new_token()})
        log.info("user %d (%s) signed in", user.id, user.name)
        return RedirectResponse("/", status_code=303)

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        await posted(request, edit=False)
        ended.end(str(request.session.get("sid")))  # a copy of the cookie no longer signs anyone in
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ----------------------------------------------------------------------------------------------
    # pages

    def _list(request: Request, user: UserInfo, search: str) -> Response:
        q = request.query_params
        try:
            page = int(q.get("page", "1"))
        except ValueError:
            page = 1
        data = pages.case_list(database, search=search, state=q.get("state", ""), status=q.get("status", ""),
                               page=page, low_confidence_flag=opts.low_confidence_flag)
        return render(request, "cases.html", user, data=data, search=search, state=q.get("state", ""),
                      status_filter=q.get("status", ""), states=[s.value for s in ReviewState])

    @app.get("/", response_class=HTMLResponse)
    def case_list(request: Request) -> Response:
        return _list(request, viewer(request), "")

    @app.post("/search", response_class=HTMLResponse)
    async def search(request: Request) -> Response:
        """Search by case ID: a POST, so that the case ID never appears in a URL (or a proxy's log)."""
        user, form = await posted(request, edit=False)
        return await run_in_threadpool(_list, request, user, str(form.get("q") or "")[:128])

    @app.get("/cases/{case_pk}", response_class=HTMLResponse)
    def case_page(request: Request, case_pk: int) -> Response:
        user = viewer(request)
        return render(request, "case.html", user, page=pages.case_page(database, case_pk))

    @app.get("/cells/{cell_pk}", response_class=HTMLResponse)
    def cell_page(request: Request, cell_pk: int) -> Response:
        user = viewer(request)
        return render(request, "cell.html", user, page=pages.cell_page(database, cell_pk))

    @app.get("/chromosomes/{chromosome_pk}/image.png")
    def chromosome_image(request: Request, chromosome_pk: int) -> Response:
        viewer(request)
        png, etag = pages.thumbnail(database, chromosome_pk)
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=86400", "ETag": f'"{etag[:32]}"'})

    @app.get("/cells/{cell_pk}/metaphase.png")
    def metaphase(request: Request, cell_pk: int) -> Response:
        viewer(request)
        return Response(pages.metaphase_png(database, cell_pk), media_type="image/png",
                        headers={"Cache-Control": "private, no-store"})

    @app.get("/cases/{case_pk}/report.pdf")
    def report(request: Request, case_pk: int) -> Response:
        viewer(request)
        report_path = pages.report_path(database, case_pk)
        path = Path(report_path) if report_path else None
        if path is None or not path.is_file():
            raise HTTPException(404, "no report rendered for this case yet")
        return FileResponse(path, media_type="application/pdf", filename=f"report-{case_pk}.pdf",
                            headers={"Cache-Control": "private, no-store"})

    # ----------------------------------------------------------------------------------------------
    # changes

    @app.post("/cases/{case_pk}/labels")
    async def set_labels(request: Request, case_pk: int) -> Response:
        """Move one chromosome to a class, or swap two (two chromosome/label/seen triples)."""
        user, form = await posted(request)
        ids, labels, seen = form.getlist("chromosome"), form.getlist("label"), form.getlist("seen")
        if not ids or len(ids) != len(labels) or len(ids) > 2:
            raise ReviewError("give one chromosome and its label (or two, to swap them)")
        wanted: dict[int, str] = {}
        seen_ids: dict[int, int | None] = {}
        for k, (cid, lab) in enumerate(zip(ids, labels, strict=True)):
            try:
                pk = int(str(cid))
            except ValueError:
                raise ReviewError(f"not a chromosome key: {str(cid)[:20]!r}") from None
            if pk in wanted:
                raise ReviewError("a swap names two different chromosomes, not the same one twice")
            wanted[pk] = str(lab)
            if k < len(seen):
                text = str(seen[k]).strip()
                seen_ids[pk] = int(text) if text.isdigit() else None
        result = await run_in_threadpool(edits.set_labels, database, case_pk, user.name, wanted, seen_ids)
        payload = {"labels": [{"chromosome": r.change.number, "label": r.change.label, "label_id": r.label_id,
                               "changed": r.change.changed} for r in result.changes],
                   "conflict": result.message is not None}
        return done(request, f"/cases/{case_pk}", payload, result.message)

    @app.post("/chromosomes/{chromosome_pk}/not-chromosome")
    async def not_chromosome(request: Request, chromosome_pk: int) -> Response:
        user, form = await posted(request)
        value = str(form.get("value", "true")).lower() in ("1", "true", "yes", "on")
        await run_in_threadpool(edits.mark_not_chromosome, database, chromosome_pk, user.name, value)
        return done(request, f"/cases/{await run_in_threadpool(edits.case_of_chromosome, database, chromosome_pk)}")

    @app.post("/cells/{cell_pk}/role")
    async def cell_role(request: Request, cell_pk: int) -> Response:
        user, form = await posted(request)
        await run_in_threadpool(edits.set_cell_role, database, cell_pk, user.name, str(form.get("role") or ""))
        return done(request, f"/cells/{cell_pk}")

    @app.post("/cells/{cell_pk}/karyotype")
    async def cell_karyotype(request: Request, cell_pk: int) -> Response:
        user, form = await posted(request)
        case_pk = await run_in_threadpool(pages.cell_page_case, database, cell_pk)
        await run_in_threadpool(lambda: edits.set_karyotype(database, case_pk, user.name,
                                                            str(form.get("karyotype") or ""), cell_pk=cell_pk))
        return done(request, f"/cells/{cell_pk}")

    @app.post("/cases/{case_pk}/karyotype")
    async def case_karyotype(request: Request, case_pk: int) -> Response:
        user, form = await posted(request)
        value = await run_in_threadpool(edits.set_karyotype, database, case_pk, user.name,
                                        str(form.get("karyotype") or ""))
        return done(request, f"/cases/{case_pk}", {"karyotype": value})

    @app.post("/cases/{case_pk}/signoff")
    async def sign_off(request: Request, case_pk: int) -> Response:
        user, form = await posted(request)
        seen = form.get("seen")
        case_id = await run_in_threadpool(edits.sign_off, database, case_pk, user.name,
                                          str(form.get("karyotype") or ""), str(form.get("comment") or ""),
                                          seen if isinstance(seen, str) else None)
        pdf = await run_in_threadpool(edits.rerender_report, database, case_id, opts.reports_dir, case_pk)
        message = "signed off; the report was rendered again" if pdf else \
            "signed off; the report could not be rendered now and will be tried again"
        return done(request, f"/cases/{case_pk}", {"report": pdf is not None}, message)

    @app.post("/cases/{case_pk}/reopen")
    async def reopen(request: Request, case_pk: int) -> Response:
        user, form = await posted(request)
        case_id = await run_in_threadpool(lambda: edits.reopen(database, case_pk, user.name,
                                                               str(form.get("comment") or ""), admin=user.is_admin))
        await run_in_threadpool(edits.rerender_report, database, case_id, opts.reports_dir, case_pk)
        return done(request, f"/cases/{case_pk}", None, "reopened: the case can be changed again")

    return app
