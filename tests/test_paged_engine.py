"""The native paged engine on the CPU in fp32: greedy output equals `model.generate()` token for
token (also after preemption and with chunked prefill, through both step programs), cancel frees
every block, a seeded sampled request draws the same tokens whatever shares its batch, LoRA
layers run; the GPU kernels against their torch references (GPU only)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import make_tiny_model
from tunelab.inference.backends import build_engine
from tunelab.inference.base import SamplingParams

QUESTIONS = ["What is the capital of France?", "Say hello in Spanish.",
             "Name three colours and say in one sentence why you like each of them."]
NEW = 6


def _tokens(engine, prompts, params) -> list[list[int]]:
    try:
        return [c.token_ids for c in engine.generate(prompts, params)]
    finally:
        engine.close()


def _reference(model, prompts, new: int) -> list[list[int]]:
    """model.generate() on each prompt alone (no padding): the definition of greedy."""
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def embedded():
    from tunelab.inference.prompts import prompt_ids
    from tunelab.models.build import load_for_eval

    model, tok = load_for_eval("embedded")
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    return model, tok, prompts, _reference(model, prompts, NEW)


@pytest.mark.parametrize("options, what", [
    ({"kv_budget_tokens": 2048}, "plain"),
    ({"kv_budget_tokens": 80, "page_size": 4}, "preempted"),  # two prompts fit, not their answers too
    ({"kv_budget_tokens": 2048, "max_batch_tokens": 16}, "chunked"),  # every prompt prefilled 16 tokens a step
    ({"kv_budget_tokens": 2048, "program": "fused"}, "fused"),  # the GPU's step program, torch references
])
def test_greedy_equals_generate_on_the_embedded_model(embedded, options, what):
    model, tok, prompts, expected = embedded
    engine = build_engine("paged", model, tok, **options)
    got = _tokens(engine, prompts, SamplingParams(max_new_tokens=NEW))
    assert got == expected
    kv = engine.kv()["summary"]
    if what == "preempted":
        assert kv["preemptions"] > 0
    if what == "chunked":
        assert max(map(len, prompts)) > 16 * 2  # really split in several chunks
    assert engine.pool.free == engine.pool.capacity  # every block back


@pytest.fixture(scope="module")
def lively(tokenizer):
    """A tiny Llama with weights large enough that it does not repeat one token forever."""
    model = make_tiny_model(tokenizer, seed=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.25)
    return model


def _prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer(" ".join(["word"] * (2 + 7 * i)) + " end", add_special_tokens=False)["input_ids"] for i in range(n)]


def test_tiny_model_batch_equals_generate_and_varies(lively, tokenizer):
    prompts = _prompts(tokenizer, 4)
    got = _tokens(build_engine("paged", lively, tokenizer, kv_budget_tokens=64, page_size=4,
                               max_batch_tokens=8), prompts, SamplingParams(max_new_tokens=10))
    assert got == _reference(lively, prompts, 10)
    assert len({t for row in got for t in row}) > 5  # not a model that says one token


def test_cancel_frees_every_block(lively, tokenizer):
    engine = build_engine("paged", lively, tokenizer, kv_budget_tokens=1024, page_size=16)
    try:
        handle = engine.submit(_prompts(tokenizer, 4)[-1], SamplingParams(max_new_tokens=900))
        deadline = time.time() + 30
        while engine.kv()["now"]["blocks_in_use"] < 3 and time.time() < deadline:
            time.sleep(0.01)
        busy = engine.kv()["now"]
        assert busy["blocks_in_use"] >= 3 and busy["reserved_bytes"] >= busy["live_bytes"] > 0
        engine.cancel(handle.id)
        assert list(handle.events())[-1].finish_reason == "cancelled"
        while engine.kv()["now"]["blocks_in_use"] and time.time() < deadline:
            time.sleep(0.01)
        now = engine.kv()["now"]
        assert (now["blocks_in_use"], now["live_bytes"], now["running"]) == (0, 0, 0)
        assert engine.pool.free == engine.pool.capacity
    finally:
        engine.close()


def test_seeded_sample_is_the_same_whatever_shares_the_batch(lively, tokenizer):
    prompt = _prompts(tokenizer, 3)[1]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    alone = _tokens(build_engine("paged", lively, tokenizer), [prompt], sampled)[0]
    others = _prompts(tokenizer, 5)
    mixed = [SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=12, temperature=0.8, seed=1),
             sampled, SamplingParams(max_new_tokens=5, temperature=1.3, top_p=0.5), SamplingParams(max_new_tokens=7)]
    engine = build_engine("paged", lively, tokenizer, kv_budget_tokens=40, page_size=4)  # preempts, too
    try:
        handles = engine.submit_many([others[0], others[1], prompt, others[3], others[4]], mixed)
        batched = [engine.collect(h).token_ids for h in handles]
    finally:
        engine.close()
    assert batched[2] == alone and engine.kv()["summary"]["preemptions"] > 0
    other_seed = _tokens(build_engine("paged", lively, tokenizer), [prompt],
                         SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=8))[0]
    assert other_seed != alone  # the seed is what decides


def test_stop_string_and_eos_end_a_request_in_the_loop(lively, tokenizer):
    prompt = _prompts(tokenizer, 2)[1]
    engine = build_engine("paged", lively, tokenizer)
    try:
        full = engine.generate([prompt], SamplingParams(max_new_tokens=10))[0]
        stop = full.text[len(full.text) // 2 :][:3]
        handle = engine.submit(prompt, SamplingParams(max_new_tokens=10, stop=(stop,)))
        events = list(handle.events())
    finally:
        engine.close()
    assert stop and events[-1].finish_reason == "stop"
    assert sum(len(e.token_ids) for e in events) < len(full.token_ids)  # ended early, by the engine itself


def test_lora_layers_run(tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(make_tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                   init_lora_weights=False)).eval()
    prompts = _prompts(tokenizer, 3)
    expected = _reference(model, prompts, 6)
    assert _tokens(build_engine("paged", model, tokenizer), prompts, SamplingParams(max_new_tokens=6)) == expected
    with model.disable_adapter():
        assert expected != _reference(model, prompts, 6)  # the adapter changes the answer


def test_other_architectures_fall_back_to_static(tokenizer, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).eval()
    engine = build_engine("paged", model, tokenizer)
    engine.close()
    assert engine.name == "static" and "gpt2 is not a Llama-architecture model" in caplog.text


def test_sampling_filters():
    from tunelab.inference.sampling import SamplingTensors, sample

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(4000, 1)
    rows = logits.shape[0]

    def draw(temperature=1.0, top_k=0, top_p=1.0, mode="filter"):
        t = SamplingTensors(torch.full((rows,), temperature), torch.full((rows,), top_k), torch.full((rows,), top_p),
                            torch.arange(rows), torch.zeros(rows, dtype=torch.long))
        return sample(logits, t, mode)

    counts = torch.bincount(draw(mode="sample"), minlength=5).float() / rows
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.03)  # Gumbel-max draws from softmax
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.5).tolist()) == {0}  # token 0 alone holds more than half the mass
    assert draw(temperature=0.0).eq(0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_triton_kernels_match_their_references():
    from tunelab.inference import attention, fused, triton_ops

    torch.manual_seed(0)
    dt, dev = torch.bfloat16, "cuda"
    for heads, kv_heads, dim in [(9, 3, 64), (32, 32, 128)]:
        cache = torch.randn(2, 64, 16, kv_heads, dim, dtype=dt, device=dev)
        lens = torch.tensor([1, 37, 300, 700], device=dev)
        tables = torch.stack([torch.randperm(63, device=dev)[:48] + 1 for _ in lens])
        q = torch.randn(len(lens), heads, dim, dtype=dt, device=dev)
        ref = attention.reference_decode(q, cache, tables, lens, dim**-0.5)
        got = triton_ops.paged_decode(q, cache, tables, lens, dim**-0.5)
        assert ((got.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
        x, r, w = (torch.randn(5, heads * dim, dtype=dt, device=dev) for _ in range(3))
        assert torch.equal(triton_ops.rmsnorm(x, w[0], 1e-5), fused.rmsnorm(x, w[0], 1e-5))
        r1, r2 = r.clone(), r.clone()
        assert torch.equal(triton_ops.rmsnorm(x, w[0], 1e-5, r1), fused.rmsnorm(x, w[0], 1e-5, r2))
        assert torch.equal(r1, r2)


def test_graph_decode_path_equals_eager(lively, tokenizer, monkeypatch):
    """The captured-decode path on the CPU, the graph replaced by a plain call of its body: the
    static buffers, bucket padding (rows on the scratch block) and sampling modes give the eager
    path's tokens."""
    from tunelab.inference import runner as runner_module

    class Replayed:
        def __init__(self, body):
            self.replay = body

    prompts = _prompts(tokenizer, 5)
    mixed = [SamplingParams(max_new_tokens=12), SamplingParams(max_new_tokens=8, temperature=0.9, seed=3),
             SamplingParams(max_new_tokens=6, temperature=1.1, top_k=20, seed=4), SamplingParams(max_new_tokens=8),
             SamplingParams(max_new_tokens=3)]

    def run(graphs: bool, eos: set[int], budget: int = 256):
        engine = build_engine("paged", lively, tokenizer, kv_budget_tokens=budget, page_size=4)
        engine.eos = eos
        r = engine.runner
        if graphs:
            with engine.exclusive():
                r.graphs = True
                r._static = runner_module._StaticInputs(r.buckets[-1], engine.scheduler.tables.shape[1], r.device)
        try:
            return [engine.collect(h).token_ids for h in engine.submit_many(prompts, mixed)], engine, r
        finally:
            engine.close()

    monkeypatch.setattr(runner_module, "record", lambda body, pool, device: Replayed(body))
    expected, _, _ = run(False, set())
    got, engine, r = run(True, set())
    assert got == expected
    assert {mode for _bucket, mode, _state in r._graphs} == {"greedy", "sample", "filter"}
    assert engine.phases["queued_behind"] > 0  # steps were queued behind the one in flight
    eos = {expected[0][4], expected[3][2]}  # tokens drawn mid-run: those requests end there, one step in flight
    expected, _, _ = run(False, eos)
    got, engine, _ = run(True, eos)
    assert got == expected and len(expected[0]) <= 5
    got, engine, _ = run(True, set(), budget=72)  # a preemption: the queued path hands over to the synchronous one
    assert got == run(False, set())[0] and engine.kv()["summary"]["preemptions"] > 0


