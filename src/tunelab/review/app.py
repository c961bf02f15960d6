"""`tunelab review serve`: the review web app (FastAPI, pages rendered on the server).

Reviewers sign in with their token (kept in an HttpOnly, SameSite=Strict cookie; only its hash
is stored). Every write — signing in or out, claiming an item, submitting, an admin reissuing a
token — checks the token, comes from a page of the app (Origin) and carries the form's CSRF
token (`csrf.py`). Pages are autoescaped and served with a Content-Security-Policy that allows
only our own script file, so an output that contains `<script>` is shown as text and could not
run even if it slipped through.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from tunelab.errors import TunelabError
from tunelab.review import assign, project
from tunelab.review.csrf import SameOrigin, Tokens, load_secret
from tunelab.review.pages import asset, render
from tunelab.review.store import MAX_BODY, MAX_COMMENT, Assignment, Criterion, Reviewer, Store, hash_token
from tunelab.review.submit import (
    Closed, NotYours, SubmissionError, display_order, form_values, labels_for, submit,
)

COOKIE = "tunelab_review"
LOGIN_COOKIE = "tunelab_login"  # the login form's CSRF nonce
CLOSED = "This item is closed: it has all its reviews, so they no longer change."
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it browsers send `Origin: null` with our own form POSTs, and the
    # Origin check (csrf.SameOrigin) would refuse them. same-origin sends nothing to other sites.
    "Referrer-Policy": "same-origin",
}


class RowId(Convertor):
    """Database ids in paths: 1 to 18 digits, so every id fits a 64-bit integer (SQLite
    raised OverflowError on larger ones); anything else does not match the route: 404."""

    regex = "[0-9]{1,18}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("rowid", RowId())


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
    app.add_middleware(SameOrigin)  # both refuse a request before its body is read
    app.add_middleware(BodyLimit)
    tokens = Tokens(load_secret(store))

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

    def page(request: Request, name: str, reviewer: Reviewer | None, status: int = 200, error: str | None = None,
             session: str | None = None, **ctx) -> HTMLResponse:
        """A page; its forms carry the CSRF token of `session` (default: the request's session cookie)."""
        csrf = tokens.session(session or request.cookies[COOKIE]) if reviewer else ""
        return HTMLResponse(render(name, reviewer=reviewer, error=error, csrf=csrf, **ctx), status_code=status)

    def sign_in(response: Response, token: str) -> Response:
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
        return response

    def login_page(request: Request, status: int = 200, error: str | None = None) -> HTMLResponse:
        """The sign-in form, with its CSRF token bound to a nonce in its own cookie (kept if present)."""
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not nonce or len(nonce) > 64:
            nonce = tokens.new_nonce()
        response = HTMLResponse(render("login.html", reviewer=None, error=error, csrf=tokens.login(nonce)),
                                status_code=status)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict")
        return response

    def denied(request: Request) -> HTMLResponse:
        return login_page(request, 401, "Sign in with your reviewer token first.")

    def stale_form(request: Request, reviewer: Reviewer | None) -> HTMLResponse:
        return page(request, "message.html", reviewer, 403,
                    title="This form expired or was not sent from this app. Reload the page and try again.")

    async def signed_form(request: Request, reviewer: Reviewer) -> dict[str, str] | None:
        """The form's text fields when it carries this session's CSRF token, else None."""
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        return form if tokens.valid(tokens.session(request.cookies[COOKIE]), form.get("csrf")) else None

    def assignment_page(request: Request, reviewer: Reviewer, assignment_id: int, status: int = 200,
                        error: str | None = None, values: dict | None = None) -> HTMLResponse:
        with store.read() as s:
            a = s.get(Assignment, assignment_id)
            if a is None or a.reviewer_id != reviewer.id:
                return page(request, "message.html", reviewer, 404, title="No such item for you")
            if a.done and assign.closed(s, a.item):
                return page(request, "message.html", reviewer, 409, title=CLOSED)
            labels = labels_for(a)
            outputs = [{"id": o.id, "label": labels[o.id], "text": o.text} for o in display_order(a)]
            criteria = s.scalars(select(Criterion).order_by(Criterion.position)).all() if a.item.kind == "rubric" else []
            return page(request, f"{a.item.kind}.html", reviewer, status, error, assignment=a, item=a.item,
                        outputs=outputs, criteria=criteria, values=values or (form_values(s, a) if a.done else {}),
                        max_comment=MAX_COMMENT, editing=a.done, progress=assign.reviewer_progress(s, reviewer.id))

    def next_item(reviewer: Reviewer) -> RedirectResponse:
        aid = assign.claim(store, reviewer.id)
        return RedirectResponse(f"/assignments/{aid}" if aid else "/?notice=done", status_code=303)

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
    def login_form(request: Request) -> HTMLResponse:
        return login_page(request)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        nonce = request.cookies.get(LOGIN_COOKIE)
        if not nonce or not tokens.valid(tokens.login(nonce), form.get("csrf")):
            return login_page(request, 403, "This sign-in form expired or was not sent from this app; sign in here.")
        token = str(form.get("token") or "").strip()
        reviewer = await run_in_threadpool(reviewer_by, token)
        if reviewer is None:
            return login_page(request, 401, "Unknown token. Check it, or ask the project admin for one.")
        response = sign_in(RedirectResponse("/", status_code=303), token)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        reviewer = await run_in_threadpool(reviewer_of, request)
        if reviewer is not None and await signed_form(request, reviewer) is None:
            return stale_form(request, reviewer)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, notice: str | None = None) -> Response:
        reviewer = reviewer_of(request)
        if reviewer is None:
            return RedirectResponse("/login", status_code=303)
        with store.read() as s:
            progress = assign.reviewer_progress(s, reviewer.id)
        notices = {"done": "Nothing left for you to review right now. Thank you!"}
        return page(request, "home.html", reviewer, progress=progress, notice=notices.get(notice))

    @app.post("/next")
    async def claim_next(request: Request) -> Response:
        reviewer = await run_in_threadpool(reviewer_of, request)
        if reviewer is None:
            return denied(request)
        if await signed_form(request, reviewer) is None:
            return stale_form(request, reviewer)
        return await run_in_threadpool(next_item, reviewer)

    @app.get("/reviews", response_class=HTMLResponse)
    def past_reviews(request: Request, notice: str | None = None) -> Response:
        reviewer = reviewer_of(request)
        if reviewer is None:
            return RedirectResponse("/login", status_code=303)
        with store.read() as s:
            reviews = assign.past_reviews(s, reviewer.id)
        notices = {"saved": "Your changes are saved."}
        return page(request, "reviews.html", reviewer, reviews=reviews, notice=notices.get(notice))

    @app.get("/assignments/{assignment_id:rowid}", response_class=HTMLResponse)
    def show(request: Request, assignment_id: int) -> Response:
        reviewer = reviewer_of(request)
        if reviewer is None:
            return RedirectResponse("/login", status_code=303)
        return assignment_page(request, reviewer, assignment_id)

    @app.post("/assignments/{assignment_id:rowid}")
    async def save(request: Request, assignment_id: int) -> Response:
        reviewer = await run_in_threadpool(reviewer_of, request)
        if reviewer is None:
            return denied(request)
        form = await signed_form(request, reviewer)
        if form is None:
            return stale_form(request, reviewer)
        try:
            edited = await run_in_threadpool(submit, store, reviewer.id, assignment_id, form)
        except NotYours:
            return page(request, "message.html", reviewer, 404, title="No such item for you")
        except Closed:
            return page(request, "message.html", reviewer, 409, title=CLOSED)
        except SubmissionError as err:
            return await run_in_threadpool(assignment_page, request, reviewer, assignment_id, 400, f"Not saved: {err}", form)
        if edited:
            return RedirectResponse("/reviews?notice=saved", status_code=303)
        return await run_in_threadpool(next_item, reviewer)

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request) -> Response:
        reviewer = reviewer_of(request)
        if reviewer is None:
            return RedirectResponse("/login", status_code=303)
        if not reviewer.admin:
            return page(request, "message.html", reviewer, 403, title="Only admins see the progress view")
        with store.read() as s:
            return page(request, "admin.html", reviewer, **assign.progress(s))

    @app.post("/admin/token")
    async def reissue(request: Request) -> Response:
        """A new token for a reviewer who lost theirs, shown once; the old one stops working."""
        reviewer = await run_in_threadpool(reviewer_of, request)
        if reviewer is None:
            return denied(request)
        if not reviewer.admin:
            return page(request, "message.html", reviewer, 403, title="Only admins reissue tokens")
        form = await signed_form(request, reviewer)
        if form is None:
            return stale_form(request, reviewer)
        name = form.get("reviewer", "")
        try:
            token = await run_in_threadpool(project.reissue_token, store, name)
        except TunelabError as err:
            return page(request, "message.html", reviewer, 404, title=str(err))
        own = name == reviewer.name  # an admin renewing their own token stays signed in
        response = page(request, "token.html", reviewer, session=token if own else None, who=name, token=token)
        response.headers["Cache-Control"] = "no-store"  # shown once: not kept in the browser's cache
        return sign_in(response, token) if own else response

    return app
