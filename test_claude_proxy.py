"""Tests for claude_proxy.py: the official anthropic SDK against the proxy on loopback, in front of
fake backends that send the bytes real servers send; plus unit tests of the pure translation."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import anthropic
import urllib.error
import urllib.request
import pytest

import claude_proxy as cp
from conftest import (NDJSON, SSE, Reply, oai_chunk, oai_completion, oai_text_stream, oai_tool_call_chunks,
                      oai_usage, ollama_chunk, ollama_text_stream, raw_sse, wait_for)

HERE = pathlib.Path(__file__).parent
SHARED_FIXTURES = HERE.parent / "shared" / "fixtures"
LOCAL_FIXTURES = HERE / "fixtures"


def cc_fixture(turn: int) -> dict:
    """A real Claude Code 2.1.331 request (headers and body), as captured."""
    name = f"claude_code_2.1.331_parallel_tools_turn{turn}.json"
    path = LOCAL_FIXTURES / name if (LOCAL_FIXTURES / name).exists() else SHARED_FIXTURES / name
    return json.loads(path.read_text())


def text_answer(provider: str, *pieces: str) -> object:
    return SSE(oai_text_stream(*pieces)) if provider == "openai" else NDJSON(ollama_text_stream(*pieces))


USER_HI = [{"role": "user", "content": "hi"}]


def http(stack, method: str, path: str, body=None, headers=None, timeout: float = 10):
    """A raw HTTP call to the proxy -> (status, headers, text). For what the SDK cannot send."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"content-type": "application/json"}
    hdrs.update(headers or {})
    req = urllib.request.Request(stack.proxy_url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


# ======================================================================================
# Basics through the SDK, both providers
# ======================================================================================

def test_create_non_streaming(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "Hello", " world"))
    msg = stack.client().messages.create(model="claude-opus-5-5", max_tokens=100, messages=USER_HI)
    assert msg.id.startswith("msg_")
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.model == "claude-opus-5-5"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello world"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    expected = (12, 7) if provider == "openai" else (26, 10)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == expected
    sent = stack.backend.requests[0]
    assert sent["model"] == "backend-model"
    assert sent["stream"] is True  # streamed from the backend even for a non-streaming client


def test_stream_accumulates(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "Hel", "lo", " there"))
    with stack.client().messages.stream(model="claude-sonnet-5-5", max_tokens=50, messages=USER_HI) as s:
        texts = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(texts) == "Hello there"
    assert final.content[0].text == "Hello there"
    assert final.stop_reason == "end_turn"
    assert final.model == "claude-sonnet-5-5"


def test_count_tokens_through_sdk(make_stack):
    stack = make_stack("openai")
    result = stack.client().messages.count_tokens(
        model="claude-opus-5-5", system="You are terse.",
        messages=[{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}])
    assert 10 <= result.input_tokens <= 40
    assert stack.backend.requests == []  # no backend call


# ======================================================================================
# Pure translation: Claude Code's real requests, cache-stable prompts, system messages
# ======================================================================================

def parse_fixture(turn: int) -> cp.MessagesRequest:
    return cp.parse_request(cc_fixture(turn)["body"])


ROUTE_OPENAI = cp.Route("qwen3-coder", "openai", "http://127.0.0.1:8000/v1")
ROUTE_OLLAMA = cp.Route("qwen3:8b", "ollama", "http://127.0.0.1:11434")


def backend_body(req: cp.MessagesRequest, provider: str, strategy: str = "reminder") -> dict:
    route = ROUTE_OPENAI if provider == "openai" else ROUTE_OLLAMA
    conv = cp.build_conversation(req, strategy)
    return cp.PROVIDER_IMPLS[provider].body(conv, req, route)[0]


