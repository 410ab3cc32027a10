"""OpenAI-compatible HTTP server for a chattune model, in one process (FastAPI + uvicorn).

    python -m serve.openai_api_server --model-path OUT [--host 127.0.0.1 --port 8000] [--api-keys k1,k2]

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions (streaming SSE or not), POST /v1/completions.
Honours temperature, top_p, max_tokens, stop, n, seed, repetition_penalty; reports token usage.
Tools as OpenAI has them: `tools` and `tool_choice` (auto, none, required, a named function) are rendered with the
training template; the reply comes back as `tool_calls` (finish_reason "tool_calls"; streamed as OpenAI streams
them) and `reasoning_content` beside `content` (serve/tool_parsing.py). Malformed model output stays content.

Built to face real clients:
- every input is bounded (body size → 413; messages, prompt tokens, stop strings, n → 400 naming the limit;
  max_tokens is clamped to what fits in the context);
- concurrent requests are decoded together (serve/batching.py): at most `--limit-concurrency` generations run,
  at most `--max-queue` wait, beyond that 429 with Retry-After;
- parsing, tokenization and generation never run on the event loop, so /health and /v1/models answer at once;
- a client that goes away (streaming or not) has its generation cancelled within one decode step;
- SIGTERM stops accepting, gives in-flight generations `--graceful-shutdown` seconds, cancels the rest, exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import signal
import sys
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request  # module level: FastAPI resolves the (string) annotations here
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from data.pieces import TemplateError
from data.tokenize import encode_prompt
from data.tokenizer import run_encoder
from serve.batching import BatchEngine, Ticket
from serve.generation import GenerationResult, SamplingParams
from serve.loading import LoadedModel, ServeLoadError, add_model_args, load_from_args
from serve.tool_parsing import (
    StreamParser,
    ToolRequestError,
    call_format,
    forced_call_prefix,
    parse_reply,
    prompt_opens_think,
    request_messages,
    request_tools,
)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Defaults are what a public deployment would pick."""

    max_body_bytes: int = 2 * 1024 * 1024  # --max-body-bytes: larger bodies get 413 before they are read
    max_messages: int = 256  # --max-messages
    max_prompt_tokens: int | None = None  # --max-prompt-tokens (default: the model's context minus one)
    max_stop: int = 4  # OpenAI's limit
    max_stop_chars: int = 64  # --max-stop-chars, per stop string
    max_n: int = 8  # --max-n
    limit_concurrency: int = 8  # --limit-concurrency: generations decoded together
    max_queue: int = 16  # --max-queue: generations waiting for a slot; more get 429
    retry_after_s: int = 1


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.headers = message, param, status, kind, headers


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return int(value) if integer else float(value)


def parse_sampling(body: dict, limits: Limits) -> tuple[SamplingParams, int]:
    """Sampling parameters and n, validated before any tokenization (max_tokens is clamped later, once the
    prompt's length is known)."""
    name = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
    max_tokens = _number(body, name, None, 1, 2**31 - 1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise RequestError(f"'stop' must be a string or a list of up to {limits.max_stop} strings", "stop")
    if len(stops) > limits.max_stop:
        raise RequestError(f"'stop' has {len(stops)} strings; at most {limits.max_stop} are allowed", "stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise RequestError(f"each 'stop' string may have at most {limits.max_stop_chars} characters", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 10, lo_open=True),
        max_new_tokens=max_tokens or 0, seed=seed, stop=stops)
    return params, _number(body, "n", 1, 1, limits.max_n, integer=True)


def fit_to_context(params: SamplingParams, prompt_tokens: int, loaded: LoadedModel, limits: Limits, param: str,
                   chat: bool) -> SamplingParams:
    """The prompt must leave room for one token; max_tokens (default 512) is clamped to the room left."""
    limit = min(limits.max_prompt_tokens or loaded.context_length - 1, loaded.context_length - 1)
    if prompt_tokens > limit:
        raise RequestError(f"the prompt has {prompt_tokens} tokens; at most {limit} are allowed (the model's context "
                           f"is {loaded.context_length})", param)
    room = loaded.context_length - prompt_tokens
    return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens or 512, room),
                               stop=params.stop + (loaded.stop_strings if chat else []))


