"""The OpenAI-compatible server, exercised with the real `openai` client and raw HTTP on loopback."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from helpers import common, run, start_server


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("served")
    run("train.py", common(tiny_llama, out, max_steps=2, per_device_train_batch_size=2, save_strategy="no"))
    proc, base = start_server(out, "--limit-concurrency", "2", "--max-queue", "2", "--model-name", "tiny",
                              "--max-body-bytes", "200000", "--max-messages", "50")
    yield base, out
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def long_model(tokenizers, tmp_path_factory) -> str:
    """A tiny model with a 32k context: its replies run long enough for slots to stay taken while a test looks."""
    from helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("long-context"), tokenizers["smollm2"], context=32768)


@pytest.fixture(scope="module")
def long_server(long_model):
    proc, base = start_server(long_model, "--limit-concurrency", "2", "--max-queue", "2")
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


@pytest.mark.slow
def test_models_chat_stream_and_completions(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    full = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=12)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 5
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=12, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == choice.message.content  # streamed == non-streamed for greedy decoding
    two = client.chat.completions.create(model="tiny", messages=MSGS, temperature=1.0, max_tokens=6, n=2, seed=7)
    again = client.chat.completions.create(model="tiny", messages=MSGS, temperature=1.0, max_tokens=6, n=2, seed=7)
    assert len(two.choices) == 2 and [c.message.content for c in two.choices] == [c.message.content for c in again.choices]
    comp = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=5)
    assert comp.choices[0].text is not None and comp.usage.completion_tokens <= 5


@pytest.mark.slow
@pytest.mark.parametrize("body,param", [
    ("not json", None), ([1, 2], None), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2**31}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),  # at most 4
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["s" * 65]}, "stop"),  # at most 64 characters each
    ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 25
      + [{"role": "user", "content": "x"}]}, "messages"),  # 51 messages > --max-messages 50
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),  # > the 1024-token context
])
def test_bad_requests_get_4xx_naming_the_parameter(server, body, param):
    import json

    server = server[0]
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert httpx.get(f"{server}/v1/models").status_code == 200  # still alive


@pytest.mark.slow
def test_concurrent_greedy_requests_match_sequential(client):
    prompts = [[{"role": "user", "content": f"Tell me about {w}."}] for w in ("cats", "rain", "tea", "maps", "owls", "jazz")]

    def ask(m):
        return client.chat.completions.create(model="tiny", messages=m, temperature=0, max_tokens=8).choices[0].message.content

    sequential = [ask(m) for m in prompts]
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:  # 2 decoded together, 2 waiting: all admitted
        concurrent_out = list(pool.map(ask, prompts, timeout=120))
    assert concurrent_out == sequential and time.time() - t0 < 120


@pytest.mark.slow
def test_api_keys(server):
    from openai import AuthenticationError, OpenAI

    proc, base = start_server(server[1], "--api-keys", "k1,k2")
    try:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert OpenAI(base_url=f"{base}/v1", api_key="k2", max_retries=0).models.list().data
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_limits_name_what_was_exceeded(server):
    base = server[0]
    big = httpx.post(f"{base}/v1/chat/completions", content=b"x" * 300_000, headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "200000 bytes" in big.json()["error"]["message"]
    many = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"},
                                                                         {"role": "assistant", "content": "y"}] * 30})
    assert many.status_code == 400 and "at most 50" in many.json()["error"]["message"]
    long = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 3000}]})
    assert long.status_code == 400 and "at most 1023 are allowed" in long.json()["error"]["message"]
    # max_tokens beyond the context is clamped to what fits, not refused
    r = httpx.post(f"{base}/v1/chat/completions", timeout=120,
                   json={"messages": MSGS, "max_tokens": 10**7, "temperature": 0, "stop": ["x" * 64] * 4})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 1024


def _hold_streams(base: str, count: int) -> list:
    """Open `count` long streams and read their first chunk: each holds a generation slot until closed."""
    held = []
    for _ in range(count):
        cm = httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                          json={"messages": MSGS, "max_tokens": 100000, "stream": True})
        resp = cm.__enter__()
        assert resp.status_code == 200
        lines = resp.iter_lines()  # kept: a discarded iterator closes the response
        next(lines)
        held.append((cm, lines))
    return held


@pytest.mark.slow
def test_admission_429_and_a_free_event_loop(long_server):
    """--limit-concurrency 2 running + --max-queue 2 waiting: the 5th concurrent generation gets 429 with
    Retry-After (streaming and not); /health and /v1/models answer at once meanwhile; closing frees every slot."""
    base = long_server
    held = _hold_streams(base, 4)
    try:
        for stream in (False, True):
            r = httpx.post(f"{base}/v1/chat/completions", json={"messages": MSGS, "stream": stream}, timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
        with httpx.Client(timeout=5) as c:  # one client: a new httpx.Client alone costs tens of ms (SSL context)
            took = []
            for path in ("/health", "/v1/models") * 5:
                t0 = time.perf_counter()
                assert c.get(f"{base}{path}").status_code == 200
                took.append(time.perf_counter() - t0)
        # < 100 ms as a rule (2-8 ms seen); a lone slower answer is the shared CI machine's scheduler, not the loop
        assert sorted(took)[len(took) // 2] < 0.1 and max(took) < 0.5, took
        health = httpx.get(f"{base}/health").json()
        assert health["running"] == 2 and health["waiting"] == 2 and health["admitted"] == 4
    finally:
        for cm, _ in held:
            cm.__exit__(None, None, None)
    _wait_idle(base)
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200


def _wait_idle(base: str, timeout: float = 10) -> dict:
    deadline = time.time() + timeout
    while True:
        health = httpx.get(f"{base}/health").json()
        if health["admitted"] == 0 and health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.time() < deadline, f"slots still held: {health}"
        time.sleep(0.05)


@pytest.mark.slow
def test_dropped_clients_free_their_slots_and_sigterm_exits_cleanly(long_model):
    """20 streams dropped mid-reply in a row against --limit-concurrency 1, then a non-streaming client that gives up:
    each generation is cancelled and the server answers normally. SIGTERM during a long generation: the grace period
    passes, the generation is cancelled, the process exits 0."""
    import signal

    proc, base = start_server(long_model, "--limit-concurrency", "1", "--max-queue", "0", "--graceful-shutdown", "1")
    try:
        for _ in range(20):
            with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                              json={"messages": MSGS, "max_tokens": 100000, "stream": True}) as resp:
                assert resp.status_code == 200  # max-queue 0: a slot still held by a dropped stream would be 429
                for i, _ in enumerate(resp.iter_lines()):
                    if i == 3:
                        break
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json={"messages": MSGS, "max_tokens": 100000}, timeout=0.5)
        _wait_idle(base)
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"

        held = _hold_streams(base, 1)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.time() - t0 < 15  # 1 s of grace, then the generation is cancelled
        for cm, _ in held:
            cm.__exit__(None, None, None)
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_tools_are_rendered_and_malformed_calls_stay_content(server):
    """A chatml model has no tool-call format (400 naming 'tools'); served with the qwen2.5 template, a named
    tool_choice makes the reply start with the call's opening, and a random model's malformed arguments come back
    as plain content with a normal finish_reason, streamed or not — never a 500."""
    base, out = server
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "2+2?"}]
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": msgs, "tools": tools}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{\"expr\": \"2+2\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"}]
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": history}, timeout=60)  # no tool format
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "cannot render" in r.text
    proc, qwen = start_server(out, "--conv-template", "qwen2.5")
    try:
        for body in ({"messages": msgs, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "calc"}}},
                     {"messages": msgs, "tools": tools, "tool_choice": "required"},
                     {"messages": history, "tools": tools}):
            r = httpx.post(f"{qwen}/v1/chat/completions", json={**body, "max_tokens": 8, "temperature": 0}, timeout=120)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            if choice["finish_reason"] == "tool_calls":
                assert choice["message"]["tool_calls"][0]["function"]["name"] == "calc"
            else:
                assert isinstance(choice["message"]["content"], str)
            if "tool_choice" in body and choice["finish_reason"] != "tool_calls":  # the forced opening, then garbage
                named = isinstance(body["tool_choice"], dict)
                assert choice["message"]["content"].startswith('<tool_call>\n{"name": "' + ('calc", "arguments": ' if named else ""))
            with httpx.stream("POST", f"{qwen}/v1/chat/completions", timeout=120,
                              json={**body, "max_tokens": 8, "temperature": 0, "stream": True}) as s:
                lines = [x for x in s.iter_lines() if x.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def app_client(tiny_llama):
    """The app in this process (no uvicorn): both generation routes run the shared admission/stream/usage code."""
    from fastapi.testclient import TestClient

    from serve.loading import load_for_chat
    from serve.openai_api_server import Limits, Service, create_app

    service = Service(load_for_chat(tiny_llama, conv_template="chatml"), "tiny", Limits(limit_concurrency=2, max_queue=2))
    with TestClient(create_app(service)) as c:
        yield c


def _sse(client, path: str, body: dict) -> list[dict]:
    import json

    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)
    return [json.loads(x[len("data: "):]) for x in lines[:-1]]


def test_chat_and_text_routes_share_streaming_usage_and_errors(app_client):
    """Greedy replies streamed equal them unstreamed on both routes, each choice ends with its finish_reason, the last
    chunk carries the usage, ids and objects are OpenAI's; a bad request names its parameter and holds no slot."""
    c = app_client
    for path, body, obj, prefix in (
            ("/v1/chat/completions", {"messages": MSGS}, "chat.completion", "chatcmpl-"),
            ("/v1/completions", {"prompt": "Once upon a time"}, "text_completion", "cmpl-")):
        body = {**body, "temperature": 0, "max_tokens": 6, "n": 2}
        full = c.post(path, json=body).json()
        assert full["object"] == obj and full["id"].startswith(prefix) and full["model"] == "tiny"
        assert [ch["index"] for ch in full["choices"]] == [0, 1]
        u = full["usage"]
        assert 0 < u["completion_tokens"] <= 12 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        chunks = _sse(c, path, body)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == u["prompt_tokens"]
        assert len({ch["id"] for ch in chunks}) == 1 and chunks[0]["id"].startswith(prefix)
        assert {ch["object"] for ch in chunks} == {"chat.completion.chunk" if obj == "chat.completion" else obj}
        for i, want in enumerate(full["choices"]):
            mine = [ch["choices"][0] for ch in chunks[:-1] if ch["choices"][0]["index"] == i]
            assert [m["finish_reason"] for m in mine][-1] == want["finish_reason"]
            assert all(m["finish_reason"] is None for m in mine[:-1])
            if obj == "chat.completion":
                assert mine[0]["delta"] == {"role": "assistant", "content": ""}
                assert "".join(m["delta"].get("content", "") for m in mine) == want["message"]["content"]
            else:
                assert "".join(m["text"] for m in mine) == want["text"] and want["logprobs"] is None
    for path, body, param in (("/v1/completions", {"prompt": ""}, "prompt"),
                              ("/v1/chat/completions", {"messages": MSGS, "stream": "yes"}, "stream"),
                              ("/v1/completions", {"prompt": "word " * 3000}, "prompt")):
        r = c.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    health = c.get("/health").json()
    assert health["admitted"] == 0 and health["running"] == 0 and health["waiting"] == 0
    assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
