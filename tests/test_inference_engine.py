"""The generation engine interface: the static backend, text streams, KV accounting, backend choice
(the paged engine itself: tests/test_paged_engine.py)."""

from __future__ import annotations

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
