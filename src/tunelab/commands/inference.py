"""`tunelab generate | chat | serve | bench-infer`: the inference engine from the terminal and over HTTP."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from tunelab.commands.base import Command, Stopped
from tunelab.errors import TunelabError, did_you_mean

TARGET_HELP = "run folder, adapter or model folder, Hub id, .gguf file, or `embedded`"


def _engine_options(args) -> dict:
    return {"kv_budget_tokens": args.kv_budget_tokens, "page_size": args.page_size, "seed": args.seed}


def _sampling(args):
    from tunelab.inference.base import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, stop=tuple(args.stop or ()), seed=args.seed)


class _Styler:
    """The chosen style with its context, examples and variables, turning a prompt into messages."""

    def __init__(self, args):
        from tunelab.inference.prompts import load_examples, load_style

        self.style = load_style(args.style)
        self.variables = dict(_pair(v, "--var") for v in args.var or ())
        self.context = _read(args.context, "--context") if args.context else None
        self.examples = load_examples(args.examples, args.examples_format, self.style.k) if args.examples else []

    def messages(self, prompt: str, context: str | None = None, history=(), where: str | None = None) -> list[dict]:
        """The conversation for `prompt`; `where` (file:line) prefixes an error about a missing input."""
        try:
            return self.style.messages(prompt, context=context or self.context, examples=self.examples,
                                       variables=self.variables, history=history)
        except TunelabError as err:
            raise TunelabError(f"{where}: {err}" if where else str(err)) from None


def _pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise TunelabError(f"{flag}: expected KEY=VALUE, got {text!r}")
    return key, value


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise TunelabError(f"{flag} {path}: cannot read it: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise TunelabError(f"{flag} {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}; "
                           "probably Latin-1 or Windows-1252); save it as UTF-8") from None


def _input_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) of each prompt in a prompts.jsonl file."""
    rows = []
    for line_no, line in enumerate(_read(path, "--input").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TunelabError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise TunelabError(f"{path}:{line_no}: field 'prompt' is missing or not a string")
        rows.append((line_no, row))
    if not rows:
        raise TunelabError(f"{path}: no prompts (one JSON object per line with a 'prompt' field)")
    return rows


def _generate(args) -> None:
    from tqdm.auto import tqdm

    from tunelab.inference.backends import load_engine
    from tunelab.inference.prompts import prompt_ids

    if (args.prompt is None) == (args.input is None):
        raise TunelabError("generate: give --prompt TEXT or --input prompts.jsonl (one of them)")
    styler, params = _Styler(args), _sampling(args)
    # Every conversation is styled before the model loads: a style's missing input fails at once.
    if args.input:
        numbered = _input_rows(args.input)
        rows = [row for _, row in numbered]
        conversations = [styler.messages(row["prompt"], row.get("context"), where=f"{args.input}:{line_no}")
                         for line_no, row in numbered]
    else:
        rows, conversations = None, [styler.messages(args.prompt)]
    engine = load_engine(args.target, args.backend, **_engine_options(args))
    tok = engine.tokenizer
    try:
        if rows is None:
            for piece in engine.stream(prompt_ids(tok, conversations[0]), params):
                print(piece, end="", flush=True)
            print()
            return
        prompts = [prompt_ids(tok, messages) for messages in conversations]
        with tqdm(total=len(prompts), desc="generating", unit="prompt") as bar:
            done = engine.generate(prompts, params, progress=bar)
        out = Path(args.output)
        with out.open("w") as f:
            for row, c in zip(rows, done):
                f.write(json.dumps({**row, "output": c.text, "finish_reason": c.finish_reason,
                                    "prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids)}) + "\n")
        kv = engine.kv()["summary"]
        print(f"{len(done)} outputs written to {out}  (KV waste {kv.get('kv_waste_pct', 'n/a')} %)")
        if args.kv_log and engine.ledger is not None:
            from tunelab.inference.bench import write_kv_log

            write_kv_log(engine, Path(args.kv_log))
            print(f"per-step KV states written to {args.kv_log}")
    finally:
        engine.close()


CHAT_COMMANDS = {
    "/help": "this list",
    "/style NAME": "switch the prompt style (plain, role, cot, grounded, few_shot, or a .yaml file)",
    "/reset": "forget the conversation so far",
    "/exit": "leave (also /quit, Ctrl-D)",
}


def _line_editing() -> Path | None:
    """Line editing (arrow keys, Ctrl-R) and a history kept across sessions for input(), through
    readline where Python has it (not on Windows); returns the history file, or None."""
    try:
        import readline
    except ImportError:
        return None
    from tunelab.models.loading import cache_root

    path = cache_root() / "chat_history"
    with contextlib.suppress(OSError):  # the first session has none yet
        readline.read_history_file(path)
    readline.set_history_length(1000)
    return path


def _save_history(path: Path) -> None:
    import readline

    with contextlib.suppress(OSError):  # a read-only cache costs the history, never the chat
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)


def _chat_command(line: str, styler: _Styler, turns: list[dict], history_file: Path | None) -> list[dict]:
    """Do one /command; returns the conversation's turns (cleared by /reset)."""
    from tunelab.inference.prompts import load_style

    name, _, rest = line.partition(" ")
    if name == "/help":
        width = max(map(len, CHAT_COMMANDS))
        print("\n".join(f"  {command.ljust(width)}  {what}" for command, what in CHAT_COMMANDS.items()))
        if history_file:
            print(f"  arrow keys edit and recall lines, Ctrl-R searches them (history: {history_file})")
    elif name == "/reset":
        print("(conversation cleared)")
        return []
    elif name == "/style":
        try:
            styler.style = load_style(rest.strip())
            print(f"(style {styler.style.name})")
        except TunelabError as err:
            print(f"({err})")
    else:
        known = [command.split()[0] for command in CHAT_COMMANDS]
        print(f"(unknown command {name}{did_you_mean(name, known)}; /help lists them)")
    return turns


def _chat(args) -> None:
    from tunelab.inference.backends import load_engine
    from tunelab.inference.prompts import prompt_ids

    styler, params = _Styler(args), _sampling(args)
    styler.messages("")  # a style's missing input (--context, --examples, --var) fails before the model loads
    engine = load_engine(args.target, args.backend, **_engine_options(args))
    history_file = _line_editing()
    turns: list[dict] = []
    print(f"chatting with {args.target} (style {styler.style.name}); /help lists the commands, /exit leaves")
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if line in ("/exit", "/quit"):
                break
            if line.startswith("/"):
                turns = _chat_command(line, styler, turns, history_file)
                continue
            if not line:
                continue
            try:
                messages = styler.messages(line, history=turns)
            except TunelabError as err:
                print(f"({err})")
                continue
            print("model> ", end="", flush=True)
            reply = ""
            for piece in engine.stream(prompt_ids(engine.tokenizer, messages), params):
                print(piece, end="", flush=True)
                reply += piece
            print()
            turns += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
    finally:
        engine.close()
        if history_file:
            _save_history(history_file)


def _serve(args) -> None:
    import uvicorn

    from tunelab.inference.backends import build_engine, choose_backend
    from tunelab.inference.server import create_app, parse_adapters
    from tunelab.models.build import attach_adapters, load_for_eval

    adapters = parse_adapters(args.adapters)
    if args.max_body_bytes is not None and args.max_body_bytes < 1024:
        raise TunelabError(f"--max-body-bytes must be at least 1024 (a request's JSON), got {args.max_body_bytes}")
    backend = "paged" if args.backend == "auto" else choose_backend(args.backend)
    if backend == "vllm":
        raise TunelabError("serve: vLLM has its own OpenAI server (`vllm serve`); tunelab serves with --backend paged or static")
    model, tokenizer = load_for_eval(args.target)
    model = attach_adapters(model, adapters)
    engine = build_engine(backend, model, tokenizer, **_engine_options(args))
    if hasattr(engine, "capture") and model.device.type == "cuda":
        engine.capture()  # the decode graphs now, so the first requests don't pay for them
    app = create_app(engine, args.target, adapters=list(adapters), api_key=args.api_key,
                     default_max_tokens=args.max_new_tokens, max_body_bytes=args.max_body_bytes)
    print(f"serving {args.target} ({backend}) on http://{args.host}:{args.port}/v1  models: "
          f"{', '.join([args.target, *adapters])}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        raise Stopped
    finally:
        engine.close()


def _bench(args) -> None:
    from tunelab.inference.bench import bench, dataset_prompts, format_table, write_rows
    from tunelab.models.build import load_for_eval

    model, tokenizer = load_for_eval(args.target)
    prompts, origin = dataset_prompts(tokenizer, args.dataset, args.format, args.split, args.n)
    budget = args.kv_budget_tokens or 2 * (max(map(len, prompts)) + args.max_new_tokens)
    print(f"{len(prompts)} prompts from {origin}: {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
          f"(mean {sum(map(len, prompts)) / len(prompts):.0f}), {args.max_new_tokens} new tokens each (greedy), "
          f"KV budget {budget} tokens for both backends", flush=True)
    rows = bench(model, tokenizer, prompts, [args.max_new_tokens] * len(prompts), kv_budget_tokens=budget,
                 page_size=args.page_size, kv_log=Path(args.kv_log) if args.kv_log else None)
    print()
    print(format_table(rows))
    if args.output:
        write_rows(rows, Path(args.output))
        print(f"\nrows written to {args.output}")


def _add_model_options(p, styles: bool = True) -> None:
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--backend", default="auto", choices=["auto", "paged", "static", "vllm"],
                   help="auto: vllm when installed with a GPU, else paged (tunelab's engine: paged KV cache, "
                        "continuous batching, graph-captured decode); static: generate() on padded batches")
    p.add_argument("--kv-budget-tokens", type=int, help="KV cache size in tokens (default: 8192 on CPU, from free memory on a GPU)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV block (paged)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, help="seed for sampling")
    if styles:
        p.add_argument("--style", default="plain", help="plain, role, cot, grounded, few_shot, or your style .yaml")
        p.add_argument("--var", action="append", metavar="KEY=VALUE", help="a style variable, e.g. persona=\"a tax advisor\"")
        p.add_argument("--context", help="file with context passages (style grounded)")
        p.add_argument("--examples", help="few-shot examples: .jsonl of prompt/completion or messages, or a dataset")
        p.add_argument("--examples-format", "--examples-adapter", dest="examples_format",
                       help="data format when --examples is a dataset (e.g. samsum)")


class Generate(Command):
    name = "generate"
    help = "generate from a prompt or a prompts.jsonl file (streams to the terminal)"

    def arguments(self, parser) -> None:
        _add_model_options(parser)
        parser.add_argument("--prompt", help="one prompt; the answer streams to the terminal")
        parser.add_argument("--input", help="prompts.jsonl: one {\"prompt\": ..., \"context\": optional} per line")
        parser.add_argument("--output", default="outputs.jsonl", help="where --input's outputs go")
        parser.add_argument("--kv-log", help="with --input: write the KV state of every generation step (JSON lines)")

    def run(self, args) -> None:
        _generate(args)


class Chat(Command):
    name = "chat"
    help = "interactive multi-turn chat (streaming; /help, /style NAME, /reset, /exit; line editing and history)"
    interrupted = "bye"

    def arguments(self, parser) -> None:
        _add_model_options(parser)

    def run(self, args) -> None:
        _chat(args)


class Serve(Command):
    name = "serve"
    help = "OpenAI-compatible HTTP server (chat, completions, models, metrics)"
    interrupted = "server stopped"

    def arguments(self, parser) -> None:
        _add_model_options(parser, styles=False)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every request")
        parser.add_argument("--adapters", help="extra LoRA adapters by name: a=runs/a,b=runs/b (the request's "
                                               "model picks one)")
        parser.add_argument("--max-body-bytes", type=int, help="refuse bigger request bodies with 413 before "
                            "reading them (default: 16 bytes per token of the model's context, at least 256 KiB)")

    def run(self, args) -> None:
        _serve(args)


class BenchInfer(Command):
    name = "bench-infer"
    help = "static vs paged generation at the same KV budget: tokens/s, p50/p99, KV waste"

    def arguments(self, parser) -> None:
        parser.add_argument("target", help=TARGET_HELP)
        parser.add_argument("--dataset", help="prompt source (default: the quickstart's generated chats), "
                                              "e.g. ../shared/data/samsum")
        parser.add_argument("--format", "--adapter", dest="format", help="data format of --dataset (samsum, alpaca, ...)")
        parser.add_argument("--split", default="validation")
        parser.add_argument("-n", type=int, default=12, help="number of prompts")
        parser.add_argument("--max-new-tokens", type=int, default=24)
        parser.add_argument("--kv-budget-tokens", type=int, help="KV budget for both backends (default: twice the "
                                                                 "longest request)")
        parser.add_argument("--page-size", type=int, default=16)
        parser.add_argument("--output", help="write the rows as JSON")
        parser.add_argument("--kv-log", help="write the KV state of every generation step of both backends (JSON lines)")

    def run(self, args) -> None:
        _bench(args)
