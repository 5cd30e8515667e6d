"""Test harness: fake backends that speak the real wire formats, and the proxy, on loopback.

The servers run on one asyncio loop in a background thread, so tests can drive the proxy with the
official (synchronous) anthropic SDK exactly as a user would. Each fake backend serves a queue of
scripted answers and records every request it received. At the end: the requests, answers and checks
the tests share (valid requests, tool-call fragments, the Anthropic SSE grammar check, error assertions).
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import pathlib
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp
import anthropic
import pytest
from aiohttp import web

import claude_proxy

HERE = pathlib.Path(__file__).parent
FIXTURES = HERE / "fixtures"  # real Claude Code requests, the token corpus

# --- a loop in a thread ---------------------------------------------------------------------------


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


async def start_site(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.05)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, port


@pytest.fixture(scope="session")
def cp_without_orjson():
    """claude_proxy loaded once more with orjson hidden: its stdlib JSON path, whether orjson is installed or not."""
    spec = importlib.util.spec_from_file_location("claude_proxy_without_orjson", HERE / "claude_proxy.py")
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("orjson")
    sys.modules["orjson"] = None  # type: ignore[assignment]
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
        if saved is None:
            sys.modules.pop("orjson", None)
        else:
            sys.modules["orjson"] = saved
    assert module._orjson is None
    return module


# --- what real servers send -------------------------------------------------------------------------


def oai_chunk(
    delta: Optional[dict] = None,
    finish: Optional[str] = None,
    *,
    model: str = "m",
    usage: Any = None,
    choices: Optional[list] = None,
    **extra: Any,
) -> dict:
    """One chat.completion.chunk as OpenAI/vLLM send it."""
    chunk = {
        "id": "chatcmpl-7f3a9c",
        "object": "chat.completion.chunk",
        "created": 1764230400,
        "model": model,
        "system_fingerprint": "fp_44709d6fcb",
    }
    if choices is None:
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        choice.update(extra)
        choices = [choice]
    chunk["choices"] = choices
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def oai_usage(prompt: int = 12, completion: int = 7, cached: int = 0, reasoning: int = 0) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def oai_text_stream(*pieces: str, finish: str = "stop", usage: Optional[dict] = None, **extra: Any) -> list:
    """role chunk, one content chunk per piece, finish chunk, usage chunk (choices: [])."""
    chunks = [oai_chunk({"role": "assistant", "content": ""})]
    chunks += [oai_chunk({"content": p}) for p in pieces]
    chunks.append(oai_chunk({}, finish, **extra))
    chunks.append(oai_chunk(choices=[], usage=usage or oai_usage()))
    return chunks


def oai_tool_call_chunks(index: int, call_id: str, name: str, *arg_pieces: str) -> list:
    """OpenAI shape: first fragment has index, id, type, name and empty arguments; then argument pieces."""
    first = oai_chunk(
        {
            "tool_calls": [
                {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            ]
        }
    )
    rest = [oai_chunk({"tool_calls": [{"index": index, "function": {"arguments": p}}]}) for p in arg_pieces]
    return [first] + rest


def oai_completion(
    content: Optional[str] = "Hi",
    tool_calls: Optional[list] = None,
    finish: str = "stop",
    usage: Optional[dict] = None,
    **message_extra: Any,
) -> dict:
    message = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
    if tool_calls:
        message["tool_calls"] = tool_calls
    message.update(message_extra)
    return {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "m",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage or oai_usage(),
    }


def ollama_chunk(
    content: str = "",
    *,
    thinking: Optional[str] = None,
    tool_calls: Optional[list] = None,
    done: bool = False,
    done_reason: str = "stop",
    prompt: int = 26,
    completion: int = 10,
    model: str = "qwen3:8b",
) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking is not None:
        message["thinking"] = thinking
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    obj: dict[str, Any] = {
        "model": model,
        "created_at": "2026-11-27T10:00:00.123456789Z",
        "message": message,
        "done": done,
    }
    if done:
        obj.update(
            done_reason=done_reason,
            total_duration=4883583458,
            load_duration=1334875,
            prompt_eval_count=prompt,
            prompt_eval_duration=342546000,
            eval_count=completion,
            eval_duration=4535599000,
        )
    return obj


def ollama_text_stream(*pieces: str, done_reason: str = "stop", prompt: int = 26, completion: int = 10) -> list:
    return [ollama_chunk(p) for p in pieces] + [
        ollama_chunk(done=True, done_reason=done_reason, prompt=prompt, completion=completion)
    ]


def sse_bytes(chunk: Any, end: bytes = b"\n\n") -> bytes:
    """One event of an OpenAI-style stream on the wire: `data: <chunk>` (a dict as JSON, a str as is)."""
    return b"data: " + (chunk if isinstance(chunk, str) else json.dumps(chunk)).encode() + end


def ndjson_bytes(obj: Any) -> bytes:
    """One line of an Ollama stream on the wire."""
    return (json.dumps(obj) + "\n").encode()


# --- scripted answers -------------------------------------------------------------------------------


@dataclass
class SSE:
    """An OpenAI-style event stream: `data: <json>\\n\\n` per chunk, then `data: [DONE]`."""

    chunks: list
    done: bool = True
    delay: float = 0.0  # between chunks
    first_delay: float = 0.0  # before the first chunk (after the headers)
    crlf: bool = False


@dataclass
class NDJSON:
    """Ollama's stream: one JSON object per line."""

    objects: list
    delay: float = 0.0
    first_delay: float = 0.0