def test_rloo_rollouts_go_through_the_engine(lively, tokenizer):
    """trl's RLOOTrainer._generate_single_turn, overridden: seeded from torch's generator
    (reproducible under set_seed), the policy's training mode restored, trl's path kept for vLLM."""
    from types import SimpleNamespace

    from tunelab.inference.rollouts import EngineRollouts

    class Trl:
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
            return "trl's own path"

    trainer = type("Trainer", (EngineRollouts, Trl), {})()
    trainer.__dict__.update(use_vllm=False, accelerator=SimpleNamespace(num_processes=1, unwrap_model=lambda m: m),
                            model=lively.train(), min_p=None, repetition_penalty=1.0, max_completion_length=6,
                            temperature=1.0, top_p=1.0, top_k=None, _tokenizer=tokenizer)
    prompts = _prompts(tokenizer, 3) * 2  # each prompt twice, as num_generations=2 repeats them
    torch.manual_seed(0)
    first = trainer._generate_single_turn(prompts, None, {})
    torch.manual_seed(0)
    assert trainer._generate_single_turn(prompts, None, {}) == first
    assert lively.training and all(len(c) == 6 for c in first) and first[:3] != first[3:]  # own seed each
    lively.eval()
    trainer.use_vllm = True
    assert trainer._generate_single_turn(prompts, None, {}) == "trl's own path"


