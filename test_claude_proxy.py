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
    assert sent["stream"] is True


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
    req = cp.parse_request({"model": "m", "max_tokens": 300, "temperature": 0.2, "top_p": 0.9, "top_k": 40,
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
