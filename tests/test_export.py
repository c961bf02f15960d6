"""Export (GGUF, Ollama, merged HF), the model card and push, on tiny random Llamas.

Two tokenizers: the embedded SmolLM2 one (byte-level BPE, ChatML) and a tiny SentencePiece BPE with
byte fallback trained here, converted the way transformers converts Llama-2's (`llama` in GGUF).
A LoRA run folder is built with peft (random B, so the adapter changes the logits). Reference
outputs come from plain transformers + peft, never from the code under test.
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import subprocess

import pytest
import torch

from tests.conftest import REPO, make_tiny_model

# Published chat templates, as in the model repos' tokenizer_config.json
# (meta-llama/Llama-2-7b-chat-hf, meta-llama/Meta-Llama-3-8B-Instruct).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# A conversation beyond the recognition probes: longer, unicode, a final user turn.
CONVERSATION = [
    {"role": "system", "content": "Reply in French when asked."},
    {"role": "user", "content": "Où est la gare ?"},
    {"role": "assistant", "content": "Tout droit, puis à gauche.\nC'est à 5 minutes."},
    {"role": "user", "content": "Merci ! Et le café — ouvert le dimanche ?"},
]
# max |Δlogit| / max |logit| against the fp32 model. Measured on these random models (worst prompt):
# f16 5.6e-3 (the LoRA-merged one; 5e-4 without LoRA), bf16 4.1e-3, q8_0 1.1e-2. A layout or name
# error gives errors of order 1.
LOGIT_TOLERANCE = {"f16": 1e-2, "bf16": 2.5e-2, "q8_0": 5e-2}
PROMPTS = ["The quick brown fox", "Meet me at the cafe at noon, déjà vu!", "Hello, how are you today?"]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory):
    """A Llama-2-style tokenizer: SentencePiece BPE with byte fallback, converted by transformers,
    plus tunelab's pad token; BOS added by default, as Llama-2's does."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import ModelSource

    folder = tmp_path_factory.mktemp("spm")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PROMPTS * 50 + ["We plan a trip to the mountains with friends."] * 50),
        model_writer=model, vocab_size=360, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder / "converted")  # tokenizer.json, as a run saves it
    return load_tokenizer(ModelSource(str(folder / "converted")))


def llama3_tokenizer(tokenizer):
    """The embedded tokenizer with Llama-3's header tokens and template (its BOS written by the template)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def save_model(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sharpen(model):
    """Scale a random model's q/k projections and output layer up: attention then depends on position
    (so a wrong RoPE layout shows in the logits) and greedy choices are no near-ties."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
        (model.model.embed_tokens if model.config.tie_word_embeddings else model.lm_head).weight.mul_(8)
    return model


