"""`tunelab <command>`: one table of commands, each a thin wrapper over a stage.

Heavy libraries are imported inside the commands, so `--help` and config errors are instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tunelab.errors import TunelabError


def _recipe_config(args):
    """The validated config of a training command: recipe + overrides, `--resume` as train.resume."""
    from tunelab.config import load_config

    return load_config(args.recipe, list(args.overrides) + (["train.resume=true"] if args.resume else []))


def _train(args) -> None:
    from tunelab import distributed
    from tunelab.stages import sft

    cfg = _recipe_config(args)  # config errors show once, before N processes start
    if args.nproc > 1 and distributed.world_size() == 1:
        distributed.check(cfg, args.nproc)
        distributed.relaunch(args.nproc, args.argv)
    result = sft.run(cfg)
    if distributed.is_main():
        _print_result(result)


def _quickstart(args) -> None:
    from tunelab.stages import quickstart

    result = quickstart.run(list(args.overrides))
    _print_result(result)


def _eval(args) -> None:
    from pathlib import Path

    from tunelab.stages import evaluate

    baseline = None if args.baseline in (None, "auto") else args.baseline
    results = evaluate.run(
        args.target, [t for t in args.tasks.split(",") if t], baseline=baseline, limit=args.limit,
        output=Path(args.output) if args.output else None, data_dir=Path(args.data_dir) if args.data_dir else None,
        split=args.split, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        dataset=args.dataset, adapter=args.adapter, export_manual=args.export_manual,
    )
    print()
    print(evaluate.format_results(results))
    print(f"\nresults: {results['output']}")
    if "manual" in results:
        print(f"prompts for human review: {results['manual']}  (tunelab review add-task --import FILE)")


def _kfold(args) -> None:
    from tunelab.config import load_config
    from tunelab.stages import kfold
    from tunelab.tracking.report import format_kfold

    cfg = load_config(args.recipe, list(args.overrides))
    result = kfold.run(cfg, args.folds, args.metric)
    print()
    print(format_kfold(result))
    print(f"\nk-fold folder: {result['dir']}  (report: {result['dir']}/kfold.html)")


def _preference(args) -> None:
    """`tunelab reward|dpo|rl RECIPE`: the preference stages share SFT's config and run folder."""
    result = importlib.import_module(f"tunelab.stages.{args.command}").run(_recipe_config(args))
    _print_result(result)


def _merge(args) -> None:
    from pathlib import Path

    from tunelab.models.build import merge_and_save

    out = merge_and_save(args.run, Path(args.output))
    print(f"merged model written to {out}")


def _print_result(result) -> None:
    from tunelab.tracking.report import format_before_after

    ev = result.summary["eval"]
    print()
    print(format_before_after(ev.get("before") or {}, ev.get("after") or {}))
    for warning in result.summary.get("warnings", []):
        print(f"warning: {warning}")
    print(f"\nrun folder: {result.run_dir}  (report: {result.run_dir / 'report.html'})")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.max_steps=20")


COMMANDS = {
    "train": (_train, "fine-tune a model from a recipe (SFT: full, LoRA, DoRA, QLoRA)"),
    "quickstart": (_quickstart, "offline demo: LoRA on the embedded SmolLM2, before/after table"),
    "eval": (_eval, "evaluate a run, adapter or model on task metrics and standard benchmarks, vs. a baseline"),
    "kfold": (_kfold, "k-fold cross-validation of a recipe (and of its sweep grid), one aggregated report"),
    "reward": (_preference, "train a reward model (sequence classifier, LoRA/QLoRA) on preference pairs"),
    "dpo": (_preference, "direct preference optimisation (LoRA/QLoRA) on preference pairs"),
    "rl": (_preference, "online RL (trl RLOO) against a trained reward model, KL-controlled"),
    "merge": (_merge, "fold a LoRA run's adapter into its base and save a full model folder"),
}


# Command groups that live beside their building block; each module's `register(subparsers)`
# adds its subcommands (and must import only light modules at the top).
COMMAND_GROUPS = ("tunelab.inference.commands", "tunelab.review.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description="Adapt pretrained Llama-family models to your task.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if name in ("train", "reward", "dpo", "rl"):
            p.add_argument("recipe", help=f"recipe YAML, e.g. recipes/{'samsum-lora' if name == 'train' else name}.yaml")
            p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
            if name == "train":
                p.add_argument("--nproc", type=int, default=1, metavar="N",
                               help="processes (GPUs) on this machine: re-runs under torchrun, FSDP2 by default "
                                    "(distributed.strategy); for several machines see README 'Scaling out'")
            _add_overrides(p)
        elif name == "quickstart":
            _add_overrides(p)
        elif name == "eval":
            p.add_argument("target", help="run folder, adapter or model folder, Hub id, .gguf file, or `embedded`")
            p.add_argument("--tasks", default="perplexity,rouge",
                           help="comma-separated: perplexity, rouge, exact_match, bleu, hellaswag, truthfulqa_mc1, "
                                "truthfulqa_mc2, or a custom task YAML file")
            p.add_argument("--baseline", default="auto",
                           help="model to compare with (default for a run folder: its base model; `none` to skip)")
            p.add_argument("--limit", type=int, help="evaluate at most N rows per task")
            p.add_argument("--output", help="results folder (default: <run>/eval/<time>/ or evals/<time>/)")
            p.add_argument("--data-dir", help="local copies of the benchmark data (hellaswag/, truthfulqa/), for offline use")
            p.add_argument("--split", default="validation", help="dataset split for perplexity and generation tasks")
            p.add_argument("--dataset", help="data source for perplexity/generation tasks when TARGET is not a run folder")
            p.add_argument("--adapter", help="dataset adapter for --dataset (samsum, alpaca, ...)")
            p.add_argument("--max-new-tokens", type=int, default=128, help="generation length limit")
            p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
            p.add_argument("--export-manual", type=int, metavar="N",
                           help="write N held-out prompts with the target's and baseline's outputs to manual.jsonl "
                                "(the review app imports it)")
        elif name == "kfold":
            p.add_argument("recipe", help="recipe YAML; a `sweep:` section in it is cross-validated point by point")
            p.add_argument("--folds", type=int, default=5, help="number of folds (K)")
            p.add_argument("--metric", default="loss", help="metric that picks the best sweep point (loss, rouge_l, ...)")
            _add_overrides(p)
        elif name == "merge":
            p.add_argument("run", help="a LoRA run folder or adapter folder")
            p.add_argument("--output", required=True, help="folder for the merged model")
    for module in COMMAND_GROUPS:
        importlib.import_module(module).register(sub)
    return parser


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("httpx", "urllib3", "filelock", "datasets", "transformers", "peft", "accelerate", "matplotlib"):
            logging.getLogger(name).setLevel(logging.WARNING)


def parse_args(argv: list[str] | None):
    """argparse, plus overrides written after an option (`train r.yaml --nproc 2 a.b=c`), which
    argparse alone rejects once the positional overrides are behind it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not (hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--nproc` re-runs under torchrun
    _quiet_libraries(args.verbose)
    try:
        args.func(args)
    except TunelabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "re-run the same command" if args.command == "kfold" else "continue with `tunelab train <recipe> --resume`"
        print(f"interrupted; {again}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