def test_claude_code_fixture_translates(provider):
    req = parse_fixture(2)
    body = backend_body(req, provider)
    dumped = json.dumps(body)
    assert "x-anthropic-billing-header" not in dumped  # stripped: per-version cache buster
    for key in ("cache_control", "defer_loading", "$schema", "context_management"):
        assert f'"{key}"' not in dumped, key
    assert "DeferredToolPlaceholder" not in dumped
    names = [t["function"]["name"] for t in body["tools"]]
    assert "Bash" in names and len(names) == 11
    messages = body["messages"]
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("You are a Claude agent")
    # [user, system, assistant, user(tool_results)] -> system text kept in place, inside the user turn
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert "<system-reminder>\n# Environment" in messages[1]["content"]
    calls = messages[2]["tool_calls"]
    assert [c["id"] for c in calls] == ["toolu_479c5658869b425f979f78ed", "toolu_730d3b4b5c8840ae8c38b534"]
    assert [m["tool_call_id"] for m in messages[3:]] == [c["id"] for c in calls]
    assert [m["content"] for m in messages[3:]] == ["one", "two"]
    if provider == "openai":
        assert json.loads(calls[0]["function"]["arguments"]) == {"command": "echo one", "description": "one"}
        assert body["max_tokens"] == 128000 and body["reasoning_effort"] == "medium"
        assert body["user"].startswith("{")
    else:
        assert calls[0]["function"]["arguments"] == {"command": "echo one", "description": "one"}
        assert [m["tool_name"] for m in messages[3:]] == ["Bash", "Bash"]
        assert body["options"]["num_predict"] == 128000


def test_prompt_prefix_is_stable_across_turns(provider):
    """Turn N's backend prompt must be a byte prefix of turn N+1's (KV-cache reuse on local servers)."""
    turn1, turn2 = backend_body(parse_fixture(1), provider), backend_body(parse_fixture(2), provider)
    m1, m2 = turn1["messages"], turn2["messages"]
    assert len(m1) < len(m2)
    for a, b in zip(m1, m2):
        assert json.dumps(a) == json.dumps(b)
    assert json.dumps(turn1["tools"]) == json.dumps(turn2["tools"])
    # and translation is deterministic
    assert json.dumps(backend_body(parse_fixture(2), provider)) == json.dumps(turn2)


def test_conversation_ending_in_system_message_keeps_prefix():
    base = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "system", "content": "note A"}]
    longer = base + [{"role": "user", "content": "next"}]
    r1 = cp.parse_request({"model": "m", "max_tokens": 5, "messages": base})
    r2 = cp.parse_request({"model": "m", "max_tokens": 5, "messages": longer})
    b1, b2 = backend_body(r1, "openai"), backend_body(r2, "openai")
    assert b1["messages"][:2] == b2["messages"][:2]
    assert b1["messages"][-1] == {"role": "user", "content": "<system-reminder>\nnote A\n</system-reminder>"}
    assert b2["messages"][-1]["content"] == "<system-reminder>\nnote A\n</system-reminder>\n\nnext"


@pytest.mark.parametrize("strategy", ["reminder", "hoist", "inline"])
def test_system_message_strategies(strategy):
    req = cp.parse_request({"model": "m", "max_tokens": 5, "system": "S", "messages": [
        {"role": "user", "content": "u1"}, {"role": "system", "content": [{"type": "text", "text": "env"}]},
        {"role": "system", "content": []}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]})
    messages = backend_body(req, "openai", strategy)["messages"]
    if strategy == "reminder":
        assert messages[0] == {"role": "system", "content": "S"}
        assert messages[1] == {"role": "user", "content": "u1\n\n<system-reminder>\nenv\n</system-reminder>"}
    elif strategy == "hoist":
        assert messages[0] == {"role": "system", "content": "S\n\nenv"}
        assert messages[1] == {"role": "user", "content": "u1"}
    else:
        assert messages[2] == {"role": "system", "content": "env"}
    assert messages[-1] == {"role": "user", "content": "u2"}


