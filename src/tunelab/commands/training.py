"""`tunelab train | quickstart | kfold | reward | dpo | kto | rl | merge`: the commands that train (or fold) a model."""

from __future__ import annotations

import importlib

from tunelab.commands.base import Command, add_overrides

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
RESUME = "interrupted; continue with `tunelab {name} <recipe> --resume`"


def recipe_config(args):
    """The validated config of a recipe command: recipe + overrides, `--resume` as train.resume."""
    from tunelab.config import load_config

    return load_config(args.recipe, list(args.overrides) + (["train.resume=true"] if args.resume else []))


def print_result(result) -> None:
    """The before/after table, the run's warnings and where its folder is."""
    from tunelab.tracking.stat_tables import format_before_after

    print()
    print(format_before_after(result.summary["eval"]))
    for warning in result.summary.get("warnings", []):
        print(f"warning: {warning}")
    print(f"\nrun folder: {result.run_dir}  (report: {result.run_dir / 'report.html'})")


class RecipeCommand(Command):
    """A training stage run from a recipe: `tunelab NAME RECIPE [key=value ...] [--resume]`."""

    stage: str  # the module under tunelab.stages
    example: str

    @property
    def interrupted(self) -> str:
        return RESUME.format(name=self.name)

    def arguments(self, parser) -> None:
        from tunelab.config import recipe_names

        parser.add_argument("recipe", help=f"recipe YAML, e.g. {self.example}, or a packaged recipe by name: "
                                           f"{', '.join(recipe_names())}")
        parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
        add_overrides(parser)

    def run(self, args) -> None:
        cfg = recipe_config(args)  # before the stage module imports torch: config errors are instant
        stage = importlib.import_module(f"tunelab.stages.{self.stage}")
        print_result(stage.run(cfg))


class Train(RecipeCommand):
    name, stage, example = "train", "sft", "recipes/samsum-lora.yaml"
    help = "fine-tune a model from a recipe (SFT: full, LoRA, DoRA, QLoRA)"

    def arguments(self, parser) -> None:
        super().arguments(parser)
        parser.add_argument("--nproc", type=int, default=1, metavar="N",
                            help="processes (GPUs) on this machine: re-runs under torchrun, FSDP2 by default "
                                 "(distributed.strategy); for several machines see README 'Scaling out'")

    def run(self, args) -> None:
        from tunelab import distributed

        cfg = recipe_config(args)  # config errors show once, before N processes start and before torch loads
        if args.nproc > 1 and distributed.world_size() == 1:
            distributed.check(cfg, args.nproc)
            distributed.relaunch(args.nproc, args.argv)
        from tunelab.stages import sft

        result = sft.run(cfg)
        if distributed.is_main():
            print_result(result)


class Reward(RecipeCommand):
    name, stage, example = "reward", "reward", "recipes/reward.yaml"
    help = "train a reward model (sequence classifier, LoRA/QLoRA) on preference pairs"


class Dpo(RecipeCommand):
    name, stage, example = "dpo", "dpo", "recipes/dpo.yaml"
    help = "preference optimisation on pairs: DPO, or reference-free ORPO / SimPO (preference.method)"


class Kto(RecipeCommand):
    name, stage, example = "kto", "kto", "recipes/kto.yaml"
    help = "learn from thumbs up/down (KTO) on rated answers or pairs split in two"


class Rl(RecipeCommand):
    name, stage, example = "rl", "rl", "recipes/rl.yaml"
    help = "online RL (trl RLOO or GRPO) against reward models and reward functions, KL-controlled"


class Quickstart(Command):
    name = "quickstart"
    help = "offline demo: LoRA on the embedded SmolLM2, before/after table"
    interrupted = "interrupted; run `tunelab quickstart` again (it starts a fresh run folder)"

    def arguments(self, parser) -> None:
        add_overrides(parser)

    def run(self, args) -> None:
        from tunelab.stages import quickstart

        print_result(quickstart.run(quickstart.config(list(args.overrides))))


class Kfold(Command):
    name = "kfold"
    help = "k-fold cross-validation of a recipe (and of its sweep grid), one aggregated report"
    interrupted = "interrupted; re-run the same command (finished folds are reused, a killed one resumes)"

    def arguments(self, parser) -> None:
        parser.add_argument("recipe", help="recipe YAML (or a packaged recipe's name); a `sweep:` section in it is "
                                           "cross-validated point by point")
        parser.add_argument("--folds", type=int, help="number of folds K (kfold.folds, default 5)")
        parser.add_argument("--metric", help="metric that picks the best sweep point (kfold.metric, default loss)")
        add_overrides(parser)

    def run(self, args) -> None:
        from tunelab.config import load_config

        flags = [f"kfold.{key}={value}" for key, value in (("folds", args.folds), ("metric", args.metric)) if value]
        cfg = load_config(args.recipe, [*args.overrides, *flags])  # before torch loads: config errors are instant
        from tunelab.stages import kfold
        from tunelab.tracking.report import format_kfold

        result = kfold.run(cfg)
        print()
        print(format_kfold(result.summary))
        print(f"\nk-fold folder: {result.run_dir}  (report: {result.run_dir / 'kfold.html'})")


class Merge(Command):
    name = "merge"
    help = "fold a LoRA run's adapter into its base and save a full model folder"

    def arguments(self, parser) -> None:
        parser.add_argument("run", help="a LoRA run folder or adapter folder")
        parser.add_argument("--output", required=True, help="folder for the merged model")
        parser.add_argument("--dtype", choices=tuple(DTYPES), help="weights dtype (default: the base model's own)")

    def run(self, args) -> None:
        from pathlib import Path

        import torch

        from tunelab.models.build import merge_and_save

        dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
        print(f"merged model written to {merge_and_save(args.run, Path(args.output), dtype)}")
