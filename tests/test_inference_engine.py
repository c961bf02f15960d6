"""The generation engine: paged vs static equality, cancellation, KV accounting, backend choice."""

from __future__ import annotations

import time

import pytest

from tests.conftest import make_tiny_model
from tunelab.errors import TunelabError
from tunelab.inference.backends import build_engine, choose_backend, load_engine
from tunelab.inference.base import SamplingParams, TextStream
from tunelab.inference.kv import KVLedger, static_batch_snapshots


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = make_tiny_model(tokenizer).eval()
    model.config.use_cache = True
    return model


def _prompts(tokenizer, n: int) -> list[list[int]]:
    """Prompts of clearly different lengths (4 to ~60 tokens)."""
    return [tokenizer(" ".join(["word"] * (3 + 9 * i)) + " end", add_special_tokens=False)["input_ids"] for i in range(n)]


def _greedy_tokens(backend, model, tokenizer, prompts, new, **options):
    engine = build_engine(backend, model, tokenizer, **options)
    try:
        return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=new))]
    finally:
        engine.close()


def test_paged_equals_static_greedy_on_embedded_model(embedded_dir):
    """The issue's check: the paged cache and continuous batching change nothing in greedy output."""
    from tunelab.inference.prompts import prompt_ids

    engine = load_engine("embedded", "static")
    model, tok = engine.model, engine.tokenizer
    questions = ["What is the capital of France?", "Name three colours.", "Say hello in Spanish."]
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    try:
        static = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=6))]
    finally:
        engine.close()
    paged = _greedy_tokens("paged", model, tok, prompts, 6, kv_budget_tokens=512, sampling=False)
    assert paged == static
    assert all(len(t) == 6 or t[-1] == tok.eos_token_id for t in paged)


def test_greedy_is_the_same_with_sampling_processors_on(tiny, tokenizer):
    """A sampling-capable engine runs greedy requests as top_k=1: the same tokens as a greedy-only one."""
    prompts = _prompts(tokenizer, 3)
    plain = _greedy_tokens("paged", tiny, tokenizer, prompts, 5, kv_budget_tokens=512, sampling=False)
    sampling = _greedy_tokens("paged", tiny, tokenizer, prompts, 5, kv_budget_tokens=512, sampling=True)
    static = _greedy_tokens("static", tiny, tokenizer, prompts, 5)
    assert plain == sampling == static


def test_cancel_frees_blocks(tiny, tokenizer):
    engine = build_engine("paged", tiny, tokenizer, kv_budget_tokens=1024, page_size=16, sampling=False)
    try:
        handle = engine.submit(_prompts(tokenizer, 4)[-1], SamplingParams(max_new_tokens=900))
        deadline = time.time() + 30
        while engine.kv()["now"]["blocks_in_use"] == 0 and time.time() < deadline:
            time.sleep(0.02)
        busy = engine.kv()["now"]
        assert busy["blocks_in_use"] > 0 and busy["reserved_bytes"] >= busy["live_bytes"] > 0
        engine.cancel(handle.id)
        assert list(handle.events())[-1].finish_reason == "cancelled"
        while engine.kv()["now"]["blocks_in_use"] and time.time() < deadline:
            time.sleep(0.02)
        now = engine.kv()["now"]
        assert (now["blocks_in_use"], now["reserved_bytes"], now["live_bytes"], now["waste_pct"], now["running"]) == (0, 0, 0, 0, 0)
    finally:
        engine.close()


def test_sampling_seed_and_stop_strings(tiny, tokenizer):
    engine = build_engine("static", tiny, tokenizer)
    try:
        prompt = _prompts(tokenizer, 2)[1]
        sample = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.9, seed=3)
        first, again = (engine.generate([prompt], sample)[0].token_ids for _ in range(2))
        assert first == again  # the same seed draws the same tokens
        full = engine.generate([prompt], SamplingParams(max_new_tokens=8))[0]
        stop = full.text[len(full.text) // 2 :][:3]
        cut = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop=(stop,)))[0]
        assert stop and cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    finally:
        engine.close()


def test_text_stream_holds_back_a_possible_stop_string(tokenizer):
    ids = tokenizer("The answer is 42. END of it", add_special_tokens=False)["input_ids"]
    stream, pieces = TextStream(tokenizer, ("END",)), []
    for i in ids:
        pieces.append(stream.push([i]))
        assert "E" not in "".join(pieces)  # never hand out the start of the stop string
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == stream.text == "The answer is 42. "


def test_static_kv_accounting_by_hand():
    # rows of 2 and 4 prompt tokens, left-padded to 4, generating 1 and 3 tokens over 3 steps
    snaps = static_batch_snapshots([2, 4], [1, 3], width=4, steps=3)
    assert [(s.reserved_tokens, s.live_tokens) for s in snaps] == [(8, 6), (10, 8), (12, 9)]
    ledger = KVLedger(bytes_per_token=10)
    for s in snaps:
        ledger.record(s)
    summary = ledger.summary()
    assert summary["kv_waste_pct"] == round(100 * (1 - 23 / 30), 2)
    assert summary["peak_reserved_bytes"] == 120


def test_paged_wastes_less_kv_than_static_at_the_same_budget(tiny, tokenizer, tmp_path):
    import json

    from tunelab.inference.bench import ROW_KEYS, bench

    prompts = _prompts(tokenizer, 6)
    log = tmp_path / "kv.jsonl"
    rows = bench(tiny, tokenizer, prompts, [6] * len(prompts), kv_budget_tokens=256, page_size=8, kv_log=log)
    static, paged = rows
    assert all(set(ROW_KEYS) <= set(r) for r in rows)
    assert paged["kv_waste_pct"] < static["kv_waste_pct"]
    assert paged["peak_running"] > static["peak_running"]  # more sequences fit in the same memory
    assert static["generated_tokens"] == paged["generated_tokens"] == 36
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert {s["backend"] for s in steps} == {"static", "paged"}
    assert all(s["reserved_bytes"] >= s["live_bytes"] > 0 and s["reserved_tokens"] <= 256 for s in steps)


def test_backend_choice_and_vllm_refusal(monkeypatch):
    from tunelab.inference import vllm_backend

    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    assert choose_backend("auto") == "paged"
    monkeypatch.setattr(vllm_backend, "available", lambda: True)
    assert choose_backend("auto") == "vllm"
    assert choose_backend("static") == "static"
    with pytest.raises(TunelabError, match="choose one of"):
        choose_backend("fast")
    monkeypatch.setattr(vllm_backend.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunelabError, match="vLLM is not installed"):
        load_engine("embedded", "vllm")


def test_bad_sampling_params_name_the_field():
    with pytest.raises(TunelabError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(TunelabError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