def test_sampling_and_stop_parameters():
    req = cp.parse_request({"model": "m", "max_tokens": 300, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stream": True,
                            "stop_sequences": ["###"], "metadata": {"user_id": "u-1"},
                            "messages": [{"role": "user", "content": "x"}]})
    openai = backend_body(req, "openai")
    assert (openai["max_tokens"], openai["temperature"], openai["top_p"], openai["top_k"], openai["stop"],
            openai["user"]) == (300, 0.2, 0.9, 40, ["###"], "u-1")
    assert openai["stream_options"] == {"include_usage": True}
    official = cp.PROVIDER_IMPLS["openai"].body(cp.build_conversation(req), req,
                                                cp.Route("gpt-4.1", "openai", "https://api.openai.com/v1"))[0]
    assert "top_k" not in official  # the official API rejects it
    ollama = backend_body(req, "ollama")
    assert ollama["options"] == {"num_predict": 300, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": ["###"]}
    assert ollama["stream"] is True and "user" not in ollama


def test_map_cap_and_context_window():
    req = cp.parse_request({"model": "m", "max_tokens": 128000, "messages": [{"role": "user", "content": "x"}]})
    route = cp.Route("small", "ollama", "http://h", max_tokens=8192, context_window=32768)
    body = cp.ollama_request(cp.build_conversation(req), req, route)
    assert body["options"]["num_predict"] == 8192 and body["options"]["num_ctx"] == 32768


# ======================================================================================
# Thinking, images, documents (both directions)
# ======================================================================================

THINK_REQ = dict(model="claude-opus-5-5", max_tokens=200, messages=USER_HI)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "reasoning_details"])
def test_openai_reasoning_fields_become_thinking(make_stack, field):
    stack = make_stack("openai")
    piece = (lambda t: {"reasoning_details": [{"type": "reasoning.text", "text": t}]}) if field == "reasoning_details" \
        else (lambda t: {field: t})
    chunks = [oai_chunk({"role": "assistant", "content": ""}), oai_chunk(piece("Let me ")), oai_chunk(piece("think.")),
              oai_chunk({"content": "Answer."}), oai_chunk({}, "stop"), oai_chunk(choices=[], usage=oai_usage(10, 30,
                                                                                                          reasoning=20))]
    stack.backend.queue(SSE(chunks))
    with stack.client().messages.stream(**THINK_REQ) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think."
    assert final.content[0].signature  # non-empty: Claude Code drops thinking blocks without one
    assert final.content[1].text == "Answer."
    assert final.usage.output_tokens == 30  # reasoning tokens stay inside output_tokens


def test_ollama_thinking_and_inline_think_tags(make_stack):
    stack = make_stack("ollama")
    stack.backend.queue(NDJSON([ollama_chunk("", thinking="Check."), ollama_chunk("Done."), ollama_chunk(done=True)]))
    stack.backend.queue(NDJSON([ollama_chunk("<thi"), ollama_chunk("nk>hidden plan</th"), ollama_chunk("ink>\n\nVisible"),
                                ollama_chunk(done=True)]))
    client = stack.client()
    first = client.messages.create(**THINK_REQ)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in first.content] == [
        ("thinking", "Check."), ("text", "Done.")]
    with client.messages.stream(**THINK_REQ) as s:
        second = s.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in second.content] == [
        ("thinking", "hidden plan"), ("text", "Visible")]


