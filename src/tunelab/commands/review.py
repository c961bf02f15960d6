"""`tunelab review init | add-reviewer | reissue-token | add-task | serve | report | export`: the review app.

Only argparse is imported here; each command imports its module when it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.commands.base import Command, Group, Stopped

DB_HELP = "review database: a SQLite file path or URL, or postgresql://user@host/db (default: $TUNELAB_REVIEW_DB or review.db)"


def _store(args, check: bool = True):
    from tunelab.review.store import Store

    store = Store(args.db)
    return store.check() if check else store


def _kinds(kind: str) -> list[str]:
    return {"both": ["rank", "rubric"], "all": ["rank", "rubric", "rate"]}.get(kind, [kind])


def _init(args) -> None:
    from tunelab.review import project

    store = _store(args, check=False)
    project.init(store, project.load_rubric(Path(args.rubric) if args.rubric else None), args.per_item)
    print(f"review project ready in {store.url} ({args.per_item} reviewers per item)")
    print("next: tunelab review add-reviewer NAME [--admin], then tunelab review add-task ...")


def _add_reviewer(args) -> None:
    from tunelab.review import project

    token = project.add_reviewer(_store(args), args.name, admin=args.admin)
    print(f"reviewer {args.name!r}{' (admin)' if args.admin else ''} created. Token (shown once, keep it secret):")
    print(token)


def _reissue_token(args) -> None:
    from tunelab.review import project

    token = project.reissue_token(_store(args), args.name)
    print(f"new token for reviewer {args.name!r} (shown once; the old one no longer works):")
    print(token)


def _add_task(args) -> None:
    from tunelab.errors import TunelabError

    store = _store(args)
    if bool(args.prompts) == bool(args.imports):
        raise TunelabError("add-task: give either a PROMPTS file (with --model) or --import FILE..., not both or neither")
    if args.imports and args.model:
        raise TunelabError("add-task --import: the outputs are already in the file; drop --model")
    if (args.select is None) != (args.budget is None):
        raise TunelabError("add-task: --select and --budget go together: --select uncertain --budget N")
    from tunelab.review import project

    kinds = _kinds(args.kind)
    if args.imports:
        rows = project.import_rows([Path(p) for p in args.imports])
    else:
        from tunelab.review.generate import generated_rows

        rows = generated_rows(Path(args.prompts), args.model or [], args.k, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, seed=args.seed, backend=args.backend)
    if args.select:
        from tunelab.review.select import select_rows

        present = project.present_ids(store, kinds)
        candidates = [row for row in rows if row[0] not in present]
        rows, values = select_rows(candidates, args.reward_model or [], args.budget, args.select, args.seed)
        print(f"{len(rows)} of {len(candidates)} new candidates chosen ({args.select}"
              + (f"; uncertainty {values[0]:.3f} down to {values[-1]:.3f}" if rows and values[0] is not None else "")
              + ")")
    added, skipped = project.add_items(store, rows, kinds, args.per_item)
    print(f"added {added} items" + (f" ({skipped} already present, skipped)" if skipped else ""))


def _serve(args) -> None:
    import uvicorn

    from tunelab.review.app import create_app

    app = create_app(_store(args))
    print(f"review app on http://{args.host}:{args.port}/  (admin view: /admin; Ctrl-C stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    raise Stopped


def _report(args) -> None:
    from tunelab.review.report import format_summary, write_report

    path, summary = write_report(_store(args), Path(args.output), args.reward_model)
    print(format_summary(summary))
    print(f"\nreport: {path}")


def _export(args) -> None:
    from tunelab.review.export import export

    n, skipped = export(_store(args), Path(args.to), args.pairs, args.min_reviewers, args.shape, args.threshold)
    what = {"pairs": "preference pairs", "rankings": "ranked items", "ratings": "rated answers"}[args.shape]
    why = {"pairs": "an empty answer, or both answers the same text", "rankings": "",
           "ratings": "an even split of thumbs, or an empty answer"}[args.shape]
    print(f"wrote {n} {what} to {args.to}" + (f" ({skipped} skipped: {why})" if skipped else ""))


class _Sub(Command):
    """A review subcommand: every one takes --db."""

    def __init__(self, name: str, help_text: str, func, arguments=None, interrupted: str = Command.interrupted):
        self.name, self.help, self._func, self._arguments = name, help_text, func, arguments
        self.interrupted = interrupted

    def arguments(self, parser) -> None:
        parser.add_argument("--db", default=os.environ.get("TUNELAB_REVIEW_DB", "review.db"), help=DB_HELP)
        if self._arguments:
            self._arguments(parser)

    def run(self, args) -> None:
        self._func(args)


def _init_arguments(p) -> None:
    p.add_argument("--rubric", help="rubric YAML: criteria with name, description, weight, scale [lo, hi], levels "
                                    "(default: accuracy x2, coherence, safety on 1-5)")
    p.add_argument("--per-item", type=int, default=3, help="distinct reviewers per item (default 3)")


def _reviewer_arguments(p) -> None:
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may see the progress view (/admin)")


def _task_arguments(p) -> None:
    p.add_argument("prompts", nargs="?", help='JSONL of {"prompt": ...} or {"messages": [...]} (optional "id", "reference")')
    p.add_argument("--model", action="append", help="model or run that answers the prompts (repeat for several)")
    p.add_argument("-k", type=int, default=1, help="outputs per prompt per model (sampled when > 1; default 1, greedy)")
    p.add_argument("--import", dest="imports", nargs="+", metavar="FILE",
                   help="JSONL with outputs present (`tunelab eval --export-manual` files)")
    p.add_argument("--kind", choices=("rank", "rubric", "rate", "both", "all"), default="rank",
                   help="task kind: rank, rubric, rate (thumbs up/down), both (rank + rubric) or all (default rank)")
    p.add_argument("--per-item", type=int, help="distinct reviewers per item (default: the project's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when -k > 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=("auto", "paged", "static", "vllm"),
                   help="inference engine backend, as for `tunelab generate` (default auto)")
    p.add_argument("--select", choices=("uncertain", "random"),
                   help="add only --budget of the new items: those the reward model is least sure about (several "
                        "--reward-model: where they disagree most), or a random draw")
    p.add_argument("--budget", type=int, metavar="N", help="how many items --select adds")
    p.add_argument("--reward-model", action="append", metavar="RUN",
                   help="`tunelab reward` run that scores the candidates for --select uncertain (repeat for a committee)")


def _serve_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; 0.0.0.0 for a network)")
    p.add_argument("--port", type=int, default=8000)


def _report_arguments(p) -> None:
    p.add_argument("--output", default="review-report", help="folder for report.html, summary.json, plots/")
    p.add_argument("--reward-model", metavar="RUN",
                   help="also check this `tunelab reward` run against the human rankings it was not trained on")


def _export_arguments(p) -> None:
    p.add_argument("--to", required=True, help="output JSONL, e.g. preferences.jsonl")
    p.add_argument("--as", dest="shape", choices=("pairs", "rankings", "ratings"), default="pairs",
                   help="pairs (chosen/rejected, for reward and dpo), rankings (every reviewer's full ranking, for "
                        "preference.loss=listwise) or ratings (desirable or not, for kto; default pairs)")
    p.add_argument("--threshold", type=float, default=60.0,
                   help="--as ratings: a rubric-scored output is desirable at this weighted score (0-100) or above "
                        "(default 60)")
    p.add_argument("--pairs", choices=("all", "best-worst"), default="all", help="all ordered pairs, or best vs worst")
    p.add_argument("--min-reviewers", type=int, default=1, help="skip items with fewer finished reviews")


class Review(Group):
    name = "review"
    help = "human review: rank, rubric-score and rate model outputs in a browser"
    subcommands = (
        _Sub("init", "create a review project (tables, rubric, reviewers per item)", _init, _init_arguments),
        _Sub("add-reviewer", "create a reviewer and print their login token", _add_reviewer, _reviewer_arguments),
        _Sub("reissue-token", "give a reviewer a new login token (the old one stops working)", _reissue_token,
             lambda p: p.add_argument("name")),
        _Sub("add-task", "add items: generate outputs for a prompts file, or --import outputs", _add_task,
             _task_arguments),
        _Sub("serve", "run the review web app", _serve, _serve_arguments, interrupted="review app stopped"),
        _Sub("report", "per-model and per-item scores, agreement, outlying reviewers: HTML report with plots",
             _report, _report_arguments),
        _Sub("export", "write training data from the reviews: preference pairs, full rankings or ratings", _export,
             _export_arguments),
    )