def spm_model(tokenizer, rope: dict | None = None):
    """A tiny untied Llama whose MLP rows (80) are not a multiple of Q8_0's 32-wide blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, rope_parameters=rope)
    return sharpen(LlamaForCausalLM(config).eval())


def make_run(folder, base_dir, tokenizer):
    """A LoRA run folder as `tunelab train` leaves it: adapter/ (+ tokenizer), config.yaml, stats, summary."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.config import dump_config, load_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    save_model(lora, tokenizer, folder / "adapter")
    cfg = load_config(REPO / "src/tunelab/recipes/quickstart.yaml",
                      [f"model.name={base_dir}", "peft.r=4", "peft.alpha=8", "train.max_steps=2"])
    (folder / "config.yaml").write_text(dump_config(cfg))
    stats = {"source": "synthetic:meetup", "adapter": "custom", "train_samples": 216, "eval_samples": 24,
             "test_samples": 0, "dropped": 3, "bad_rows": 1, "overlong": 2, "truncated": 0, "train_tokens": 23760}
    (folder / "data_stats.json").write_text(json.dumps(stats))
    summary = {"model": str(base_dir), "method": "lora", "data": stats, "train": {"steps": 2, "runtime_s": 12.34},
               "eval": {"before": {"eval_loss": 3.2, "exact_match": 0.0},
                        "after": {"eval_loss": 1.1, "exact_match": 0.75}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # never uploaded
    (folder / "metrics.jsonl").write_text("{}\n")
    return folder


@pytest.fixture
def lora_run(tmp_path, tiny_model_dir, tokenizer):
    return make_run(tmp_path / "tiny-run", tiny_model_dir, tokenizer)


def merged_reference(run):
    """The run's model merged by plain peft (the reference every export is compared with)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    return PeftModel.from_pretrained(base, run / "adapter").merge_and_unload().eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def assert_close(got, ref, dtype):
    err = (got - ref).abs().max() / ref.abs().max()
    assert err <= LOGIT_TOLERANCE[dtype], f"{dtype}: relative logit error {err:.2e}"


def gguf_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
              or k.endswith("_id") or k.endswith("_token") or k == "tokenizer.ggml.model" or k == "tokenizer.ggml.pre"}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, types


# ---------------------------------------------------------------- GGUF

def test_gguf_export_loads_back_in_transformers(lora_run, tokenizer):
    """`export --format gguf` of a LoRA run: transformers reads back the merged model's logits (f16
    tolerance), the training chat template and special-token ids; tensor names and kinds are llama.cpp's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab import export

    path = export.run(lora_run, "gguf")
    assert path == lora_run / "export" / "gguf" / "tiny-run-f16.gguf"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary merge is gone

    fields, types = gguf_fields(path)
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # the embedded tokenizer splits like GPT-2
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.eot_token_id"]) == (
        tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.1.ffn_norm.weight"] == "F32"

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back_tok.chat_template == tokenizer.chat_template
    for kind in ("bos", "eos", "unk", "pad"):
        assert getattr(back_tok, f"{kind}_token_id") == getattr(tokenizer, f"{kind}_token_id"), kind
    reference = merged_reference(lora_run)
    rounded = copy.deepcopy(reference).half().float()  # the same weights the f16 file holds
    for text in [tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True), *PROMPTS]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert back_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert_close(logits(back, ids), logits(reference, ids), "f16")
        assert torch.allclose(logits(back, ids), logits(rounded, ids), atol=1e-3 * logits(rounded, ids).abs().max())


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_gguf_dtypes_sentencepiece_vocab(tmp_path, spm_tokenizer, dtype):
    """A Llama-2-style vocabulary (`llama`, scores replaying the merges, byte tokens) and an untied
    output layer: logits within the dtype's tolerance, tokenization identical (byte fallback too);
    Q8_0 quantizes rows that fill 32-wide blocks and keeps the 80-wide MLP rows in f16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.export.gguf import write_gguf

    model = spm_model(spm_tokenizer)
    folder = save_model(model, spm_tokenizer, tmp_path / "model")
    path = write_gguf(folder, tmp_path / "out" / f"m-{dtype}.gguf", dtype)
    fields, types = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    expected = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert types["output.weight"] == types["token_embd.weight"] == types["blk.0.attn_k.weight"] == expected
    assert types["blk.0.ffn_down.weight"] == ("F16" if dtype == "q8_0" else expected)  # (64, 80): 80 % 32 != 0

    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back.config.tie_word_embeddings is False
    for text in [*PROMPTS, "Ünïcödé → bytes!\n  two  spaces", "### User:\nhi</s>"]:
        ids = spm_tokenizer(text)["input_ids"]
        assert back_tok(text)["input_ids"] == ids, text
        assert_close(logits(back, ids), logits(model, ids), dtype)


def test_gguf_refuses_what_it_cannot_write(tmp_path, spm_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    from tunelab import export
    from tunelab.errors import TunelabError
    from tunelab.export.gguf import write_gguf

    model = MistralForCausalLM(MistralConfig(vocab_size=len(spm_tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    folder = save_model(model, spm_tokenizer, tmp_path / "mistral")
    with pytest.raises(TunelabError, match="MistralForCausalLM"):
        write_gguf(folder, tmp_path / "m.gguf")
    with pytest.raises(TunelabError, match="--format: 'onnx'"):
        export.run(folder, "onnx")
    with pytest.raises(TunelabError, match="q8_0.*for --format hf"):
        export.run(folder, "hf", "q8_0")
    with pytest.raises(TunelabError, match="full model folder already"):
        export.run(folder, "hf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()


# ---------------------------------------------------------------- Ollama

def families(tokenizer, spm_tokenizer):
    from tunelab.models.loading import DEFAULT_CHAT_TEMPLATE

    return {
        "chatml": tokenizer,  # SmolLM2's, with its default system prompt
        "tunelab": with_template(tokenizer, DEFAULT_CHAT_TEMPLATE),
        "llama2": with_template(spm_tokenizer, LLAMA2_TEMPLATE),
        "llama3": llama3_tokenizer(tokenizer),
        "tunelab-bos": with_template(spm_tokenizer, DEFAULT_CHAT_TEMPLATE),  # a base Llama-2: BOS added by the runtime
    }


@pytest.mark.parametrize("case", ["chatml", "tunelab", "llama2", "llama3", "tunelab-bos"])
def test_modelfile_template_renders_the_chat_template(tokenizer, spm_tokenizer, case):
    """The Go template renders a conversation outside the probes as the tokenizer's template does,
    and the tokens Ollama would feed (BOS added by the runtime where the GGUF says so) equal the
    prompt tokens tunelab's own inference builds."""
    from tunelab.export.ollama import adds_bos, chat_format, go_render, jinja_render
    from tunelab.inference.prompts import prompt_ids

    tok = families(tokenizer, spm_tokenizer)[case]
    family, template = chat_format(tok)
    assert family == case.split("-")[0]
    for conversation in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        assert go_render(template, conversation) == jinja_render(tok, conversation)
    # Token level, for byte-level BPE; SentencePiece-style vocabularies differ after special tokens
    # (llama.cpp adds "▁" there, transformers 5's Llama tokenizers do not: see gguf.py).
    if tok.backend_tokenizer.pre_tokenizer.__class__.__name__ != "Metaspace":
        text = go_render(template, CONVERSATION)
        served = [tok.bos_token_id] * adds_bos(tok) + tok(text, add_special_tokens=False)["input_ids"]
        assert served == prompt_ids(tok, CONVERSATION)