def test_thinking_display_omitted_round_trips_through_signature(make_stack):
    """Claude Code asks for display "omitted": the text is hidden, and restored from the signature when the
    conversation is sent back (DeepSeek needs it on tool turns)."""
    stack = make_stack("openai")
    stack.backend.queue(SSE([oai_chunk({"reasoning_content": "secret plan"}), oai_chunk({"content": "ok"}),
                             oai_chunk({}, "stop")]))
    msg = stack.client().messages.create(model="m", max_tokens=50, messages=USER_HI,
                                         thinking={"type": "adaptive", "display": "omitted"})
    block = msg.content[0]
    assert block.type == "thinking" and block.thinking == "" and block.signature.startswith("cpx1.")
    assert cp.reasoning_from_signature(block.signature) == "secret plan"
    req = cp.parse_request({"model": "m", "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [block.model_dump(), {"type": "tool_use", "id": "toolu_1", "name": "T",
                                                                "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}]}]})
    route = cp.Route("deepseek-chat", "openai", "https://api.deepseek.com/v1")
    body = cp.PROVIDER_IMPLS["openai"].body(cp.build_conversation(req), req, route)[0]
    assert body["messages"][1]["reasoning_content"] == "secret plan"
    ollama = cp.ollama_request(cp.build_conversation(req), req, ROUTE_OLLAMA)
    assert ollama["messages"][1]["thinking"] == "secret plan"
    plain = backend_body(req, "openai")  # not DeepSeek, no reasoning_history: not sent
    assert "reasoning_content" not in plain["messages"][1]


def test_thinking_request_switches():
    def req(**kw):
        return cp.parse_request({"model": "m", "max_tokens": 5, "messages": USER_HI, **kw})
    assert backend_body(req(thinking={"type": "enabled", "budget_tokens": 2048}), "openai")["reasoning_effort"] == "low"
    assert backend_body(req(thinking={"type": "enabled", "budget_tokens": 20000}), "openai")["reasoning_effort"] == "high"
    assert backend_body(req(thinking={"type": "adaptive"}, output_config={"effort": "high"}),
                        "openai")["reasoning_effort"] == "high"
    assert "reasoning_effort" not in backend_body(req(thinking={"type": "disabled"}), "openai")
    assert backend_body(req(thinking={"type": "enabled", "budget_tokens": 2048}), "ollama")["think"] is True
    assert backend_body(req(thinking={"type": "disabled"}), "ollama")["think"] is False
    assert "think" not in backend_body(req(thinking={"type": "adaptive"}), "ollama")


def test_backend_rejecting_reasoning_effort_is_retried_without_it(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(Reply(400, {"error": {"message": "Unrecognized request argument supplied: reasoning_effort",
                                              "type": "invalid_request_error", "param": None, "code": None}}),
                        SSE(oai_text_stream("fine")), SSE(oai_text_stream("again")))
    client = stack.client()
    kwargs = dict(model="m", max_tokens=50, messages=USER_HI, thinking={"type": "adaptive"},
                  output_config={"effort": "medium"})
    assert client.messages.create(**kwargs).content[0].text == "fine"
    assert client.messages.create(**kwargs).content[0].text == "again"
    sent = stack.backend.requests
    assert "reasoning_effort" in sent[0] and "reasoning_effort" not in sent[1] and "reasoning_effort" not in sent[2]


PNG_1x1 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


def test_images_both_providers(make_stack, provider):
    stack = make_stack(provider)
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1x1}}]
    stack.client().messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": content}])
    sent = stack.backend.requests[0]["messages"][-1]
    if provider == "openai":
        assert sent["content"] == [{"type": "text", "text": "What is this?"},
                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1x1}}]
    else:
        assert sent["content"] == "What is this?" and sent["images"] == [PNG_1x1]


def test_image_url_openai_passes_through_and_ollama_needs_flag(make_stack):
    content = [{"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}]
    openai = make_stack("openai")
    openai.client().messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": content}])
    assert openai.backend.requests[0]["messages"][-1]["content"][0]["image_url"]["url"] == "https://example.com/cat.png"
    ollama = make_stack("ollama")
    with pytest.raises(anthropic.BadRequestError) as err:
        ollama.client().messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": content}])
    assert "--fetch-images" in err.value.message and ollama.backend.requests == []


def test_documents_text_and_pdf(make_stack):
    stack = make_stack("openai")
    doc = {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "alpha"}}
    stack.client().messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": [doc]}])
    assert stack.backend.requests[0]["messages"][-1]["content"] == '<document title="Notes">\nalpha\n</document>'
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}
    with pytest.raises(anthropic.BadRequestError) as err:
        stack.client().messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": [pdf]}])
    assert "messages.0.content.0.source" in err.value.message and "PDF" in err.value.message


def test_cached_tokens_and_stop_sequence(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(SSE(oai_text_stream("x", usage=oai_usage(100, 5, cached=80))))
    stack.backend.queue(SSE(oai_text_stream("y", finish="stop", stop_reason="###")))
    client = stack.client()
    msg = client.messages.create(model="m", max_tokens=20, messages=USER_HI)
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens) == (20, 80)
    msg = client.messages.create(model="m", max_tokens=20, messages=USER_HI, stop_sequences=["###"])
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "###")