def chat_messages(body: dict, limits: Limits) -> list[dict]:
    try:
        return request_messages(body.get("messages"), limits.max_messages)
    except ToolRequestError as e:
        raise RequestError(str(e), e.param) from None


@dataclass
class ChatTools:
    """What a chat request asked of tools, and how its replies are read back."""

    tools: list[dict] | None = None
    forced_prefix: str = ""  # a named tool_choice: the reply starts with this call's opening

    @property
    def known(self) -> set[str] | None:
        return {t["function"]["name"] for t in self.tools} if self.tools else None


class Service:
    """The model, its batch engine and the admission count (running + waiting generations)."""

    def __init__(self, loaded: LoadedModel, model_name: str, limits: Limits = Limits()):
        self.loaded, self.model_name, self.limits = loaded, model_name, limits
        self.engine = BatchEngine(loaded.model, loaded.tokenizer, max_batch=limits.limit_concurrency)
        self.admitted = 0  # touched on the event loop only

    def admit(self, n: int) -> Lease:
        """Claim n generations (429 beyond running + waiting capacity); the lease gives them back when closed."""
        if self.admitted + n > self.limits.limit_concurrency + self.limits.max_queue:
            raise RequestError(f"the server is at capacity ({self.limits.limit_concurrency} generations running, "
                               f"{self.limits.max_queue} waiting); retry shortly", None, 429, "rate_limit_error",
                               {"Retry-After": str(self.limits.retry_after_s)})
        self.admitted += n
        return Lease(self, n)

    def submit(self, ids: list[int], params: SamplingParams, n: int) -> tuple[list[Ticket], asyncio.Queue]:
        """Start n generations; their events arrive on one asyncio queue as (index, kind, payload)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        tickets = []
        for i in range(n):
            p = dataclasses.replace(params, seed=None if params.seed is None else params.seed + i)

            def emit(kind, payload, i=i):
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, kind, payload))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                    pass

            tickets.append(self.engine.submit(ids, p, self.loaded.stop_token_ids, emit))
        return tickets, events


class Lease:
    """A request's claim on the service: n admitted generations. `close()` (idempotent) cancels whatever still runs
    and gives the admission back, on every way out: finished, failed, client gone, task cancelled."""

    def __init__(self, service: Service, n: int):
        self.service, self.n = service, n
        self.tickets: list[Ticket] = []
        self.closed = False

    def start(self, ids: list[int], params: SamplingParams) -> asyncio.Queue:
        self.tickets, queue = self.service.submit(ids, params, self.n)
        return queue

    def close(self) -> None:
        for t in self.tickets:
            t.cancel()
        if not self.closed:
            self.closed = True
            self.service.admitted -= self.n


class LeasedStream(StreamingResponse):
    """A streaming response that closes its lease even when its body never started (client gone before the
    first byte): an unstarted async generator's `finally` never runs."""

    def __init__(self, body, lease: Lease):
        super().__init__(body, media_type="text/event-stream")
        self.lease = lease

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.close()