@dataclass
class Reply:
    """A plain HTTP answer (JSON errors, non-streaming bodies, HTML pages)."""

    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes as is
    headers: dict = field(default_factory=dict)
    content_type: str = "application/json"
    delay: float = 0.0


def text_answer(provider: str, *texts: str) -> Any:
    """A plain text answer, streamed the way the provider streams it."""
    return SSE(oai_text_stream(*texts)) if provider == "openai" else NDJSON(ollama_text_stream(*texts))


class FakeBackend:
    """An OpenAI-compatible server (/v1/chat/completions, /v1/models) and an Ollama one (/api/chat,
    /api/tags) in one app. `script` is a queue of answers; `requests` records what arrived."""

    def __init__(self) -> None:
        self.script: list[Any] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.models_openai = [
            {"id": "qwen3-coder", "object": "model", "created": 1700000000, "owned_by": "vllm", "max_model_len": 32768}
        ]
        self.models_ollama = [
            {"name": "qwen3:8b", "model": "qwen3:8b", "size": 5200000000},
            {"name": "qwen3:1.7b", "model": "qwen3:1.7b", "size": 1400000000},
        ]
        self.disconnects = 0
        self.tokenizer: Optional[str] = None  # None, "vllm" or "llamacpp": which /tokenize it serves
        self.port = 0

    def queue(self, *answers: Any) -> None:
        self.script.extend(answers)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/api/chat", self.chat)
        app.router.add_get("/v1/models", self.openai_models)
        app.router.add_get("/api/tags", self.ollama_tags)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/apply-template", self.apply_template)
        return app

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM: {"messages": [...]} -> {"count"}; llama.cpp: {"content": str} -> {"tokens": [...]}."""
        body = await request.json()
        self.requests.append({"tokenize": body})
        if self.tokenizer == "vllm" and "messages" in body:
            return web.json_response({"count": 321, "max_model_len": 32768, "tokens": list(range(321))})
        if self.tokenizer == "llamacpp" and "content" in body:
            return web.json_response({"tokens": list(range(len(body["content"].split())))})
        return web.json_response(
            {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}, status=404
        )

    async def apply_template(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.tokenizer != "llamacpp":
            return web.Response(status=404, text="Not Found")
        return web.json_response(
            {"prompt": " ".join(m["content"] for m in body["messages"] if isinstance(m.get("content"), str))}
        )

    async def openai_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.models_openai})

    async def ollama_tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": self.models_ollama})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        ollama = request.path == "/api/chat"
        answer = (
            self.script.pop(0)
            if self.script
            else (NDJSON(ollama_text_stream("Hello", "!")) if ollama else SSE(oai_text_stream("Hello", "!")))
        )
        if (
            body.get("stream")
            and not ollama
            and not (body.get("stream_options") or {}).get("include_usage")
            and isinstance(answer, SSE)
        ):
            answer = SSE(
                [c for c in answer.chunks if not (isinstance(c, dict) and c.get("choices") == [])],
                answer.done,
                answer.delay,
                answer.first_delay,
                answer.crlf,
            )
        if callable(answer):
            return await answer(request)
        try:
            if isinstance(answer, Reply):
                await asyncio.sleep(answer.delay)
                data = answer.body
                if isinstance(data, (dict, list)):
                    data = json.dumps(data)
                return web.Response(
                    status=answer.status,
                    body=data if isinstance(data, bytes) else (data or "").encode(),
                    headers={"content-type": answer.content_type, **answer.headers},
                )
            if isinstance(answer, SSE):
                resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
                await resp.prepare(request)
                await asyncio.sleep(answer.first_delay)
                end = b"\r\n\r\n" if answer.crlf else b"\n\n"
                for i, chunk in enumerate(answer.chunks):
                    if i and answer.delay:
                        await asyncio.sleep(answer.delay)
                    await resp.write(chunk if isinstance(chunk, bytes) else sse_bytes(chunk, end))
                if answer.done:
                    await resp.write(sse_bytes("[DONE]", end))
                return resp
            if isinstance(answer, NDJSON):
                resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
                await resp.prepare(request)
                await asyncio.sleep(answer.first_delay)
                for i, obj in enumerate(answer.objects):
                    if i and answer.delay:
                        await asyncio.sleep(answer.delay)
                    await resp.write(obj if isinstance(obj, bytes) else ndjson_bytes(obj))
                return resp
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        raise AssertionError(f"unknown scripted answer {answer!r}")


_SSL_CONTEXT = ssl.create_default_context()


@dataclass
class Stack:
    backend: FakeBackend
    backend_url: str
    proxy_url: str
    config: claude_proxy.Config
    app: web.Application
    loop: LoopThread

    clients: list = field(default_factory=list)

    def client(self, **kw: Any) -> anthropic.Anthropic:
        kw.setdefault("max_retries", 0)
        kw.setdefault("api_key", "sk-ant-test")
        # The SDK's default HTTP client loads the CA bundle (~30 ms) for every client: share one SSL context.
        kw.setdefault("http_client", anthropic.DefaultHttpxClient(verify=_SSL_CONTEXT))
        client = anthropic.Anthropic(base_url=self.proxy_url, **kw)
        self.clients.append(client)
        return client


@pytest.fixture
def make_stack(loop_thread):
    """make_stack(provider="openai", backend=None, **config) -> a fake backend and a proxy in front of it."""
    runners: list[web.AppRunner] = []
    stacks: list[Stack] = []

    def make(provider: str = "openai", backend: Any = None, **overrides: Any) -> Stack:
        """backend: FakeBackend() unless given (anything with .app() and a .port to set)."""
        backend = backend or FakeBackend()
        runner, port = loop_thread.run(start_site(backend.app()))
        runners.append(runner)
        backend.port = port
        base = f"http://127.0.0.1:{port}" + ("/v1" if provider == "openai" else "")
        options = {
            "provider": provider,
            "base_url": base,
            "default_model": "backend-model",
            "timeout": 5.0,
            "ping_interval": 10.0,
        }
        options.update(overrides)
        config = claude_proxy.Config(**options)
        app = claude_proxy.create_app(config)
        prunner, pport = loop_thread.run(start_site(app))
        runners.append(prunner)
        stacks.append(Stack(backend, base, f"http://127.0.0.1:{pport}", config, app, loop_thread))
        return stacks[-1]

    yield make
    for stack in stacks:
        for client in stack.clients:
            client.close()
    for runner in reversed(runners):
        loop_thread.run(runner.cleanup())


@pytest.fixture(params=["openai", "ollama"])
def provider(request) -> str:
    return request.param


# --- talking to the proxy -----------------------------------------------------------------------------


def http(
    stack: Stack, method: str, path: str, body: Any = None, headers: Optional[dict] = None, timeout: float = 10
) -> tuple[int, dict, str]:
    """A raw HTTP call to the proxy -> (status, headers with lower-case names, text). For what the SDK cannot
    send or would hide."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"content-type": "application/json"}
    hdrs.update(headers or {})
    request = urllib.request.Request(stack.proxy_url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read().decode()


def parse_event(block: str) -> tuple[str, dict]:
    """One SSE event block -> (event, data), asserting the event is named and its data typed the same."""
    lines = block.split("\n")
    assert lines[0].startswith("event: "), block
    assert lines[1].startswith("data: "), block
    name, data = lines[0][7:], json.loads(lines[1][6:])
    assert data["type"] == name
    return name, data


def raw_sse(text: str) -> list[tuple[str, dict]]:
    """Parse a whole SSE body into (event, data) pairs, asserting every event is named and typed."""
    return [parse_event(block) for block in text.strip().split("\n\n")]


async def _read_stream(url: str, body: dict, headers: Optional[dict], stop: Optional[Callable]) -> tuple:
    t0 = time.monotonic()
    blocks: list[tuple[float, str]] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/messages", json=body, headers=headers or {}) as resp:
            status, hdrs = resp.status, {k.lower(): v for k, v in resp.headers.items()}
            if status != 200:
                return status, hdrs, await resp.text(), []
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    blocks.append((time.monotonic() - t0, block.decode()))
                    if stop and stop(blocks[-1][1]):
                        resp.close()  # the client hangs up
                        return status, hdrs, "", blocks
    return status, hdrs, "", blocks


def raw_stream(
    stack: Stack, body: dict, headers: Optional[dict] = None, stop: Optional[Callable] = None, timeout: float = 10
) -> tuple[int, dict, str, list[tuple[float, str, dict]]]:
    """POST a streaming request with aiohttp, reading events as they come -> (status, headers, error text,
    [(seconds since sent, event, data)]). stop(raw event block) -> True: the client hangs up after that event."""
    status, hdrs, text, blocks = stack.loop.run(
        _read_stream(stack.proxy_url, {**body, "stream": True}, headers, stop), timeout
    )
    return status, hdrs, text, [(t, *parse_event(block.strip("\r\n"))) for t, block in blocks]


def free_port() -> int:
    """A loopback port nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# --- requests, answers and checks the tests share ----------------------------------------


def cc_fixture(turn: int) -> dict:
    """A real Claude Code 2.1.331 request (headers and body), as captured."""
    return json.loads((FIXTURES / f"claude_code_2.1.331_parallel_tools_turn{turn}.json").read_text())


USER_HI = [{"role": "user", "content": "hi"}]


VALID = {"model": "claude-opus-5-5", "max_tokens": 100, "messages": USER_HI}


TEXT = {"type": "text", "text": "look"}


PNG_1x1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


ERROR_TYPES = {
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
    "conflict_error",
}


def req(**changes: Any) -> dict:
    """VALID with some fields changed (value ... removes the field)."""
    body = copy.deepcopy(VALID)
    for key, value in changes.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def user(*blocks: Any) -> list:
    """messages: one user turn with these content blocks."""
    return [{"role": "user", "content": list(blocks)}]


def assert_error(
    status: int, headers: dict, text: str, expected_status: int, expected_type: str, retry: Optional[str] = "any"
) -> str:
    """An Anthropic-shaped error answer (from http() or raw_stream()); returns its message."""
    assert status == expected_status, text
    assert headers.get("content-type", "").startswith("application/json")
    assert headers.get("request-id")
    body = json.loads(text)
    assert body["type"] == "error", body
    assert body["error"]["type"] == expected_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if retry != "any":
        assert headers.get("x-should-retry") == retry, headers
    return body["error"]["message"]


def assert_sdk_error(err: anthropic.APIStatusError, status: int, error_type: str) -> str:
    """An Anthropic-shaped error as the SDK raised it; returns its message."""
    assert err.status_code == status
    assert isinstance(err.body, dict), err.body
    assert err.body["type"] == "error"
    assert err.body["error"]["type"] == error_type, err.body
    assert err.response.headers.get("request-id")
    return err.body["error"]["message"]


def assert_serves(stack, provider: str) -> None:
    """The proxy still answers a normal request after a fault."""
    stack.backend.queue(text_answer(provider, "still", " here"))
    msg = stack.client().messages.create(model="claude-opus-5-5", max_tokens=50, messages=USER_HI)
    assert msg.content[0].text == "still here"
    assert msg.stop_reason == "end_turn"


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


TIME_TOOL = {
    "name": "get_time",
    "description": "Current time in a time zone",
    "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
}


LIST_TOOL = {"name": "list_files", "description": "List the files", "input_schema": {"type": "object"}}


READ_TOOL = {
    "name": "Read",
    "description": "Read a file",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "additionalProperties": False,
    },
}


TOOLS = [WEATHER_TOOL, TIME_TOOL, LIST_TOOL, READ_TOOL]


PARIS = {"city": "Paris"}


PARIS_JSON = '{"city": "Paris"}'


TZ = {"tz": "Europe/Paris"}


TZ_JSON = '{"tz": "Europe/Paris"}'


W = ("tool_use", "get_weather", PARIS)


T = ("tool_use", "get_time", TZ)


def body_of(**kw) -> dict:
    """A request offering TOOLS; kw replaces top-level fields."""
    body = {
        "model": "claude-opus-5-5",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "tools": TOOLS,
    }
    body.update(kw)
    return body


def pieces(s: str, n: int = 4) -> list:
    """s in fragments of n characters."""
    return [s[i : i + n] for i in range(0, len(s), n)]


_MISSING = object()


def frag(index=_MISSING, id=None, name=None, args=_MISSING, type_: bool = False) -> dict:
    """One delta.tool_calls[] element, with only the keys given."""
    f: dict = {}
    if index is not _MISSING:
        f["index"] = index
    if id is not None:
        f["id"] = id
    if type_ or id is not None:
        f["type"] = "function"
    fn: dict = {}
    if name is not None:
        fn["name"] = name
    if args is not _MISSING:
        fn["arguments"] = args
    if fn:
        f["function"] = fn
    return f


def tc(*frags, **delta) -> dict:
    """A chunk whose delta carries these tool-call fragments."""
    return oai_chunk(dict(delta, tool_calls=list(frags)))


ROLE = oai_chunk({"role": "assistant", "content": ""})


USAGE = oai_chunk(choices=[], usage=oai_usage(40, 18))


def finish(reason: str = "tool_calls", **kw) -> dict:
    return oai_chunk({}, reason, **kw)


def canonical(index: int, call_id: str, name: str, args: str, n: int = 4) -> list:
    return oai_tool_call_chunks(index, call_id, name, *pieces(args, n))


def check_stream(events: list) -> dict:
    """The Anthropic SSE grammar, checked on [(event, data)] (from raw_sse, sse_events or raw_stream), and what the
    stream describes: {"blocks": [("text", str) | ("tool_use", name, input) | ("thinking", str)], "ids": tool_use
    ids, "stop_reason", "usage": (input, output tokens)}. The one check of the grammar, used by bench/bench.py too.

    The rules: pings anywhere; no error event; one message_start first (role assistant, content [], no stop reason
    yet); content blocks one at a time, indexed 0, 1, ..., each content_block_start, deltas of its own kind,
    content_block_stop; a tool_use block starts with input {} and a non-empty id and name, and its input_json_delta
    pieces join into a JSON object; a thinking block ends with a signature_delta; then message_delta (with
    usage.output_tokens) and message_stop last; nothing else."""
    evs = [(n, d) for n, d in events if n != "ping"]
    names = [n for n, _ in evs]
    assert "error" not in names, evs
    assert names[0] == "message_start", names
    start = evs[0][1]["message"]
    assert start["role"] == "assistant", start
    assert start["content"] == [] and start["stop_reason"] is None and start["stop_sequence"] is None
    assert names[-2:] == ["message_delta", "message_stop"], names
    assert names.count("message_start") == 1 and names.count("message_stop") == 1
    blocks: list = []
    ids: list = []
    open_idx = None
    parts: list = []
    signed = False
    final: dict = {}
    for name, data in evs[1:]:
        if name == "content_block_start":
            assert open_idx is None, f"block {data['index']} started while block {open_idx} is open"
            assert data["index"] == len(blocks), (data["index"], len(blocks))
            cb = data["content_block"]
            if cb["type"] == "tool_use":
                assert cb["input"] == {}, cb
                assert isinstance(cb["id"], str) and cb["id"], cb
                assert isinstance(cb["name"], str) and cb["name"], cb
                ids.append(cb["id"])
            elif cb["type"] == "text":
                assert cb["text"] == ""
            elif cb["type"] == "thinking":
                assert cb["thinking"] == "" and cb["signature"] == ""
            blocks.append(cb)
            open_idx, parts, signed = data["index"], [], False
        elif name == "content_block_delta":
            assert data["index"] == open_idx, (data, open_idx)
            delta = data["delta"]
            kind = blocks[open_idx]["type"]
            allowed = {
                "text": ("text_delta",),
                "tool_use": ("input_json_delta",),
                "thinking": ("thinking_delta", "signature_delta"),
            }[kind]
            assert delta["type"] in allowed, (kind, delta)
            if delta["type"] == "signature_delta":
                assert delta["signature"]
                signed = True
            else:
                parts.append(delta.get("text", delta.get("thinking", delta.get("partial_json"))))
        elif name == "content_block_stop":
            assert data["index"] == open_idx, (data, open_idx)
            cb = blocks[open_idx]
            joined = "".join(parts)
            if cb["type"] == "tool_use":
                assert joined, 'a tool_use block needs input_json_delta ("{}" for no arguments)'
                value = json.loads(joined)  # must be valid JSON
                assert isinstance(value, dict), joined
                blocks[open_idx] = ("tool_use", cb["name"], value)
            elif cb["type"] == "text":
                blocks[open_idx] = ("text", joined)
            elif cb["type"] == "thinking":
                assert signed, "a thinking block must end with a signature_delta"
                blocks[open_idx] = ("thinking", joined)
            open_idx = None
        elif name == "message_delta":
            assert open_idx is None, "message_delta while a block is open"
            assert isinstance(data["usage"]["output_tokens"], int)
            final = data
        elif name != "message_stop":
            raise AssertionError(f"unexpected event {name}: {data}")
    assert open_idx is None
    return {
        "blocks": blocks,
        "ids": ids,
        "stop_reason": final["delta"]["stop_reason"],
        "usage": (final["usage"].get("input_tokens"), final["usage"]["output_tokens"]),
    }


def summarize(msg) -> dict:
    blocks, ids = [], []
    for b in msg.content:
        if b.type == "tool_use":
            assert isinstance(b.input, dict), b
            blocks.append(("tool_use", b.name, b.input))
            ids.append(b.id)
        elif b.type == "text":
            blocks.append(("text", b.text))
        elif b.type == "thinking":
            blocks.append(("thinking", b.thinking))
        else:
            blocks.append((b.type,))
    return {
        "blocks": blocks,
        "ids": ids,
        "stop_reason": msg.stop_reason,
        "usage": (msg.usage.input_tokens, msg.usage.output_tokens),
    }


def sse_events(stack, body: dict) -> list:
    """POST body with stream: true and read the whole answer -> [(event, data)]: a 200 event stream, all events
    named and typed, no OpenAI `[DONE]` in it."""
    status, headers, text = http(stack, "POST", "/v1/messages", dict(body, stream=True))
    assert status == 200, text
    assert headers.get("content-type", "").startswith("text/event-stream"), headers
    assert "[DONE]" not in text
    return raw_sse(text)


def as_history(msg) -> dict:
    """An SDK message as the assistant turn of the next request."""
    return {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]}


def run_modes(stack, answer, **kw) -> dict:
    """The same backend answer three ways: raw SSE (rules checked), SDK stream accumulator, SDK create.
    All three must describe the same message; tool ids non-empty and unique in each."""
    stack.backend.queue(answer, answer, answer)
    body = body_of(**kw)
    results = {"raw": check_stream(sse_events(stack, body))}
    client = stack.client()
    with client.messages.stream(**body) as s:
        results["stream"] = summarize(s.get_final_message())
    results["create"] = summarize(client.messages.create(**body))
    for mode, r in results.items():
        assert all(isinstance(i, str) and i for i in r["ids"]), (mode, r["ids"])
        assert len(set(r["ids"])) == len(r["ids"]), (mode, r["ids"])
    assert results["raw"]["blocks"] == results["stream"]["blocks"] == results["create"]["blocks"], results
    assert results["raw"]["stop_reason"] == results["stream"]["stop_reason"] == results["create"]["stop_reason"]
    assert len(stack.backend.requests) == 3
    return results["create"]


def assert_tool_use(result: dict, blocks: list, usage: Optional[tuple] = None) -> None:
    """A run_modes() result: these blocks, stop_reason tool_use, and this usage (if given)."""
    assert result["blocks"] == blocks
    assert result["stop_reason"] == "tool_use"
    if usage is not None:
        assert result["usage"] == usage


def walk_keys(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}/{k}", k
            yield from walk_keys(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk_keys(v, f"{path}/{i}")


def anthropic_only_keys(obj) -> list:
    """Paths of the Anthropic-only keys left in a backend request (there must be none)."""
    return [p for p, k in walk_keys(obj) if k in ("cache_control", "defer_loading", "$schema")]


def oll_call(name, args, call_id=None, index=0) -> dict:
    """One tool call as Ollama sends it (in message.tool_calls)."""
    call = {"function": {"index": index, "name": name, "arguments": args}}
    if call_id is not None:
        call["id"] = call_id
    return call


def oai_call(call_id, name, args) -> dict:
    """One tool call as a non-streamed OpenAI message carries it."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def tool_answer(provider: str, calls: list, text: str = ""):
    """calls: [(id, name, input)] -> the backend's way of returning them."""
    if provider == "openai":
        chunks = [ROLE] + ([oai_chunk({"content": text})] if text else [])
        for i, (cid, name, inp) in enumerate(calls):
            chunks += canonical(i, cid, name, json.dumps(inp))
        return SSE(chunks + [finish(), USAGE])
    objs = [ollama_chunk(text)] if text else []
    objs.append(ollama_chunk(tool_calls=[oll_call(name, inp, cid, i) for i, (cid, name, inp) in enumerate(calls)]))
    return NDJSON(objs + [ollama_chunk(done=True)])


async def write_sse(request: web.Request, chunks: list) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b"".join(sse_bytes(chunk) for chunk in chunks + ["[DONE]"]))
    return resp