def test_length_and_content_filter_stop_reasons(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(SSE(oai_text_stream("cut", finish="length")) if provider == "openai" else
                        NDJSON(ollama_text_stream("cut", done_reason="length")))
    msg = stack.client().messages.create(model="m", max_tokens=1, messages=USER_HI)
    assert msg.stop_reason == "max_tokens"


def test_max_tokens_too_large_is_lowered_and_remembered(make_stack):
    stack = make_stack("openai")
    vllm = {"object": "error", "type": "BadRequestError", "param": None, "code": 400, "message":
            "'max_tokens' or 'max_completion_tokens' is too large: 128000. This model's maximum context length is "
            "32768 tokens and your request has 1234 input tokens (128000 > 32768 - 1234)."}
    stack.backend.queue(Reply(400, vllm), SSE(oai_text_stream("ok")), SSE(oai_text_stream("ok")))
    client = stack.client(timeout=60)  # an explicit timeout lets the SDK send 128000 without streaming
    assert client.messages.create(model="m", max_tokens=128000, messages=USER_HI).content[0].text == "ok"
    assert [r["max_tokens"] for r in stack.backend.requests] == [128000, 32768 - 1234]
    client.messages.create(model="m", max_tokens=128000, messages=USER_HI)
    assert stack.backend.requests[2]["max_tokens"] <= 32768 - 1  # clamped up front from now on


def test_max_tokens_zero_is_a_prewarm(make_stack):
    stack = make_stack("openai")
    msg = stack.client().messages.create(model="m", max_tokens=0, messages=USER_HI)
    assert msg.content == [] and msg.stop_reason == "max_tokens"
    assert stack.backend.requests == []


def test_structured_output(make_stack, provider):
    stack = make_stack(provider)
    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    stack.backend.queue(text_answer(provider, '{"title": "x"}'))
    stack.client().messages.create(model="m", max_tokens=20, messages=USER_HI,
                                   output_config={"format": {"type": "json_schema", "schema": schema}})
    sent = stack.backend.requests[0]
    if provider == "openai":
        assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    else:
        assert sent["format"] == schema


def test_scale_usage(make_stack):
    stack = make_stack("openai", scale_usage=True, model_map={"claude-haiku-5-5": {"model": "small",
                                                                                   "context_window": 50000}})
    stack.backend.queue(SSE(oai_text_stream("x", usage=oai_usage(1000, 5))))
    msg = stack.client().messages.create(model="claude-haiku-5-5", max_tokens=20, messages=USER_HI)
    assert msg.usage.input_tokens == 4000 and msg.usage.output_tokens == 5  # 200k / 50k = 4x


# ======================================================================================
# Configuration, model map, discovery, CLI
# ======================================================================================

def test_config_precedence_flags_env_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text('# comment\nexport PORT=9001\nPROVIDER="openai"\nDEFAULT_MODEL=from-dotenv\n'
                      "PROVIDER_TIMEOUT_MS=2500\n")
    config = cp.load_config([], environ={"DEFAULT_MODEL": "from-env"}, dotenv_path=str(dotenv))
    assert (config.port, config.provider, config.default_model, config.timeout) == (9001, "openai", "from-env", 2.5)
    assert config.base_url == "http://127.0.0.1:8000/v1" and config.host == "127.0.0.1"
    config = cp.load_config(["--model", "from-flag", "--port", "9002", "--timeout", "7"],
                            environ={"DEFAULT_MODEL": "from-env"}, dotenv_path=str(dotenv))
    assert (config.default_model, config.port, config.timeout) == ("from-flag", 9002, 7.0)


def test_model_map_resolution(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"claude-*haiku*": "small", "claude-opus-5-5": "big", "claude-*": "mid",
                                "claude-sonnet-4-5": {"model": "sonnet-ish", "max_tokens": 4096}}))
    config = cp.load_config(["--model-map", str(path)], environ={}, dotenv_path="")
    route = lambda name: (cp.resolve_route(config, name) or cp.Route("-", "", "")).model  # noqa: E731
    assert route("claude-opus-5-5") == "big"
    assert route("claude-haiku-5-5") == "small"  # first matching pattern wins
    assert route("claude-sonnet-4-5-20250929") == "sonnet-ish"  # dated name -> undated key
    assert cp.resolve_route(config, "claude-sonnet-4-5").max_tokens == 4096
    assert route("claude-fable-5-2") == "mid"
    assert cp.resolve_route(config, "gpt-4o") is None


def test_example_model_map_is_valid():
    config = cp.Config(model_map=cp.load_model_map(str(HERE / "model_map.example.json"), None))
    for name in ("claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5", "claude-haiku-4-5-20251001"):
        assert cp.resolve_route(config, name) is not None