def create_app(service: Service, api_keys: list[str] | None = None):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.engine.stop()  # after uvicorn's graceful period: cancel whatever is left

    app = FastAPI(title="chattune OpenAI-compatible API", lifespan=lifespan)
    limits = service.limits

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(status_code=e.status, headers=e.headers,
                            content={"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})

    def check_auth(request: Request) -> None:
        if api_keys:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in api_keys:
                raise RequestError("invalid or missing API key", None, 401, "authentication_error")

    async def read_body(request: Request) -> dict:
        check_auth(request)
        too_big = RequestError(f"the request body is larger than {limits.max_body_bytes} bytes", None, 413)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_big  # refused before reading a byte of it
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if size < 65536 else await run_in_threadpool(json.loads, raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request body is not valid JSON: {e}", None) from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object", None)
        if not isinstance(body.get("stream", False), bool):
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

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": service.engine.running, "waiting": service.engine.waiting,
                "admitted": service.admitted, "limit_concurrency": limits.limit_concurrency,
                "max_queue": limits.max_queue}

    def usage(prompt: int, results: list[GenerationResult]) -> dict:
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    tok0 = service.loaded.tokenizer
    fmt = call_format(service.loaded.template, tok0)
    think_opened = prompt_opens_think(service.loaded.template, tok0)

    async def prepare(request: Request, chat: bool):
        """Body → (body, prompt ids, sampling params, the lease of its admitted generations, its tools)."""
        body = await read_body(request)
        params, n = parse_sampling(body, limits)
        tools = ChatTools()
        if chat:
            messages = chat_messages(body, limits)
            try:
                tools.tools, forced = request_tools(body, fmt)
            except ToolRequestError as e:
                raise RequestError(str(e), e.param) from None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise RequestError("'prompt' must be a non-empty string", "prompt")
        lease = service.admit(n)  # before tokenizing: an over-capacity request costs no CPU
        try:
            tok = service.loaded.tokenizer
            if chat:
                template = service.loaded.template
                ids = await run_in_threadpool(encode_prompt, messages, tok, template, tools.tools,
                                              False if forced is not None else None)
                if forced is not None:  # the reply must call (this) function: it begins with a call's opening
                    tools.forced_prefix = forced_call_prefix(template, tok, forced, tools.tools)
                    ids = ids + run_encoder(tok).encode_text(tools.forced_prefix, at_start=False)
            else:
                ids = await run_in_threadpool(lambda: tok(prompt).input_ids)
            params = fit_to_context(params, len(ids), service.loaded, limits, "messages" if chat else "prompt", chat)
        except TemplateError as e:  # e.g. tool history for a template without a tool format, parallel calls for one
            lease.close()  # that takes one call per turn
            raise RequestError(f"the model's chat template cannot render these messages: {e}", "messages") from None
        except BaseException:
            lease.close()
            raise
        return body, ids, params, lease, tools

    def streaming(kind: str, rid: str, ids: list[int], params: SamplingParams, lease: Lease,
                  tools: ChatTools | None = None) -> StreamingResponse:
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, delta: str | dict | None, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                d = {"role": "assistant", "content": ""} if role else \
                    (delta if isinstance(delta, dict) else {"content": delta} if delta is not None else {})
                choice = {"index": index, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": [choice]}

        n = lease.n

        async def events():
            # Runs as the response's task: a client that disconnects cancels it (starlette listens for
            # http.disconnect), and the lease cancels the generations, so no slot is held by a dead client.
            try:
                queue = lease.start(ids, params)
                parsers = []
                if kind == "chat":
                    for i in range(n):
                        yield sse(chunk(i, None, None, role=True))
                        parsers.append(StreamParser(fmt, tools.known, think_opened))
                        parsers[i].feed(tools.forced_prefix)
                pending = n
                while pending:
                    i, what, payload = await queue.get()
                    if what == "delta":
                        if kind != "chat":
                            yield sse(chunk(i, payload, None))
                        for field, text in parsers[i].feed(payload) if kind == "chat" else []:
                            yield sse(chunk(i, {field: text}, None))
                    elif what == "error":
                        yield sse({"error": {"message": payload, "type": "server_error", "param": None, "code": None}})
                        return
                    else:
                        pending -= 1
                        finish = payload.finish_reason
                        if kind == "chat":
                            events, calls = parsers[i].finish()
                            for field, text in events:
                                yield sse(chunk(i, {field: text}, None))
                            for k, call in enumerate(calls):  # OpenAI's shape: name first, then the arguments
                                head = {"index": k, "id": call["id"], "type": "function",
                                        "function": {"name": call["function"]["name"], "arguments": ""}}
                                yield sse(chunk(i, {"tool_calls": [head]}, None))
                                yield sse(chunk(i, {"tool_calls": [{"index": k, "function": {
                                    "arguments": call["function"]["arguments"]}}]}, None))
                            finish = "tool_calls" if calls else finish
                        yield sse(chunk(i, None, finish))
                final = {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": [],
                         "usage": usage(len(ids), [t.result for t in lease.tickets])}
                yield sse(final)
                yield "data: [DONE]\n\n"
            finally:
                lease.close()

        return LeasedStream(events(), lease)

    async def complete(request: Request, ids: list[int], params: SamplingParams, lease: Lease) -> list[GenerationResult]:
        """Wait for the lease's generations; cancel them the moment the client disconnects."""
        try:
            queue = lease.start(ids, params)
            pending = lease.n
            checked = time.monotonic()
            while pending:
                try:
                    i, what, payload = await asyncio.wait_for(queue.get(), timeout=0.2)
                except TimeoutError:
                    what = None
                if time.monotonic() - checked >= 0.2:  # deltas may keep coming: look at the client on a clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return []
                if what == "error":
                    raise RequestError(payload, None, 500, "server_error")
                if what == "done":
                    pending -= 1
            return [t.result for t in lease.tickets]
        finally:
            lease.close()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, ids, params, lease, tools = await prepare(request, chat=True)
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        if body.get("stream"):
            return streaming("chat", rid, ids, params, lease, tools)
        results = await complete(request, ids, params, lease)
        choices = []
        for i, r in enumerate(results):
            parsed = parse_reply(tools.forced_prefix + r.text, fmt, tools.known, think_opened)
            message = {"role": "assistant", "content": parsed.content or (None if parsed.tool_calls else "")}
            if parsed.reasoning is not None:
                message["reasoning_content"] = parsed.reasoning
            if parsed.tool_calls:
                message["tool_calls"] = parsed.tool_calls
            choices.append({"index": i, "message": message,
                            "finish_reason": "tool_calls" if parsed.tool_calls else r.finish_reason})
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": service.model_name,
                "choices": choices, "usage": usage(len(ids), results)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, ids, params, lease, _ = await prepare(request, chat=False)
        rid = f"cmpl-{secrets.token_hex(12)}"
        if body.get("stream"):
            return streaming("text", rid, ids, params, lease)
        results = await complete(request, ids, params, lease)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": service.model_name,
                "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                            for i, r in enumerate(results)],
                "usage": usage(len(ids), results)}

    return app


def main(argv: list[str] | None = None) -> int:
    d = Limits()
    p = argparse.ArgumentParser(prog="python -m serve.openai_api_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--model-name", help="model id reported by /v1/models (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", help="comma-separated keys; requests must send `Authorization: Bearer KEY`")
    p.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                   help=f"generations decoded together (default {d.limit_concurrency})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"generations that may wait for a slot; beyond, 429 with Retry-After (default {d.max_queue})")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies get 413")
    p.add_argument("--max-messages", type=int, default=d.max_messages, help="messages per chat request")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="prompt tokens per request (default: the model's context minus one)")
    p.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters per stop string")
    p.add_argument("--max-n", type=int, default=d.max_n, help="choices per request (n)")
    p.add_argument("--graceful-shutdown", type=float, default=30.0,
                   help="seconds in-flight generations get after SIGTERM before they are cancelled (default 30)")
    args = p.parse_args(argv)
    for flag in ("limit_concurrency", "max_body_bytes", "max_messages", "max_stop_chars", "max_n"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or args.graceful_shutdown < 0:
        p.error("--max-queue and --graceful-shutdown must be >= 0")
    limits = Limits(args.max_body_bytes, args.max_messages, args.max_prompt_tokens, d.max_stop, args.max_stop_chars,
                    args.max_n, args.limit_concurrency, args.max_queue)
    try:
        loaded = load_from_args(args)
    except (ServeLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import os

    import uvicorn

    name = args.model_name or os.path.basename(os.path.normpath(args.model_path))
    keys = [k.strip() for k in args.api_keys.split(",") if k.strip()] if args.api_keys else None
    app = create_app(Service(loaded, name, limits), keys)
    print(f"[serve] {loaded.kind} model {name!r} (template {loaded.template}) on http://{args.host}:{args.port}/v1; "
          f"{limits.limit_concurrency} concurrent generations, {limits.max_queue} queued", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.graceful_shutdown))
    # uvicorn re-raises the signal it shut down for once it is done, under the handler that was there before;
    # a no-op one turns a clean SIGTERM shutdown into exit status 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    print("[serve] stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
