"""OpenAI-compatible HTTP server for a chattune model, in one process (FastAPI + uvicorn).

    python -m serve.openai_api_server --model-path OUT [--host 127.0.0.1 --port 8000] [--api-keys k1,k2]

Endpoints: GET /v1/models, POST /v1/chat/completions (streaming SSE or not), POST /v1/completions.
Honours temperature, top_p, max_tokens, stop, n, seed; reports token usage. Bad requests get a 4xx with
an OpenAI-style error naming the parameter. Generations run at most `--limit-concurrency` at a time;
further requests wait in line.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (string) annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from data.tokenize import encode_prompt
from serve.generation import GenerationResult, SamplingParams, stream_generate
from serve.loading import LoadedModel, ServeLoadError, add_model_args, load_from_args


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return int(value) if integer else float(value)


def sampling_from(body: dict, loaded: LoadedModel, prompt_tokens: int, chat: bool = True) -> tuple[SamplingParams, int]:
    room = loaded.context_length - prompt_tokens
    if room < 1:
        raise RequestError(f"the prompt has {prompt_tokens} tokens; the model's context is {loaded.context_length}",
                           "messages" if "messages" in body else "prompt")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = min(512, room)
    else:
        max_tokens = _number(body, "max_tokens" if "max_tokens" in body else "max_completion_tokens", None, 1, 1e9,
                             integer=True)
        if max_tokens > room:
            raise RequestError(f"'max_tokens' is {max_tokens} but only {room} tokens fit after the {prompt_tokens}-token "
                               f"prompt (context {loaded.context_length})", "max_tokens")
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise RequestError("'stop' must be a string or a list of up to 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 10, lo_open=True),
        max_new_tokens=max_tokens, seed=seed, stop=stops + (loaded.stop_strings if chat else []))
    n = _number(body, "n", 1, 1, 8, integer=True)
    return params, n


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object", "messages")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, user or assistant, got {role!r}", "messages")
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f"messages[{i}].content parts must all be text", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", "messages")
        if role == "system" and i != 0:
            raise RequestError(f"messages[{i}]: a system message may only come first", "messages")
        out.append({"role": role, "content": content})
    body_start = 1 if out[0]["role"] == "system" else 0
    for j, m in enumerate(out[body_start:]):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RequestError(f"messages[{body_start + j}] must be a {expected} message (turns alternate, starting "
                               "with the user)", "messages")
    if out[-1]["role"] != "user":
        raise RequestError("the last message must be from the user", "messages")
    return out


class Service:
    """The model plus a bounded line of generations (requests beyond the limit wait)."""

    def __init__(self, loaded: LoadedModel, model_name: str, limit: int):
        self.loaded = loaded
        self.model_name = model_name
        self.slots = threading.BoundedSemaphore(limit)

    def generate(self, ids: list[int], params: SamplingParams, n: int) -> list[GenerationResult]:
        results = []
        for i in range(n):
            p = SamplingParams(**{**params.__dict__, "seed": None if params.seed is None else params.seed + i})
            r = GenerationResult()
            with self.slots:
                for _ in stream_generate(self.loaded.model, self.loaded.tokenizer, ids, p, self.loaded.stop_token_ids, r):
                    pass
            results.append(r)
        return results

    def stream(self, ids: list[int], params: SamplingParams, result: GenerationResult) -> Iterator[str]:
        with self.slots:
            yield from stream_generate(self.loaded.model, self.loaded.tokenizer, ids, params,
                                       self.loaded.stop_token_ids, result)


def create_app(service: Service, api_keys: list[str] | None = None):
    app = FastAPI(title="chattune OpenAI-compatible API")

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(status_code=e.status, content={"error": {"message": e.message, "type": e.kind,
                                                                     "param": e.param, "code": None}})

    def check_auth(request: Request) -> None:
        if api_keys:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in api_keys:
                raise RequestError("invalid or missing API key", None, 401, "authentication_error")

    async def read_body(request: Request) -> dict:
        check_auth(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request body is not valid JSON: {e}", None) from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object", None)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", "stream")
        return body

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error(e)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "chattune"}]}

    def usage(prompt: int, results: list[GenerationResult]) -> dict:
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def streaming(kind: str, rid: str, ids: list[int], params: SamplingParams, n: int):
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, delta: str | None, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": index, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": [choice]}

        def events():
            results = []
            for i in range(n):
                p = SamplingParams(**{**params.__dict__, "seed": None if params.seed is None else params.seed + i})
                r = GenerationResult()
                if kind == "chat":
                    yield sse(chunk(i, None, None, role=True))
                for delta in service.stream(ids, p, r):
                    yield sse(chunk(i, delta, None))
                yield sse(chunk(i, None, r.finish_reason))
                results.append(r)
            final = {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": [],
                     "usage": usage(len(ids), results)}
            yield sse(final)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from starlette.concurrency import run_in_threadpool

        body = await read_body(request)
        messages = chat_messages(body)
        ids = encode_prompt(messages, service.loaded.tokenizer, service.loaded.template)
        params, n = sampling_from(body, service.loaded, len(ids))
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        if body.get("stream"):
            return streaming("chat", rid, ids, params, n)
        results = await run_in_threadpool(service.generate, ids, params, n)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": service.model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "finish_reason": r.finish_reason} for i, r in enumerate(results)],
                "usage": usage(len(ids), results)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        from starlette.concurrency import run_in_threadpool

        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("'prompt' must be a non-empty string", "prompt")
        ids = service.loaded.tokenizer(prompt).input_ids
        params, n = sampling_from(body, service.loaded, len(ids), chat=False)
        rid = f"cmpl-{secrets.token_hex(12)}"
        if body.get("stream"):
            return streaming("text", rid, ids, params, n)
        results = await run_in_threadpool(service.generate, ids, params, n)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": service.model_name,
                "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                            for i, r in enumerate(results)],
                "usage": usage(len(ids), results)}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.openai_api_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", help="comma-separated keys; requests must send `Authorization: Bearer KEY`")
    p.add_argument("--limit-concurrency", type=int, default=1, help="generations at once; the rest wait in line")
    args = p.parse_args(argv)
    if args.limit_concurrency < 1:
        p.error("--limit-concurrency must be >= 1")
    try:
        loaded = load_from_args(args)
    except (ServeLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import os

    import uvicorn

    name = args.model_name or os.path.basename(os.path.normpath(args.model_path))
    keys = [k.strip() for k in args.api_keys.split(",") if k.strip()] if args.api_keys else None
    app = create_app(Service(loaded, name, args.limit_concurrency), keys)
    print(f"[serve] {loaded.kind} model {name!r} (template {loaded.template}) on http://{args.host}:{args.port}/v1",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