@pytest.mark.parametrize("args, env, message", [
    (["--provider", "bedrock"], {}, "unknown provider"),
    (["--port", "http"], {}, "bad port"),
    (["--port", "70000"], {}, "bad port"),
    (["--model-map", "/nonexistent/map.json"], {}, "cannot read model map"),
    ([], {"MODEL_MAP_JSON": "{not json"}, "not valid JSON"),
    ([], {"MODEL_MAP_JSON": '{"claude-x": 5}'}, "model map entry"),
    ([], {"MODEL_MAP_JSON": '{"claude-x": {"model": "m", "provider": "vertex"}}'}, "unknown provider"),
    ([], {"MODEL_MAP_JSON": '{"claude-x": {"model": "m", "max_tokens": -1}}'}, "max_tokens"),
    ([], {"MODEL_MAP_JSON": '{"claude-x": {"model": "m", "api_key_env": "NOPE_NOT_SET"}}'}, "NOPE_NOT_SET"),
])
def test_bad_configuration_exits_2_with_one_line(tmp_path, args, env, message):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_MAP", "PROVIDER", "PORT"))}
    environ.update(env)
    result = subprocess.run([sys.executable, str(HERE / "claude_proxy.py"), *args], env=environ, cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, str(HERE / "claude_proxy.py"), "--help"], capture_output=True,
                            text=True, timeout=30)
    for option in ("--host", "--port", "--provider", "--base-url", "--api-key", "--model", "--model-map",
                   "--timeout", "--log-level", "--system-messages", "--auth-token", "--check", "--log-format"):
        assert option in result.stdout


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_zero_config_discovers_backend_models(make_stack, provider):
    stack = make_stack(provider, default_model=None)
    stack.client().messages.create(model="claude-opus-5-5", max_tokens=10, messages=USER_HI)
    stack.client().messages.create(model="claude-haiku-5-5", max_tokens=10, messages=USER_HI)
    models = [r["model"] for r in stack.backend.requests]
    assert models == (["qwen3-coder", "qwen3-coder"] if provider == "openai" else ["qwen3:8b", "qwen3:1.7b"])
    listed = stack.client().models.list()
    assert provider == "openai" and [m.id for m in listed.data] == ["qwen3-coder"] or \
        [m.id for m in listed.data] == ["qwen3:8b", "qwen3:1.7b"]


def test_unmapped_model_is_a_clear_400(make_stack):
    stack = make_stack("openai", default_model=None, discover=False)
    with pytest.raises(anthropic.BadRequestError) as err:
        stack.client().messages.create(model="claude-opus-5-5", max_tokens=10, messages=USER_HI)
    assert "claude-opus-5-5" in err.value.message and "model map" in err.value.message


def test_models_endpoints(make_stack):
    stack = make_stack("openai", discover=False, model_map={"claude-opus-5-5": "big", "claude-*haiku*": "small",
                                                            "claude-sonnet-5-5": "mid"})
    client = stack.client()
    page = client.models.list(limit=2)
    assert [m.id for m in page.data] == ["claude-opus-5-5", "claude-sonnet-5-5"] and page.has_more
    assert [m.id for m in client.models.list()] == ["claude-opus-5-5", "claude-sonnet-5-5", "backend-model"]
    model = client.models.retrieve("claude-sonnet-5-5")
    assert (model.type, model.id, model.display_name) == ("model", "claude-sonnet-5-5", "claude-sonnet-5-5")
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-nope")