def test_grpo_rollouts_go_through_the_engine(lively, tokenizer):
    """GRPOTrainer's variant takes num_generations and returns (ids, logprobs): the engine's ids
    equal the RLOO hook's for the same seeds, logprobs None (only vLLM gives them)."""
    from types import SimpleNamespace

    from tunelab.inference.rollouts import EngineRollouts, GrpoEngineRollouts

    class Trl:
        def _generate_single_turn(self, *args):
            return "trl's own path"

    settings = dict(use_vllm=False, accelerator=SimpleNamespace(num_processes=1, unwrap_model=lambda m: m),
                    model=lively.eval(), min_p=None, repetition_penalty=1.0, max_completion_length=4, temperature=1.0,
                    top_p=1.0, top_k=None, _tokenizer=tokenizer)
    grpo, rloo = type("G", (GrpoEngineRollouts, Trl), {})(), type("R", (EngineRollouts, Trl), {})()
    grpo.__dict__.update(settings)
    rloo.__dict__.update(settings)
    prompts = _prompts(tokenizer, 2) * 2
    torch.manual_seed(3)
    ids, logprobs = grpo._generate_single_turn(prompts, None, {}, 2)
    torch.manual_seed(3)
    assert logprobs is None and ids == rloo._generate_single_turn(prompts, None, {})
    grpo.use_transformers_continuous_batching = True
    assert grpo._generate_single_turn(prompts, None, {}, 2) == "trl's own path"


def test_eval_generation_uses_the_training_model_itself(tokenizer):
    """evals.generation.generate on a peft model in train mode: its current weights through the
    engine (the same text as generate()), and back in train mode afterwards."""
    from peft import LoraConfig, get_peft_model

    from tunelab.evals.generation import generate

    torch.manual_seed(2)
    model = get_peft_model(make_tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                                   init_lora_weights=False, lora_dropout=0.5)).train()
    prompts = ["a b c", "the quick brown fox jumps"]
    got = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert model.training
    model.eval()
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert got == [tokenizer.decode(t, skip_special_tokens=True).strip() for t in _reference(model, ids, 5)]