def test_modelfile_refuses_an_unknown_template(tokenizer):
    from tunelab.errors import TunelabError
    from tunelab.export.ollama import chat_format

    tok = with_template(tokenizer, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    with pytest.raises(TunelabError, match=r"chat template \(\{% for m in messages %\}<\{\{ m\['role'\] \}\}>"):
        chat_format(tok)


def test_ollama_export_folder(lora_run, tokenizer):
    """`export --format ollama`: the GGUF plus a Modelfile whose FROM names it, whose TEMPLATE (read
    back from the file) renders the training template, and whose stops are the end-of-turn/EOS."""
    from gguf import GGUFReader

    from tunelab import export
    from tunelab.export.ollama import go_render, jinja_render

    out = export.run(lora_run, "ollama", "q8_0")
    text = (out / "Modelfile").read_text()
    gguf_name = re.search(r"^FROM \./(\S+)$", text, re.M).group(1)
    assert gguf_name == "tiny-run-q8_0.gguf" and GGUFReader(out / gguf_name).tensors
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    assert go_render(template, CONVERSATION) == jinja_render(tokenizer, CONVERSATION)
    assert re.findall(r"^PARAMETER stop (.+)$", text, re.M) == ['"<|im_end|>"']
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", gguf_name]


def go_binary(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("Go is not installed")
    folder = tmp_path_factory.mktemp("gotemplate")
    (folder / "main.go").write_text("""package main

import ("encoding/json"; "os"; "strings"; "text/template")

func main() {
	src, _ := os.ReadFile(os.Args[1])
	raw, _ := os.ReadFile(os.Args[2])
	var cases []map[string]any
	if err := json.Unmarshal(raw, &cases); err != nil { panic(err) }
	t := template.Must(template.New("m").Parse(string(src)))
	out := []string{}
	for _, c := range cases {
		var b strings.Builder
		if err := t.Execute(&b, c); err != nil { panic(err) }
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
""")
    env = {"HOME": str(folder), "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"),
           "PATH": "/usr/bin:/bin:/usr/local/bin", "GO111MODULE": "off"}
    subprocess.run(["go", "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, env=env)
    return folder / "render"


def test_go_evaluator_matches_go(tmp_path_factory, tmp_path, tokenizer, spm_tokenizer):
    """tunelab's evaluator of the Go template subset renders every family's template on every probe
    exactly as Go's text/template does (the check Ollama's own renderer would make)."""
    from tunelab.export.ollama import PROBES, chat_format, go_render, messages, ollama_values

    render = go_binary(tmp_path_factory)
    conversations = [messages(p) for p in PROBES] + [CONVERSATION]
    for case, tok in families(tokenizer, spm_tokenizer).items():
        _, template = chat_format(tok)
        (tmp_path / "t.tmpl").write_text(template)
        (tmp_path / "data.json").write_text(json.dumps([ollama_values(c) for c in conversations]))
        go = json.loads(subprocess.run([str(render), str(tmp_path / "t.tmpl"), str(tmp_path / "data.json")],
                                       check=True, capture_output=True, text=True).stdout)
        assert go == [go_render(template, c) for c in conversations], case


# ---------------------------------------------------------------- model card and push

def test_push_dry_run_lists_files_and_card(lora_run, tiny_model_dir, tokenizer):
    from tunelab import __version__, export
    from tunelab.export import push

    export.run(lora_run, "ollama")
    plan = push.run(lora_run, "someone/tiny-run", dry_run=True)
    assert plan.repo_files == [
        "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "tokenizer.json",
        "tokenizer_config.json", "tiny-run-f16.gguf", "Modelfile",
        "tunelab/config.yaml", "tunelab/summary.json", "tunelab/data_stats.json", "README.md",
    ]
    card = plan.card
    assert card.startswith("---\nlibrary_name: peft\n") and "base_model" not in card.split("---")[1]  # a local base
    for expected in (f"tunelab {__version__} (lora)", str(tiny_model_dir),
                     "| LoRA r / alpha / dropout | 4 / 8.0 / 0.0 |", "| target modules | all-linear |",
                     "| batch size x grad accum | 3 x 1 |",
                     "| source | `synthetic:meetup` |", "| rows kept (train / validation / test) | 216 / 24 / 0 |",
                     "| rows dropped | 3 (malformed 1, over max length 2) |", "| steps run | 2 |",
                     "ollama create tiny-run -f Modelfile", "llama-server -m tiny-run/tiny-run-f16.gguf --jinja",
                     "--enable-lora --lora-modules tiny-run=someone/tiny-run --max-lora-rank 4"):
        assert expected in card, expected
    table = re.search(r"```text\n(.*?)```", card, re.S).group(1)
    assert re.search(r"exact_match\s+\|\s+0\s+\|\s+0\.75\s+\|\s+\+0\.75 \(better\)", table)
    described = plan.describe()
    assert "public model repo someone/tiny-run: 11 files" in described and described.endswith(card)


def test_card_snippets_load_the_model(lora_run, tokenizer):
    """The card's peft and transformers snippets, run against the staged repo folder, give the
    merged model's logits."""
    from tunelab.export import push
    from tunelab.export.card import model_card

    plan = push.plan(lora_run, "someone/tiny-run")
    repo = lora_run.parent / "repo"
    push.stage(plan, repo)
    card = model_card(lora_run, str(repo), plan.repo_files)
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 2
    reference = merged_reference(lora_run)
    ids = tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True),
                    add_special_tokens=False)["input_ids"]
    for code in snippets:
        scope: dict = {}
        exec(code.replace("max_new_tokens=64", "max_new_tokens=4"), scope)  # noqa: S102 - our own generated text
        assert torch.allclose(logits(scope["model"], ids), logits(reference, ids), atol=1e-5)


def test_full_model_run_card(tmp_path, tiny_model_dir, tokenizer):
    """A full fine-tuning run goes up as its model folder; the card's transformers snippet loads it."""
    from transformers import AutoModelForCausalLM

    from tunelab.export import push
    from tunelab.export.card import model_card

    run = tmp_path / "full-run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "config.yaml").write_text("model: {name: HuggingFaceTB/SmolLM2-135M-Instruct}\npeft: {method: full}\n")
    plan = push.plan(run, "someone/full-run")
    assert plan.repo_files == [*sorted(p.name for p in (run / "model").iterdir()), "tunelab/config.yaml", "README.md"]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in plan.card and "library_name: transformers" in plan.card
    assert "vllm serve someone/full-run" in plan.card and "Results\n\nNo evaluation was recorded" in plan.card
    push.stage(plan, tmp_path / "repo")
    (code,) = re.findall(r"```python\n(.*?)```", model_card(run, str(tmp_path / "repo"), plan.repo_files), re.S)
    scope: dict = {}
    exec(code.replace("max_new_tokens=64", "max_new_tokens=2"), scope)  # noqa: S102 - our own generated text
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert torch.equal(logits(scope["model"], ids), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids))