def test_metrics_parse_and_move(make_stack):
    parser = pytest.importorskip("prometheus_client.parser")
    stack = make_stack("openai")
    stack.client().messages.create(model="claude-opus-5-5", max_tokens=10, messages=USER_HI)
    with stack.client().messages.stream(model="claude-opus-5-5", max_tokens=10, messages=USER_HI) as s:
        s.get_final_message()
    status, _, text = http(stack, "GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    requests = [s for s in families["claude_proxy_requests"].samples
                if s.labels.get("route") == "/v1/messages" and s.labels.get("status") == "200"]
    assert requests and requests[0].value == 2
    assert any(s.value == 7 * 2 for s in families["claude_proxy_output_tokens"].samples)
    counts = [s for s in families["claude_proxy_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert counts[0].value == 1
    assert families["claude_proxy_active_streams"].samples[0].value == 0


def test_check_command_reports_and_exits(make_stack, capsys):
    stack = make_stack("openai")
    good = cp.Config(provider="openai", base_url=stack.backend_url, default_model="backend-model")
    assert stack.loop.run(cp.run_check(good, out=sys.stdout)) == 0
    assert "ok" in capsys.readouterr().out
    stack.backend.queue(Reply(404, {"error": {"message": "model 'nope' not found", "type": "not_found_error"}}))
    bad = cp.Config(provider="openai", base_url=stack.backend_url, model_map={"claude-x": "nope"})
    assert stack.loop.run(cp.run_check(bad, out=sys.stdout)) == 1
    assert "FAIL: 404" in capsys.readouterr().out


def test_runs_under_gunicorn_with_two_workers(make_stack, tmp_path):
    pytest.importorskip("gunicorn")
    import socket
    stack = make_stack("openai")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PROVIDER="openai", PROVIDER_BASE_URL=stack.backend_url, DEFAULT_MODEL="gm")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "claude_proxy:create_app()", "-k",
                             "aiohttp.GunicornWebWorker", "-w", "2", "-b", f"127.0.0.1:{port}"],
                            cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0)
        assert wait_for(lambda: _health(port), timeout=20)
        for _ in range(4):
            assert client.messages.create(model="claude-opus-5-5", max_tokens=5, messages=USER_HI).content
        assert {r["model"] for r in stack.backend.requests} == {"gm"}
    finally:
        proc.terminate()
        proc.wait(10)


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.mark.parametrize("tokenizer", ["vllm", "llamacpp", None])
def test_count_tokens_with_backend_tokenizer(make_stack, tokenizer, caplog):
    stack = make_stack("openai", count_tokens="backend")
    stack.backend.tokenizer = tokenizer
    kwargs = dict(model="claude-opus-5-5", system="sys words here",
                  messages=[{"role": "user", "content": "one two three four"}])
    counts = [stack.client().messages.count_tokens(**kwargs).input_tokens for _ in range(2)]
    heuristic = cp.count_request_tokens(cp.parse_request(dict(kwargs), count_only=True))
    expected = {"vllm": 321, "llamacpp": 7, None: heuristic}[tokenizer]
    assert counts == [expected, expected]
    calls = [r for r in stack.backend.requests if "tokenize" in r]
    if tokenizer == "vllm":
        assert len(calls) == 1 and calls[0]["tokenize"]["messages"][0]["role"] == "system"  # cached after one call
    if tokenizer is None:
        assert "no usable tokenizer" in caplog.text


# ======================================================================================
# Token counting
# ======================================================================================

def test_token_counter_accuracy_by_category():
    """count_text_tokens() is within 10% of tiktoken cl100k_base for every
    category of fixtures/token_corpus.json (counts precomputed in the file),
    and never under-counts a long sample by more than 10%."""
    import json
    import os
    from collections import defaultdict

    from claude_proxy import count_text_tokens

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "token_corpus.json")
    with open(path, encoding="utf-8") as f:
        corpus = json.load(f)
    ref, est = defaultdict(int), defaultdict(int)
    under = []
    for sample in corpus:
        n = count_text_tokens(sample["text"])
        ref[sample["category"]] += sample["cl100k"]
        est[sample["category"]] += n
        if len(sample["text"]) >= 4000 and n < 0.9 * sample["cl100k"]:
            under.append((sample["category"], sample.get("source"), n, sample["cl100k"]))
    assert set(ref) >= {"prose", "code_python", "code_js", "code_go_or_rust", "json",
                        "shell_output", "cjk", "base64_noise"}
    errors = {cat: est[cat] / ref[cat] - 1 for cat in ref}
    off = {cat: f"{100 * e:+.1f}% ({est[cat]} vs {ref[cat]})" for cat, e in errors.items() if abs(e) > 0.10}
    assert not off, f"token estimate off by more than 10%: {off}"
    assert not under, f"long samples under-counted by more than 10%: {under}"


def test_count_tokens_claude_code_request_and_images():
    req = parse_fixture(2)
    count = cp.count_request_tokens(req)
    # cl100k over exactly what the backend receives (message contents, tool-call arguments, compact tool
    # definitions) is 10,718 tokens; the estimate adds a few per message and per tool for the template.
    assert abs(count - 10718) / 10718 < 0.10
    import base64
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (800).to_bytes(4, "big") + (600).to_bytes(4, "big")
    assert cp.image_tokens("image/png", base64.b64encode(header + b"\x08\x06\x00\x00\x00").decode()) == 640
    assert cp.image_tokens("image/png", "not base64 at all") == 1600  # unknown: Anthropic's maximum
