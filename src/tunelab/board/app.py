"""`tunelab board`: a local, read-only dashboard of the run folders under one folder (FastAPI,
pages rendered on the server, like the review app).

The runs list, a run page whose curves follow metrics.jsonl while the run trains (board.js polls
/api/metrics/<run>), its samples, checkpoints and reports, and the compare view of the selected
runs (`tracking/compare.py`). It binds 127.0.0.1 by default and only reads: every path a request
names must resolve inside the folder. Pages allow only our own script; the reports and the
compare view it serves (self-contained HTML with inline CSS) run no script at all.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from tunelab.board.runs import find_runs, is_run, resolve, run_page, run_row
from tunelab.errors import TunelabError
from tunelab.evals.metrics import current_names
from tunelab.templates import asset, render
from tunelab.tracking.metrics import read_jsonl
from tunelab.tracking.status import read_status

POLL_MS = 2000
"""How often a run page asks for new metrics.jsonl lines while the run is running."""
_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
             "connect-src 'self'; frame-ancestors 'none'; form-action 'self'")
_DOCUMENT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; sandbox"
"""For the self-contained reports: inline CSS and images, no script, nothing fetched."""
_FILES = {".html": "text/html", ".json": "application/json", ".jsonl": "text/plain", ".yaml": "text/plain",
          ".png": "image/png", ".txt": "text/plain"}
_STATIC = {"style.css": "text/css", "board/board.js": "text/javascript"}


def create_app(runs_dir: str | Path) -> FastAPI:
    root = Path(runs_dir).resolve()
    app = FastAPI(title="tunelab board", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", _PAGE_CSP)
        response.headers.update({"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})
        return response

    def page(name: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(render(f"board/{name}", root=str(root), **ctx), status_code=status)

    def not_found(what: str) -> HTMLResponse:
        return page("message.html", 404, title=f"No {what} here", detail=f"nothing of that name under {root}")

    def run_folder(name: str) -> Path | None:
        path = resolve(root, name)
        return path if path is not None and is_run(path) else None

    @app.get("/static/{name:path}")
    def static(name: str) -> Response:
        if name not in _STATIC:
            return Response(status_code=404)
        return Response(asset(name), media_type=_STATIC[name], headers={"Cache-Control": "max-age=60"})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/", response_class=HTMLResponse)
    def runs() -> HTMLResponse:
        return page("runs.html", runs=[run_row(root, path) for path in find_runs(root)])

    @app.get("/runs/{name:path}", response_class=HTMLResponse)
    def run(name: str) -> HTMLResponse:
        path = run_folder(name)
        if path is None:
            return not_found("run")
        from tunelab.tracking.compare import CURVES

        return page("run.html", run=run_page(root, path), curves=CURVES, poll_ms=POLL_MS)

    @app.get("/api/metrics/{name:path}")
    def metrics(name: str, since: int = Query(0, ge=0)) -> JSONResponse:
        """metrics.jsonl from line `since` on, the count to ask from next time, and the run's state."""
        path = run_folder(name)
        if path is None:
            return JSONResponse({"error": f"no run {name}"}, status_code=404)
        records = current_names(read_jsonl(path / "metrics.jsonl"))  # old folders: eval_rouge1 → eval_rouge_1
        status = read_status(path)
        return JSONResponse({"records": records[since:], "next": len(records), "state": status["state"],
                             "step": status.get("step")}, headers={"Cache-Control": "no-store"})

    @app.get("/files/{name:path}")
    def files(name: str) -> Response:
        """A report, plot or result file of a run folder, as it is on disk."""
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.is_file() or path.suffix not in _FILES:
            return Response(status_code=404)
        headers = {"Content-Security-Policy": _DOCUMENT_CSP} if path.suffix == ".html" else {}
        return FileResponse(path, media_type=_FILES[path.suffix], headers=headers)

    @app.get("/compare", response_class=HTMLResponse)
    def compare(run: list[str] = Query(default=[])) -> HTMLResponse:
        """The compare view of the selected run (or eval) folders, built fresh, written nowhere."""
        from tunelab.tracking.compare import build, render_html

        paths = [resolve(root, name) for name in run]
        if len(paths) < 2 or None in paths:
            return page("message.html", 400, title="Select at least two runs to compare",
                        detail="tick two or more runs in the list, then press compare")
        try:
            result, figures = build(paths)
        except TunelabError as err:
            return page("message.html", 400, title="Cannot compare these folders", detail=str(err))
        return HTMLResponse(render_html(result, figures, back="/"),
                            headers={"Content-Security-Policy": _DOCUMENT_CSP.replace("; sandbox", "")})

    return app


def serve(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the board until Ctrl-C (`tunelab board [--runs DIR] [--host H] [--port P]`)."""
    import uvicorn

    if not Path(runs_dir).is_dir():
        raise TunelabError(f"--runs {runs_dir}: no such folder (run folders are written under runs/ by default)")
    print(f"tunelab board on http://{host}:{port}/  ({runs_dir}; read-only; Ctrl-C stops)")
    uvicorn.run(create_app(runs_dir), host=host, port=port, log_level="warning")
