"""`tunelab review serve`: the review web app (FastAPI, pages rendered on the server).

Reviewers sign in with their token (kept in an HttpOnly, SameSite=Strict cookie; only its hash
is stored). Every write — claiming an item, submitting — checks the token. Pages are
autoescaped and served with a Content-Security-Policy that allows only our own script file,
so an output that contains `<script>` is shown as text and could not run even if it slipped
through.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from tunelab.review import assign
from tunelab.review.pages import asset, render
from tunelab.review.store import MAX_BODY, MAX_COMMENT, Assignment, Criterion, Reviewer, Store, hash_token
from tunelab.review.submit import NotYours, SubmissionError, display_order, labels_for, submit

COOKIE = "tunelab_review"
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class BodyLimit:
    """Refuse request bodies over MAX_BODY bytes (and bodies of unknown size) before they are read."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope["headers"]).get(b"content-length")
            status = 411 if length is None else 413 if not length.isdigit() or int(length) > MAX_BODY else None
            if status:
                await Response(f"request body must be sent with a size of at most {MAX_BODY} bytes\n",
                               status_code=status, media_type="text/plain")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(store: Store) -> FastAPI:
    app = FastAPI(title="tunelab review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(_HEADERS)
        return response

    def reviewer_by(token: str | None) -> Reviewer | None:
        if not token or len(token) > 200:
            return None
        with store.read() as s:
            return s.scalar(select(Reviewer).where(Reviewer.token_hash == hash_token(token)))

    def reviewer_of(request: Request) -> Reviewer | None:
        return reviewer_by(request.cookies.get(COOKIE))

    def page(name: str, reviewer: Reviewer | None, status: int = 200, error: str | None = None, **ctx) -> HTMLResponse:
        return HTMLResponse(render(name, reviewer=reviewer, error=error, **ctx), status_code=status)

    def denied() -> HTMLResponse:
        return page("login.html", None, 401, "Sign in with your reviewer token first.")

    def assignment_page(reviewer: Reviewer, assignment_id: int, status: int = 200, error: str | None = None,
                        values: dict | None = None) -> HTMLResponse:
        with store.read() as s:
            a = s.get(Assignment, assignment_id)
            if a is None or a.reviewer_id != reviewer.id:
                return page("message.html", reviewer, 404, title="No such item for you")
            if a.done:
                return page("message.html", reviewer, 409, title="You already submitted this item. Thank you!")
            labels = labels_for(a)
            outputs = [{"id": o.id, "label": labels[o.id], "text": o.text} for o in display_order(a)]
            criteria = s.scalars(select(Criterion).order_by(Criterion.position)).all() if a.item.kind == "rubric" else []
            return page(f"{a.item.kind}.html", reviewer, status, error, assignment=a, item=a.item, outputs=outputs,
                        criteria=criteria, values=values or {}, max_comment=MAX_COMMENT)

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        types = {"style.css": "text/css", "review.js": "text/javascript"}
        if name not in types:
            return Response(status_code=404)
        return Response(asset(name), media_type=types[name], headers={"Cache-Control": "max-age=300"})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/login", response_class=HTMLResponse)
    def login_form() -> HTMLResponse:
        return page("login.html", None)

    @app.post("/login")
    async def login(request: Request) -> Response:
        token = str((await request.form()).get("token") or "").strip()
        reviewer = await run_in_threadpool(reviewer_by, token)
        if reviewer is None:
            return page("login.html", None, 401, "Unknown token. Check it, or ask the project admin for one.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
        return response

    @app.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, notice: str | None = None) -> Response:
        reviewer = reviewer_of(request)
        if reviewer is None:
            return RedirectResponse("/login", status_code=303)
        with store.read() as s:
            mine = s.scalars(select(Assignment.done).where(Assignment.reviewer_id == reviewer.id)).all()
        notices = {"done": "Nothing left for you to review right now. Thank you!"}
        return page("home.html", reviewer, done=sum(mine), pending=len(mine) - sum(mine), notice=notices.get(notice))

    @app.post("/next")
    def next_item(request: Request) -> Response:
        reviewer = reviewer_of(request)
        if reviewer is None:
            return denied()
        aid = assign.claim(store, reviewer.id)
        return RedirectResponse(f"/assignments/{aid}" if aid else "/?notice=done", status_code=303)

    @app.get("/assignments/{assignment_id}", response_class=HTMLResponse)
    def show(request: Request, assignment_id: int) -> Response:
        reviewer = reviewer_of(request)
        if reviewer is None:
            return RedirectResponse("/login", status_code=303)
        return assignment_page(reviewer, assignment_id)

    @app.post("/assignments/{assignment_id}")
    async def save(request: Request, assignment_id: int) -> Response:
        reviewer = await run_in_threadpool(reviewer_of, request)
        if reviewer is None:
            return denied()
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        try:
            await run_in_threadpool(submit, store, reviewer.id, assignment_id, form)
        except NotYours:
            return page("message.html", reviewer, 404, title="No such item for you")
        except SubmissionError as err:
            return await run_in_threadpool(assignment_page, reviewer, assignment_id, 400, f"Not saved: {err}", form)
        aid = await run_in_threadpool(assign.claim, store, reviewer.id)
        return RedirectResponse(f"/assignments/{aid}" if aid else "/?notice=done", status_code=303)

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request) -> Response:
        reviewer = reviewer_of(request)
        if reviewer is None:
            return RedirectResponse("/login", status_code=303)
        if not reviewer.admin:
            return page("message.html", reviewer, 403, title="Only admins see the progress view")
        with store.read() as s:
            return page("admin.html", reviewer, **assign.progress(s))

    return app