def test_push_uploads_the_staged_folder(lora_run, monkeypatch):
    """Without --dry-run: the repo is created (private when asked) and one upload_folder call sends
    exactly the planned files, the card as README.md, byte for byte."""
    import huggingface_hub

    from tunelab.export import push

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        root = folder_path if isinstance(folder_path, type(lora_run)) else type(lora_run)(folder_path)
        calls["files"] = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    plan = push.run(lora_run, "someone/tiny-run", private=True)
    assert calls["create"] == ("someone/tiny-run", {"private": True, "exist_ok": True})
    assert sorted(calls["files"]) == sorted(plan.repo_files)
    assert calls["files"]["README.md"].decode() == plan.card
    adapter = (lora_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert calls["files"]["adapter_model.safetensors"] == adapter
    assert plan.url == "https://huggingface.co/someone/tiny-run"
    assert not list(lora_run.glob(".push-*"))  # staging removed


def test_push_refuses_bad_input(tmp_path, lora_run):
    from tunelab.errors import TunelabError
    from tunelab.export import push

    with pytest.raises(TunelabError, match="owner/name"):
        push.run(lora_run, "no-owner", dry_run=True)
    with pytest.raises(TunelabError, match="not a finished run folder"):
        push.run(tmp_path, "someone/x", dry_run=True)


# ---------------------------------------------------------------- llama.cpp (when llama-cpp-python is installed)

def llama_cpp_model(tmp_path, tok, model):
    """(llama.cpp's Llama on the exported f16 GGUF, transformers on the same f16-rounded weights)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from tunelab.export.gguf import write_gguf

    folder = save_model(model, tok, tmp_path / "model")
    path = write_gguf(folder, tmp_path / "m.gguf", "f16")
    f16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).float().eval()
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False), f16


def greedy(model, ids, n, tok):
    return model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()


@pytest.mark.parametrize("case", ["smollm2", "llama2-rope-llama3"])
def test_llama_cpp_greedy_tokens_match_transformers(tmp_path, tokenizer, spm_tokenizer, case):
    """llama.cpp loads the GGUF, tokenizes like the training tokenizer, and its logits and greedy
    continuation equal transformers' on the same (f16-rounded) weights; the second case covers the
    SentencePiece vocabulary, an untied output and Llama-3.1 RoPE scaling (rope_freqs). Its chat
    prompt is a single turn: text right after a special token differs (next test)."""
    if case == "smollm2":
        tok, model, conversation = tokenizer, sharpen(make_tiny_model(tokenizer).eval()), CONVERSATION
    else:
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
        tok, model, conversation = spm_tokenizer, spm_model(spm_tokenizer, rope), CONVERSATION[1:2]
    llm, f16 = llama_cpp_model(tmp_path, tok, model)
    chat = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    for prompt in [chat, *PROMPTS]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = [tok.bos_token_id] * (tok("a")["input_ids"][:1] == [tok.bos_token_id]) + ids
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids, prompt
        llm.reset()
        llm.eval(ids)
        assert_close(torch.tensor(llm.scores[:len(ids)]), logits(f16, ids), "f16")
        llm.reset()
        got = [t for _, t in zip(range(12), llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0))]
        assert got == greedy(f16, ids, 12, tok), prompt
    if case == "smollm2":  # llama-cpp-python's chat API renders the GGUF's template and stops on its EOS
        reply = llm.create_chat_completion(messages=conversation, max_tokens=12, temperature=0.0, top_k=1,
                                           repeat_penalty=1.0)
        ids = tok(chat, add_special_tokens=False)["input_ids"]
        want = f16.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)[0, len(ids):]
        assert reply["usage"]["prompt_tokens"] == len(ids)
        assert reply["choices"][0]["message"]["content"] == tok.decode(want, skip_special_tokens=True)
    llm.close()


def test_llama_cpp_sentencepiece_space_after_special_tokens(tmp_path, spm_tokenizer):
    """The known difference gguf.py warns about: after a special token llama.cpp inserts "▁" (its
    add_space_prefix), transformers 5's Llama tokenizers (legacy=False) do not."""
    llm, _ = llama_cpp_model(tmp_path, spm_tokenizer, spm_model(spm_tokenizer))
    text = "Hi</s>Hello"
    ours = spm_tokenizer(text)["input_ids"]
    theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
    eos = ours.index(spm_tokenizer.eos_token_id)
    assert theirs[:eos + 1] == ours[:eos + 1]
    assert theirs[eos + 1:] != ours[eos + 1:]
    assert spm_tokenizer.convert_ids_to_tokens(theirs[eos + 1:])[0].startswith("\u2581")
    assert not spm_tokenizer.convert_ids_to_tokens(ours[eos + 1:])[0].startswith("\u2581")
    llm.close()
