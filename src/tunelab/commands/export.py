"""`tunelab export | push`: take a trained model to where people run and share models."""

from __future__ import annotations

from tunelab.commands.base import Command


class Export(Command):
    name = "export"
    help = "write a run as GGUF (llama.cpp), an Ollama model (GGUF + Modelfile) or a merged HF folder"

    def arguments(self, parser) -> None:
        parser.add_argument("run", help="a run folder (LoRA or full fine-tuning), adapter or model folder")
        parser.add_argument("--format", default="gguf", choices=("gguf", "ollama", "hf"), help="default gguf")
        parser.add_argument("--dtype", choices=("f16", "bf16", "q8_0"),
                            help="tensor type (default f16; hf takes f16 or bf16 and defaults to the base's own)")
        parser.add_argument("--output", help="where to write (default <run>/export/<format>/)")

    def run(self, args) -> None:
        from tunelab import export

        print(f"exported: {export.run(args.run, args.format, args.dtype, args.output)}")


class Push(Command):
    name = "push"
    help = "upload a run to the Hugging Face Hub with a generated model card (--dry-run: list it only)"

    def arguments(self, parser) -> None:
        parser.add_argument("run", help="a run folder")
        parser.add_argument("repo_id", help="Hub repository, e.g. you/my-model (created if missing)")
        parser.add_argument("--private", action="store_true", help="create the repository private")
        parser.add_argument("--dry-run", action="store_true", help="print the files and the model card, upload nothing")

    def run(self, args) -> None:
        from tunelab.export import push

        plan = push.run(args.run, args.repo_id, private=args.private, dry_run=args.dry_run)
        print(plan.describe() if args.dry_run else f"pushed: {plan.url}")