# --- the real Claude Code CLI (issue 15) ------------------------------------------------------------
# The end-to-end tests (marker `e2e`) run the official CLI, installed from npm at a pinned version into a cache
# directory, through the proxy against the fake backends above. The fake backend answers each request by what it
# contains (`ClaudeCode.respond`), not by queue order: Claude Code sends side requests (session titles, quota
# checks, compaction) in an order that changes between versions.

import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

CLAUDE_CODE_VERSION = "2.1.332"  # the one pinned version the e2e tests install (`npm view @anthropic-ai/claude-code`)
CLAUDE_CODE_PACKAGE = "@anthropic-ai/claude-code"
CLAUDE_CODE_API_KEY = "x"


def e2e_unavailable(reason: str) -> None:
    """Skip an e2e test with the reason; in CI (CI=true) fail instead: a skip there would hide that it did not run."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"e2e test cannot run in CI: {reason}", pytrace=False)
    _E2E_SKIPPED.add(reason)
    pytest.skip(reason)


_E2E_SKIPPED: set[str] = set()


def pytest_terminal_summary(terminalreporter) -> None:
    """Skipped e2e tests are said at the end of every run, with the reason (not only under -rs)."""
    for reason in sorted(_E2E_SKIPPED):
        terminalreporter.write_line(f"e2e tests (the real Claude Code CLI) skipped: {reason}", yellow=True)


def claude_code_cache() -> str:
    """Where the CLI is installed: $CLAUDE_PROXY_E2E_CACHE/<version>, by default ~/.cache/claude-proxy-e2e/<version>."""
    root = os.environ.get("CLAUDE_PROXY_E2E_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "claude-proxy-e2e"
    )
    return os.path.join(root, CLAUDE_CODE_VERSION)


def _installed_version(binary: str) -> str:
    if not os.path.exists(binary):
        return ""
    try:
        with tempfile.TemporaryDirectory() as home:  # never the user's own ~/.claude
            env = {"PATH": os.environ.get("PATH", ""), "HOME": home}
            done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.split(" ", 1)[0].strip() if done.returncode == 0 else ""


def _npm_error(done: subprocess.CompletedProcess) -> str:
    """npm's own words on a failed install, in one line: its `npm error` lines up to the first stack frame."""
    lines = []
    for line in (done.stderr or done.stdout).splitlines():
        line = line.removeprefix("npm error").strip()
        if line.startswith("at ") or len(lines) == 5:
            break
        if line:
            lines.append(line)
    return "; ".join(lines)[:1000] or "(no output)"


