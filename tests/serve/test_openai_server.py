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
    proc, base = start_server(out, "--limit-concurrency", "2", "--model-name", "tiny")
    yield base, out
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
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**7}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
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
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:  # bounded: 6 requests, 2 at a time on the server
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
