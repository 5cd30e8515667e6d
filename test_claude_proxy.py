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