@pytest.fixture(scope="session")
def claude_code_bin() -> str:
    """The pinned Claude Code CLI, installed once (`npm install --prefix <cache>`; a file lock keeps concurrent
    sessions from installing over each other). npm missing or the install failing: skip with the reason (fail in CI)."""
    cache = claude_code_cache()
    binary = os.path.join(cache, "node_modules", ".bin", "claude")
    if _installed_version(binary) == CLAUDE_CODE_VERSION:
        return binary
    npm = shutil.which("npm")
    if not npm:
        e2e_unavailable(f"npm is not installed: the e2e tests need it to install {CLAUDE_CODE_PACKAGE}")
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    try:
        os.makedirs(cache, exist_ok=True)
        lock = open(os.path.join(cache, ".install.lock"), "w")  # closed by the with below
    except OSError as exc:
        e2e_unavailable(f"cannot write the install directory {cache} ({exc.strerror}): set CLAUDE_PROXY_E2E_CACHE")
    with lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version(binary) != CLAUDE_CODE_VERSION:  # another session may have installed it meanwhile
            command = [
                npm,
                "install",
                "--prefix",
                cache,
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--fetch-retry-maxtimeout=10000",  # offline: give up in ~20 s, not npm's ~75
                f"{CLAUDE_CODE_PACKAGE}@{CLAUDE_CODE_VERSION}",
            ]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                e2e_unavailable(f"`{shlex.join(command)}` did not finish in 600 s")
            if done.returncode != 0:
                e2e_unavailable(f"`{shlex.join(command)}` failed (exit {done.returncode}): {_npm_error(done)}")
            found = _installed_version(binary)
            if found != CLAUDE_CODE_VERSION:
                e2e_unavailable(
                    f"{binary} --version gave {found or 'nothing'!r} after installing {CLAUDE_CODE_VERSION} "
                    "(npm install scripts or optional dependencies disabled? the native binary comes from both)"
                )
    return binary


