"""The OpenAI-compatible server, live on loopback: the official `openai` client, errors, a load test."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import make_tiny_model

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tokenizer):
    import uvicorn

    from tunelab.inference.backends import build_engine
    from tunelab.inference.server import create_app

    model = make_tiny_model(tokenizer).eval()
    model.config.use_cache = True
    engine = build_engine("paged", model, tokenizer, kv_budget_tokens=4096, sampling=True)
    app = create_app(engine, "tiny", api_key=KEY, default_max_tokens=8)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "Plan a picnic for four people."}]


def test_chat_and_streaming_chat_agree(client):
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == 6 or choice.finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_completions_with_logprobs_from_the_model(client):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, logprobs=2, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == out.usage.completion_tokens == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)  # greedy picks the model's most likely token
    models = [m.id for m in client.models.list()]
    assert models == ["tiny"]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, status, code, param", [
    ('{"model": "tiny", "messages": [', 400, "invalid_json", None),
    ({"model": "nope", "messages": MESSAGES}, 404, "model_not_found", "model"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 5000}, 400, "context_length_exceeded", "max_tokens"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": "5"}, 400, "invalid_value", "max_tokens"),
    ({"model": "tiny", "messages": "hello"}, 400, "invalid_value", "messages"),
    ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, 400, "invalid_value", "temperature"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "messages.0.role"),
    ({"messages": MESSAGES}, 400, "invalid_value", "model"),
])
def test_bad_chat_requests_get_openai_style_4xx(base_url, body, status, code, param):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(f"{base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                          "Content-Type": "application/json"}, timeout=30, **kwargs)
    error = _error(response, status)
    assert (error["code"], error["param"]) == (code, param)


def test_bad_completion_requests_and_api_key(base_url):
    auth = {"Authorization": f"Bearer {KEY}"}
    error = _error(httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": ["a", "b"]},
                              headers=auth), 400)
    assert error["param"] == "prompt"
    error = _error(httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": "a", "logprobs": 9},
                              headers=auth), 400)
    assert error["param"] == "logprobs"
    assert _error(httpx.get(f"{base_url}/v1/models"), 401)["code"] == "invalid_api_key"
    assert _error(httpx.get(f"{base_url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


def test_load_32_concurrent_clients(base_url, client):
    """64 requests from 32 client threads on loopback: all answer, p50/p99 reported, KV back to empty."""
    def one(i: int) -> float:
        start = time.perf_counter()
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Request {i}: hi"}],
                                             max_tokens=4, temperature=0.7, seed=i)
        assert out.choices[0].message.content is not None
        return time.perf_counter() - start

    with ThreadPoolExecutor(32) as pool:
        latencies = sorted(pool.map(one, range(64)))
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\nload test: 64 requests, 32 clients: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    metrics = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert metrics["tokens_generated"] >= 64 * 1 and metrics["tokens_per_s"] > 0
    assert metrics["kv_summary"]["peak_running"] > 1  # requests really were batched together
    assert metrics["queue_depth"] == 0 and metrics["requests_in_flight"] == 0


def test_adapters_are_routed_by_model_name(tiny_model_dir, tmp_path):
    """Two LoRA adapters on one base, requests for both at once: each answer is what that adapter
    alone (merged) generates, so batches never mix adapters."""
    import torch
    from fastapi.testclient import TestClient
    from peft import LoraConfig, get_peft_model

    from tunelab.inference.backends import build_engine
    from tunelab.inference.base import SamplingParams
    from tunelab.inference.prompts import prompt_ids
    from tunelab.inference.server import create_app
    from tunelab.models.build import attach_adapters, load_for_eval

    for seed, name in enumerate("ab"):
        base, _tok = load_for_eval(str(tiny_model_dir))
        torch.manual_seed(seed)  # random (not zero) LoRA B, so the two adapters answer differently
        lora = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False))
        lora.save_pretrained(tmp_path / name)
    prompt = [{"role": "user", "content": "Pick a day."}]
    expected = {}
    for name in ("a", "b"):
        model, tok = load_for_eval(str(tmp_path / name))
        engine = build_engine("static", model, tok)
        expected[name] = engine.generate([prompt_ids(tok, prompt)], SamplingParams(max_new_tokens=5))[0].text
        engine.close()
    assert expected["a"] != expected["b"]

    model, tok = load_for_eval(str(tiny_model_dir))
    model = attach_adapters(model, {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    engine = build_engine("paged", model, tok, kv_budget_tokens=1024)
    try:
        with TestClient(create_app(engine, "base", adapters=["a", "b"])) as http, ThreadPoolExecutor(6) as pool:
            def ask(name):
                r = http.post("/v1/chat/completions", json={"model": name, "messages": prompt, "max_tokens": 5})
                return name, r.json()["choices"][0]["message"]["content"]

            answers = list(pool.map(ask, ["a", "b", "a", "b", "base", "a"]))
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["base", "a", "b"]
    finally:
        engine.close()
    for name, text in answers:
        if name != "base":
            assert text == expected[name], name
    assert {t for n, t in answers if n == "base"} != {expected["a"]}
