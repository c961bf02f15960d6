"""`tunelab eval TARGET`: task metrics and benchmarks for a model, beside a baseline."""

from __future__ import annotations

from tunelab.commands.base import Command, Stopped

OPTIONS = ("tasks", "baseline", "limit", "output", "data_dir", "split", "dataset", "format", "max_new_tokens",
           "batch_size", "export_manual")
"""The options, each named as the EvalRunConfig key it sets: a shorter way to write `key=value`."""


class Eval(Command):
    name = "eval"
    help = "evaluate a run, adapter or model on task metrics and standard benchmarks, vs. a baseline"
    interrupted = "interrupted; re-run the command (nothing of this evaluation was kept)"

    def arguments(self, parser) -> None:
        parser.add_argument("target", help="run folder, adapter or model folder, Hub id, .gguf file, or `embedded`")
        parser.add_argument("--tasks", help="comma-separated: perplexity, rouge, exact_match, bleu, hellaswag, "
                                            "truthfulqa_mc1, truthfulqa_mc2, or task YAML files (default perplexity,rouge)")
        parser.add_argument("--baseline", help="model to compare with (default for a run folder: its base model; "
                                               "`none` to skip)")
        parser.add_argument("--limit", type=int, help="evaluate at most N rows per task")
        parser.add_argument("--output", help="results folder (default: <run>/eval/<time>/ or evals/<time>/)")
        parser.add_argument("--data-dir", help="local copies of the benchmark data (hellaswag/, truthfulqa/), offline")
        parser.add_argument("--split", help="dataset split for perplexity and generation tasks (default validation)")
        parser.add_argument("--dataset", help="data source for perplexity/generation tasks when TARGET is not a run folder")
        parser.add_argument("--format", "--adapter", dest="format", help="data format of --dataset (samsum, alpaca, ...)")
        parser.add_argument("--max-new-tokens", type=int, help="generation length limit (default 128)")
        parser.add_argument("--batch-size", type=int, help="evaluation batch size (default 8)")
        parser.add_argument("--export-manual", type=int, metavar="N",
                            help="write N held-out prompts with the target's and baseline's outputs to manual.jsonl "
                                 "(the review app imports it)")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="any other key, e.g. fields={...}")

    def run(self, args) -> None:
        from tunelab.config import EvalRunConfig, apply_overrides, build_config

        values = {key: getattr(args, key) for key in OPTIONS if getattr(args, key) is not None}
        if "tasks" in values:
            values["tasks"] = [task for task in values["tasks"].split(",") if task]
        cfg = build_config(apply_overrides({"target": args.target, **values}, list(args.overrides)), "tunelab eval",
                           EvalRunConfig)  # before the stage imports torch: config errors are instant

        from tunelab.stages import evaluate

        result = evaluate.run(cfg)
        print()
        print(evaluate.format_results(result.summary))
        print(f"\nresults: {result.run_dir}")
        if "manual" in result.summary:
            print(f"prompts for human review: {result.summary['manual']}  (tunelab review add-task --import FILE)")


class Compare(Command):
    name = "compare"
    help = "compare run and/or eval folders: config diff, curves, results with 95% intervals, paired tests"

    def arguments(self, parser) -> None:
        parser.add_argument("folders", nargs="+", help="run or eval folders; the first is the reference")
        parser.add_argument("--output", help="folder for compare.html + compare.json (default compare/<time>/)")

    def run(self, args) -> None:
        import time

        from tunelab.stages import compare
        from tunelab.tracking.compare import format_pairs

        result = compare.run(args.folders, args.output or f"compare/{time.strftime('%Y%m%d-%H%M%S')}")
        print(format_pairs(result.summary))
        print(f"\ncompare: {result.run_dir / 'compare.html'}")


class Board(Command):
    name = "board"
    help = "local read-only dashboard of run folders: live curves, samples, reports, compare"
    interrupted = "board stopped"

    def arguments(self, parser) -> None:
        parser.add_argument("--runs", default="runs", help="folder holding the run folders (default runs)")
        parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)")
        parser.add_argument("--port", type=int, default=8765)

    def run(self, args) -> None:
        from tunelab.board.app import serve

        serve(args.runs, args.host, args.port)
        raise Stopped