class Terminal:
    """An interactive program in a detached tmux session of its own (own socket, 120x40), driven by keys and read
    from the screen and the terminal title."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="cc-tmux-")  # short: a socket path has ~100 characters at most
        self.socket = os.path.join(self.dir, "sock")
        command = "exec env -i " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)
        self.tmux("new-session", "-d", "-x", "120", "-y", "40", "-c", cwd, command)

    def tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=10)
        if done.returncode != 0 and args[0] == "new-session":
            raise AssertionError(f"tmux {' '.join(args[:1])} failed: {done.stderr}")
        return done.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def title(self) -> str:
        return self.tmux("display-message", "-p", "#{pane_title}").strip()

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-l", text)

    def press(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def wait_screen(self, text: str, timeout: float = 30.0) -> str:
        if not wait_for(lambda: text in self.screen(), timeout):
            raise AssertionError(f"{text!r} did not appear on the screen in {timeout} s:\n{self.screen()}")
        return self.screen()

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class ClaudeCode:
    """The real CLI in a throw-away HOME and working directory, pointed at a proxy in front of a fake backend.

    `respond(backend_body) -> answer or None` decides each backend answer from the request itself (None: a short
    text). `sent` records every request body Claude Code sent to the proxy; `backend.requests` what the proxy
    sent on."""

    binary: str
    stack: Stack
    provider: str
    home: str
    cwd: str
    respond: Callable[[dict], Any] = lambda body: None
    sent: list = field(default_factory=list)
    terminals: list = field(default_factory=list)

    def env(self, *, nonessential: bool = False) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.home,
            "SHELL": shutil.which("bash") or "/bin/sh",
            "TERM": "xterm-256color",
            "LANG": "C.UTF-8",
            "ANTHROPIC_BASE_URL": self.stack.proxy_url,
            "ANTHROPIC_API_KEY": CLAUDE_CODE_API_KEY,
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
            # Offline: anything not for the proxy goes to a closed local port and fails at once.
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1,localhost",
            # This also turns off the session-title request, so the interactive test leaves it out.
            **({} if nonessential else {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}),
        }

    def run(self, prompt: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`claude -p PROMPT ARGS...` -> the finished process (stdout, stderr, returncode as text)."""
        try:
            return subprocess.run(
                [self.binary, "-p", prompt, *args],
                cwd=self.cwd,
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"claude -p did not finish in {timeout} s; stdout: {exc.stdout!r}; backend got "
                f"{len(self.chats())} requests"
            ) from None

    def interactive(self, *args: str) -> Terminal:
        if not shutil.which("tmux"):
            e2e_unavailable("tmux is not installed: the interactive e2e test drives Claude Code's terminal with it")
        terminal = Terminal([self.binary, *args], self.cwd, self.env(nonessential=True))
        self.terminals.append(terminal)
        return terminal

    def chats(self) -> list[dict]:
        """The chat requests the backend received (not /tokenize calls)."""
        return [r for r in self.stack.backend.requests if "messages" in r]

    def answer(self, body: dict) -> Any:
        answer = self.respond(body)
        return answer if answer is not None else text_answer(self.provider, "ok")


class _Responder(list):
    """Stands in for FakeBackend.script: never empty, and each pop answers the request that just arrived (the
    backend records a request before it takes the next answer)."""

    def __init__(self, cc: ClaudeCode) -> None:
        super().__init__()
        self.cc = cc

    def __bool__(self) -> bool:
        return True

    def pop(self, index: Any = -1) -> Any:
        return self.cc.answer(self.cc.stack.backend.requests[-1])


@pytest.fixture
def claude_code(claude_code_bin, make_stack, provider, tmp_path, monkeypatch):
    """claude_code(respond) -> a ClaudeCode whose backend answers with respond(body) (see ClaudeCode)."""
    made: list[ClaudeCode] = []

    def make(respond: Callable[[dict], Any] = lambda body: None) -> ClaudeCode:
        stack = make_stack(provider, timeout=30.0)
        home, cwd = tmp_path / f"home{len(made)}", tmp_path / f"work{len(made)}"
        home.mkdir()
        cwd.mkdir()
        cc = ClaudeCode(claude_code_bin, stack, provider, str(home), str(cwd.resolve()), respond)
        # What a user who has finished onboarding has: no first-run screens, the folder trusted, the key approved.
        (home / ".claude.json").write_text(
            json.dumps(
                {
                    "hasCompletedOnboarding": True,
                    "theme": "dark",
                    "customApiKeyResponses": {"approved": [CLAUDE_CODE_API_KEY[-20:]], "rejected": []},
                    "projects": {cc.cwd: {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}},
                }
            )
        )
        stack.backend.script = _Responder(cc)
        made.append(cc)
        return cc

    read_json = claude_proxy.read_json

    async def recording_read_json(request):
        body = await read_json(request)
        for cc in made:
            if request.app is cc.stack.app:
                cc.sent.append({"path": request.path, "body": body})
        return body

    monkeypatch.setattr(claude_proxy, "read_json", recording_read_json)
    yield make
    for cc in made:
        for terminal in cc.terminals:
            terminal.close()
