"""Tests for claude_proxy.py: the official anthropic SDK (and raw HTTP where the SDK cannot say it or would hide
a rule violation) against the proxy on loopback, in front of fake backends (conftest.py) that send the bytes
real servers send: answers, tool calls, error bodies (OpenAI, vLLM, llama.cpp, Ollama, an HTML page from a
reverse proxy, nothing at all), streams failing mid-way, stalling, refused and early-closed connections.
Plus unit tests of the pure translation, argument repair and validation, and property-based tests.

The sections follow claude_proxy.py's own (2 CONFIG ... 10 CLI; SHARED has no tests of its own), then 11, the real
Claude Code CLI end to end; the helpers they share are in conftest.py."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import claude_proxy as cp
from conftest import (
    ERROR_TYPES,
    FIXTURES,
    HERE,
    NDJSON,
    PARIS,
    PARIS_JSON,
    ROLE,
    SSE,
    TEXT,
    TOOLS,
    TZ,
    TZ_JSON,
    USAGE,
    USER_HI,
    VALID,
    WEATHER_TOOL,
    PNG_1x1,
    Reply,
    T,
    W,
    anthropic_only_keys,
    as_history,
    assert_error,
    assert_sdk_error,
    assert_serves,
    assert_tool_use,
    body_of,
    canonical,
    cc_fixture,
    check_stream,
    finish,
    frag,
    free_port,
    http,
    ndjson_bytes,
    oai_call,
    oai_chunk,
    oai_completion,
    oai_text_stream,
    oai_tool_call_chunks,
    oai_usage,
    oll_call,
    ollama_chunk,
    ollama_text_stream,
    pieces,
    raw_sse,
    raw_stream,
    req,
    run_modes,
    sse_bytes,
    sse_events,
    summarize,
    tc,
    text_answer,
    tool_answer,
    user,
    wait_for,
    write_sse,
)

# ======================================================================================
# 2. CONFIG
# ======================================================================================


# --- Configuration and the model map -----------------------------------------------------------


def test_config_precedence_flags_env_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        '# comment\nexport PORT=9001\nPROVIDER="openai"\nDEFAULT_MODEL=from-dotenv\nPROVIDER_TIMEOUT_MS=2500\n'
    )
    config = cp.load_config([], environ={"DEFAULT_MODEL": "from-env"}, dotenv_path=str(dotenv))
    assert (config.port, config.provider, config.default_model, config.timeout) == (9001, "openai", "from-env", 2.5)
    assert config.base_url == "http://127.0.0.1:8000/v1" and config.host == "127.0.0.1"
    config = cp.load_config(
        ["--model", "from-flag", "--port", "9002", "--timeout", "7"],
        environ={"DEFAULT_MODEL": "from-env"},
        dotenv_path=str(dotenv),
    )
    assert (config.default_model, config.port, config.timeout) == ("from-flag", 9002, 7.0)


def test_model_map_resolution(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(
        json.dumps(
            {
                "claude-*haiku*": "small",
                "claude-opus-5-5": "big",
                "claude-*": "mid",
                "claude-sonnet-4-5": {"model": "sonnet-ish", "max_tokens": 4096},
            }
        )
    )
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


BAD_CONFIGURATIONS = {  # name -> (flags, environment, what the one line on stderr says)
    "provider-flag": (["--provider", "bedrock"], {}, "unknown provider"),
    "port-not-a-number": (["--port", "http"], {}, "bad port"),
    "port-out-of-range": (["--port", "70000"], {}, "bad port"),
    "model-map-file-missing": (["--model-map", "/nonexistent/map.json"], {}, "cannot read model map"),
    "model-map-not-json": ([], {"MODEL_MAP_JSON": "{not json"}, "not valid JSON"),
    "model-map-entry-not-object": ([], {"MODEL_MAP_JSON": '{"claude-x": 5}'}, "model map entry"),
    "model-map-provider": (
        [],
        {"MODEL_MAP_JSON": '{"claude-x": {"model": "m", "provider": "vertex"}}'},
        "unknown provider",
    ),
    "model-map-max-tokens": ([], {"MODEL_MAP_JSON": '{"claude-x": {"model": "m", "max_tokens": -1}}'}, "max_tokens"),
    "model-map-api-key-env": (
        [],
        {"MODEL_MAP_JSON": '{"claude-x": {"model": "m", "api_key_env": "NOPE_NOT_SET"}}'},
        "NOPE_NOT_SET",
    ),
}


@pytest.fixture(scope="module")
def bad_configuration_runs(tmp_path_factory):
    """The proxy started with each bad configuration, all at once (each run is a fresh interpreter importing
    the proxy, ~0.35 s of CPU), in an empty directory (no .env): name -> Popen."""
    cwd = tmp_path_factory.mktemp("bad-configuration")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_MAP", "PROVIDER", "PORT"))}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(HERE / "claude_proxy.py"), *args],
            env={**clean, **env},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env, _) in BAD_CONFIGURATIONS.items()
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", list(BAD_CONFIGURATIONS))
def test_bad_configuration_exits_2_with_one_line(bad_configuration_runs, name):
    message = BAD_CONFIGURATIONS[name][2]
    proc = bad_configuration_runs[name]
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_main_api_key_never_goes_to_another_host():
    config = cp.Config(
        provider="openai",
        base_url="http://127.0.0.1:8000/v1",
        api_key="sk-local",
        model_map={
            "claude-a": "local-model",
            "claude-b": {"model": "hosted", "base_url": "https://api.example.com/v1"},
        },
    )
    assert cp.resolve_route(config, "claude-a").api_key == "sk-local"
    assert cp.resolve_route(config, "claude-b").api_key is None


# --- The option table: flags, environment, .env, defaults, README -----------------------------------


def test_readme_configuration_table_matches_the_option_table():
    section = (HERE / "README.md").read_text(encoding="utf-8").split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    readme = []
    for row in (line for line in section.splitlines() if line.startswith("| `--")):
        flag, env, default = (cell.strip() for cell in row.strip("|").split("|")[:3])
        readme.append(
            (
                re.findall(r"`(--[a-z-]+)`", flag),
                re.findall(r"`([A-Z][A-Z0-9_]*)(?:=[01])?`", env),
                default.replace("`", ""),
            )
        )
    table = [([o.flag] if o.flag else [], list(o.env), o.shown_default()) for o in cp.OPTIONS if o.flag or o.env]
    assert readme == table


def test_option_table_drives_config_flags_and_help():
    import dataclasses

    assert [f.name for f in dataclasses.fields(cp.Config)] == [o.name for o in cp.OPTIONS] + ["environ"]
    assert cp.load_config([], environ={}, dotenv_path="") == cp.Config()  # the same defaults both ways
    parser = cp.build_parser()
    flags = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help", "--version"}
    negated = {"--no-" + o.flag[2:] for o in cp.OPTIONS if o.flag and o.switch and o.default}  # BooleanOptionalAction
    assert flags == {o.flag for o in cp.OPTIONS if o.flag} | negated
    help_text = parser.format_help()
    for option in cp.OPTIONS:
        for name in option.env:
            assert name in help_text


def test_option_units_and_switches():
    env = {"PROVIDER_TIMEOUT_MS": "500", "MAX_BODY_MB": "1.5", "FETCH_IMAGES": "yes", "PROVIDER_RETRIES": "0"}
    config = cp.load_config([], environ=env, dotenv_path="")
    assert (config.timeout, config.max_body_bytes, config.fetch_images, config.retries) == (0.5, 3 << 19, True, 0)
    config = cp.load_config(["--timeout", "3", "--max-body-mb", "2", "--scale-usage"], environ=env, dotenv_path="")
    assert (config.timeout, config.max_body_bytes, config.scale_usage, config.fetch_images) == (
        3.0,
        2 << 20,
        True,
        True,
    )
    assert cp.load_config([], environ={"FETCH_IMAGES": "0"}, dotenv_path="").fetch_images is False


BAD_VALUES = {  # environment -> what the ConfigError says, the same from main(), create_app() and Config(...)
    "LOG_LEVEL": ("LOUD", "unknown log level 'LOUD'"),
    "LOG_FORMAT": ("xml", "unknown log format 'xml'"),
    "COUNT_TOKENS": ("exact", "unknown count tokens 'exact'"),
    "SYSTEM_MESSAGES": ("drop", "unknown system messages 'drop'"),
    "PROVIDER": ("bedrock", "unknown provider 'bedrock'"),
    "PORT": ("0", "bad port 0"),
    "PROVIDER_TIMEOUT_MS": ("0", "must be positive"),
    "PROVIDER_RETRIES": ("-1", "PROVIDER_RETRIES: expected a non-negative number, got '-1'"),
    "MAX_BODY_MB": ("lots", "MAX_BODY_MB: expected a non-negative number"),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_create_app_checks_what_main_checks(monkeypatch, tmp_path, name):
    value, message = BAD_VALUES[name]
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv(name, value)
    with pytest.raises(cp.ConfigError, match=re.escape(message)):
        cp.create_app()
    with pytest.raises(cp.ConfigError, match=re.escape(message)):
        cp.load_config([], environ={name: value}, dotenv_path="")


def test_config_checks_values_given_directly():
    with pytest.raises(cp.ConfigError, match="unknown log level 'LOUD'"):
        cp.Config(log_level="LOUD")
    with pytest.raises(cp.ConfigError, match="ping_interval: must be positive"):
        cp.Config(ping_interval=0)


def test_create_app_with_bad_log_level_is_a_configuration_error_not_a_value_error(tmp_path):
    """Regression: under gunicorn (no logging set up yet) create_app() raised ValueError from logging."""
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    result = subprocess.run(
        [sys.executable, "-c", "import claude_proxy; claude_proxy.create_app()"],
        env={**env, "LOG_LEVEL": "LOUD", "PYTHONPATH": str(HERE)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("claude_proxy.ConfigError: unknown log level 'LOUD'"), result.stderr
    assert "ValueError" not in result.stderr


def test_api_key_env_is_read_from_the_given_environment_and_dotenv(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_BACKEND_KEY", raising=False)
    dotenv = tmp_path / ".env"
    dotenv.write_text("MY_BACKEND_KEY=from-dotenv\n")
    entry = '{"claude-x": {"model": "m", "base_url": "https://other.example/v1", "api_key_env": "MY_BACKEND_KEY"}}'
    config = cp.load_config([], environ={"MODEL_MAP_JSON": entry}, dotenv_path=str(dotenv))
    assert config.routes["claude-x"].api_key == "from-dotenv"
    assert "MY_BACKEND_KEY" not in os.environ  # .env no longer leaks into the process environment
    config = cp.Config(model_map=json.loads(entry), environ={"MY_BACKEND_KEY": "given"})
    assert config.routes["claude-x"].api_key == "given"
    with pytest.raises(cp.ConfigError, match="MY_BACKEND_KEY is not set"):
        cp.Config(model_map=json.loads(entry))


def test_user_and_password_in_a_base_url_with_an_api_key_is_a_configuration_error():
    """Regression: aiohttp refuses both (ValueError): every request was a 500 and discovery said "unreachable"."""
    with pytest.raises(
        cp.ConfigError, match=r"^--base-url has user:password@ .* --api-key is set.* use one of them"
    ) as err:
        cp.load_config(["--base-url", "http://u:pw@h/v1"], environ={"PROVIDER_API_KEY": "sk-1"}, dotenv_path="")
    assert "pw" not in str(err.value) and "sk-1" not in str(err.value)
    entry = {"model": "m", "base_url": "https://u:pw@other.example/v1", "api_key_env": "OTHER_KEY"}
    with pytest.raises(cp.ConfigError, match=r"^model map entry 'claude-x': base_url has .* api_key_env OTHER_KEY"):
        cp.Config(model_map={"claude-x": entry}, environ={"OTHER_KEY": "sk-2"})
    # either one alone is fine (user:password goes as Basic, the key as Bearer), and the main key is never
    # sent to a map entry's own host
    del entry["api_key_env"]
    assert cp.Config(base_url="http://u:pw@h/v1").base_url == "http://u:pw@h/v1"
    assert cp.Config(api_key="sk-1", model_map={"claude-x": entry}).routes["claude-x"].api_key is None


def test_a_switch_on_by_default_can_be_turned_off(monkeypatch):
    extra = cp.Option("send_thing", "--send-thing", ("SEND_THING",), True, "send the thing", switch=True)
    monkeypatch.setattr(cp, "OPTIONS", (*cp.OPTIONS, extra))
    assert vars(cp.build_parser().parse_args(["--no-send-thing"]))["send_thing"] is False
    assert vars(cp.build_parser().parse_args([]))["send_thing"] is None
    assert (extra.value(False, {}), extra.value(None, {"SEND_THING": "0"}), extra.value(None, {})) == (
        False,
        False,
        True,
    )
    assert extra.shown_default() == "on" and "[SEND_THING=0]" in extra.help_text()


# ======================================================================================
# 3. WIRE TYPES AND VALIDATION
# ======================================================================================


# --- Errors: request validation ----------------------------------------------------------------


INVALID = [
    ("bad-json", b'{"model": "claude-opus-5-5", "max_tokens": ', "not valid JSON"),
    ("body-list", [VALID], "request body must be a JSON object"),
    ("body-string", "hello", "request body must be a JSON object"),
    ("body-null", None, "request body must be a JSON object"),
    ("no-model", req(model=...), "model"),
    ("model-int", req(model=5), "model"),
    ("model-empty", req(model=" "), "model"),
    ("no-max-tokens", req(max_tokens=...), "max_tokens"),
    ("max-tokens-negative", req(max_tokens=-1), "max_tokens"),
    ("max-tokens-string", req(max_tokens="100"), "max_tokens"),
    ("max-tokens-bool", req(max_tokens=True), "max_tokens"),
    ("max-tokens-float", req(max_tokens=10.5), "max_tokens"),
    ("no-messages", req(messages=...), "messages"),
    ("messages-empty", req(messages=[]), "messages"),
    ("messages-object", req(messages={"role": "user", "content": "hi"}), "messages"),
    ("message-string", req(messages=["hi"]), "messages.0"),
    ("unknown-role", req(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    ("no-role", req(messages=[{"content": "hi"}]), "messages.0.role"),
    ("no-content", req(messages=[{"role": "user"}]), "messages.0.content"),
    ("content-number", req(messages=[{"role": "user", "content": 42}]), "messages.0.content"),
    ("content-null", req(messages=[{"role": "user", "content": None}]), "messages.0.content"),
    ("block-not-object", req(messages=user("hi")), "messages.0.content.0"),
    ("block-without-type", req(messages=user({"text": "hi"})), "messages.0.content.0.type"),
    ("unknown-block-type", req(messages=user({"type": "video", "url": "x"})), "messages.0.content.0.type"),
    ("text-without-text", req(messages=user({"type": "text"})), "messages.0.content.0.text"),
    ("text-number", req(messages=user({"type": "text", "text": 3})), "messages.0.content.0.text"),
    (
        "image-bad-media-type",
        req(
            messages=user(
                TEXT, {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG_1x1}}
            )
        ),
        "messages.0.content.1.source.media_type",
    ),
    (
        "image-no-data",
        req(messages=user(TEXT, {"type": "image", "source": {"type": "base64", "media_type": "image/png"}})),
        "messages.0.content.1.source.data",
    ),
    ("image-no-source", req(messages=user(TEXT, {"type": "image"})), "messages.0.content.1.source"),
    (
        "image-source-file",
        req(
            messages=user(
                TEXT, {"type": "image", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}
            )
        ),
        "messages.0.content.1.source",
    ),
    (
        "image-source-unknown",
        req(messages=user(TEXT, {"type": "image", "source": {"type": "ftp", "url": "ftp://x"}})),
        "messages.0.content.1.source.type",
    ),
    (
        "tool-result-in-assistant",
        req(
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]},
            ]
        ),
        "messages.1.content.0.type",
    ),
    (
        "tool-use-in-user",
        req(messages=user({"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}})),
        "messages.0.content.0.type",
    ),
    (
        "tool-use-input-string",
        req(
            messages=[
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": "ls"}],
                },
            ]
        ),
        "messages.1.content.0.input",
    ),
    (
        "tool-result-no-id",
        req(messages=user({"type": "tool_result", "content": "x"})),
        "messages.0.content.0.tool_use_id",
    ),
    (
        "tool-result-bad-inner-block",
        req(messages=user({"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "tool_use"}]})),
        "messages.0.content.0.content.0.type",
    ),
    ("tools-not-list", req(tools={"name": "Bash"}), "tools"),
    ("tool-without-input-schema", req(tools=[{"name": "Bash", "description": "run"}]), "tools.0.input_schema"),
    ("tool-without-name", req(tools=[{"input_schema": {"type": "object"}}]), "tools.0.name"),
    (
        "tool-choice-tool-without-name",
        req(tools=[{"name": "Bash", "input_schema": {"type": "object"}}], tool_choice={"type": "tool"}),
        "tool_choice.name",
    ),
    ("tool-choice-bogus", req(tool_choice={"type": "sometimes"}), "tool_choice.type"),
    ("temperature-string", req(temperature="hot"), "temperature"),
    ("stop-sequences-string", req(stop_sequences="END"), "stop_sequences"),
    ("stream-string", req(stream="yes"), "stream"),
    ("system-number", req(system=7), "system"),
    (
        "system-image-block",
        req(system=[{"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]),
        "system.0.type",
    ),
    ("thinking-negative-budget", req(thinking={"type": "enabled", "budget_tokens": -5}), "thinking.budget_tokens"),
    ("metadata-user-id-number", req(metadata={"user_id": 12}), "metadata.user_id"),
]


@pytest.mark.parametrize("body,path", [(b, p) for _, b, p in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_request_is_400_naming_the_path(make_stack, body, path):
    stack = make_stack("openai")
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, headers, text = http(stack, "POST", "/v1/messages", raw)
    message = assert_error(code, headers, text, 400, "invalid_request_error", "false")
    assert path in message, message
    assert stack.backend.requests == []


@pytest.mark.parametrize(
    "source",
    [
        {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQKJcfsj6IKNSAwIG9iago="},
        {"type": "url", "url": "https://example.com/paper.pdf"},
    ],
)
def test_pdf_document_is_a_clear_400(make_stack, source):
    stack = make_stack("openai")
    body = req(messages=user({"type": "document", "source": source}, TEXT))
    with pytest.raises(anthropic.BadRequestError) as info:
        stack.client().messages.create(**body)
    message = assert_sdk_error(info.value, 400, "invalid_request_error")
    assert "messages.0.content.0.source" in message
    assert "PDF" in message or "pdf" in message
    assert "cannot" in message
    assert stack.backend.requests == []


def test_invalid_request_through_sdk(make_stack):
    stack = make_stack("openai")
    with pytest.raises(anthropic.BadRequestError) as info:
        stack.client().messages.create(model="claude-opus-5-5", max_tokens=-3, messages=USER_HI)
    assert "max_tokens" in assert_sdk_error(info.value, 400, "invalid_request_error")
    assert info.value.response.headers.get("x-should-retry") == "false"


def test_invalid_streaming_request_is_http_400(make_stack):
    stack = make_stack("openai")
    code, headers, text, events = raw_stream(stack, req(messages=[{"role": "robot", "content": "hi"}]))
    assert "messages.0.role" in assert_error(code, headers, text, 400, "invalid_request_error")
    assert events == []


def test_count_tokens_validates(make_stack):
    stack = make_stack("openai")
    code, headers, text = http(
        stack,
        "POST",
        "/v1/messages/count_tokens",
        {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": 5}]},
    )
    assert "messages.0.content" in assert_error(code, headers, text, 400, "invalid_request_error")


def test_unknown_fields_are_ignored(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "fine"))
    body = req(
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        some_future_field={"x": [1, 2]},
        service_tier="auto",
        container=None,
        messages=[
            {
                "role": "user",
                "id": "msg_x",
                "content": [
                    {
                        "type": "text",
                        "text": "hi",
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                        "citations": [],
                        "brand_new_flag": True,
                    }
                ],
            }
        ],
        tools=[
            {
                "name": "Bash",
                "input_schema": {"type": "object"},
                "cache_control": {"type": "ephemeral"},
                "eager_input_streaming": True,
                "input_examples": [{}],
            }
        ],
        tool_choice={"type": "auto", "future": 1},
        metadata={"user_id": '{"device_id":"d"}', "other": 1},
    )
    code, headers, text = http(stack, "POST", "/v1/messages", body)
    assert code == 200, text
    assert json.loads(text)["content"][0]["text"] == "fine"


@pytest.mark.parametrize("stream", [False, True])
def test_unmapped_model_is_400_naming_it(make_stack, stream):
    stack = make_stack("openai", default_model=None, discover=False, model_map={})
    body = req(model="claude-mystery-9")
    if stream:
        code, headers, text, _ = raw_stream(stack, body)
    else:
        code, headers, text = http(stack, "POST", "/v1/messages", body)
    message = assert_error(code, headers, text, 400, "invalid_request_error", "false")
    assert "claude-mystery-9" in message
    assert stack.backend.requests == []


def test_json_nested_deeper_than_the_encoder_is_a_400(make_stack):
    stack = make_stack("openai")
    schema: dict = {"type": "object"}
    for _ in range(300):
        schema = {"type": "object", "properties": {"x": schema}}
    body = req(tools=[{"name": "deep", "input_schema": schema}])
    code, headers, text = http(stack, "POST", "/v1/messages", body)
    assert "too deeply" in assert_error(code, headers, text, 400, "invalid_request_error", "false")


def test_json_nesting_limit_is_the_proxys_own(cp_without_orjson):
    """MAX_JSON_DEPTH, not the parser's or the encoder's limit: a request body is accepted or refused the same with
    and without orjson, below the parsers' own limits and past them."""

    def nested(depth: int) -> bytes:
        return ('{"a":' * (depth - 1) + "[1]" + "}" * (depth - 1)).encode()

    limit = cp.MAX_JSON_DEPTH
    assert limit == cp_without_orjson.MAX_JSON_DEPTH and limit < 255  # orjson's encoder stops at 255 levels
    for module in (cp, cp_without_orjson):
        for raw in (nested(limit), b"[[1]]", json.dumps({"s": "[{" * limit, "t": [[1]] * limit}).encode()):
            assert module.loads_request(raw) == json.loads(raw)
        for depth in (limit + 1, 300, 5000):
            with pytest.raises(module.JsonTooDeep, match=f"deeper than {limit} levels"):
                module.loads_request(nested(depth))


@pytest.mark.parametrize("extra", [0, 1])
def test_json_nesting_limit_end_to_end(make_stack, extra):
    """A request exactly MAX_JSON_DEPTH deep is forwarded; one level more is a 400, never sent to the backend."""
    stack = make_stack("openai")
    # the body, tools[], the tool: 3 levels; each wrapping below: 2 (the schema and its properties)
    wraps, odd = divmod(cp.MAX_JSON_DEPTH + extra - 4, 2)
    schema: dict = {"type": "object", "properties": {}} if odd else {"type": "object"}
    for _ in range(wraps):
        schema = {"type": "object", "properties": {"x": schema}}
    body = req(tools=[{"name": "deep", "input_schema": schema}])
    code, headers, text = http(stack, "POST", "/v1/messages", body)
    if extra:
        message = assert_error(code, headers, text, 400, "invalid_request_error", "false")
        assert f"too deeply (objects and arrays deeper than {cp.MAX_JSON_DEPTH} levels)" in message
        assert stack.backend.requests == []
    else:
        assert code == 200, text
        assert len(stack.backend.requests) == 1


def test_signature_inflation_is_bounded():
    import zlib

    bomb = cp.SIGNATURE_PREFIX + base64.urlsafe_b64encode(zlib.compress(b"a" * (64 << 20))).decode()
    started = time.monotonic()
    assert cp.reasoning_from_signature(bomb) == ""
    assert time.monotonic() - started < 1.0


def test_stdlib_json_rejects_what_orjson_rejects(cp_without_orjson):
    """Without orjson (the minimal install), the same inputs are refused and the same bytes written."""
    module = cp_without_orjson
    for raw in [
        b'{"a":"\\ud83d"}',
        b'{"a":"\\udc00"}',
        b'{"a":NaN}',
        b'{"a":1e400}',
        b'{"a":' + b"9" * 400 + b"}",
        b'{"a":"\\\\\\\\ud800\\udc00"}',
        b'{"a":"\xed\xa0\x80"}',
        b'\xef\xbb\xbf{"a":1}',
        '{"a":1}'.encode("utf-16"),
    ]:
        with pytest.raises(ValueError):
            module.loads(raw)
        with pytest.raises(ValueError):
            cp.loads(raw)  # orjson refuses the same
    with pytest.raises(ValueError):  # nesting beyond the recursion limit: a clean error, never a crash
        module.loads(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert module.loads(b'{"a":18446744073709551615,"b":-9223372036854775808}') == cp.loads(
        b'{"a":18446744073709551615,"b":-9223372036854775808}'
    )
    assert module.loads(b'{"a":"\\ud83d\\ude00","b":"\\\\ud83d"}') == {"a": "\U0001f600", "b": "\\ud83d"}
    value = {"t": 'naïve \u2028 "q" \\ \n\t\x01 😀', "n": [1, 2.5, None, True, -3]}
    assert module.dumps_bytes(value) == cp.dumps_bytes(value) and module.dumps(value) == cp.dumps(value)


# --- Property-based: never a 500, never a hang -------------------------------------------------


def check_answer(code: int, headers: dict, text: str, stream: bool) -> None:
    assert code == 200 or 400 <= code < 500, (code, text[:500])
    if code == 200:
        if stream:
            names = [n for n, _ in raw_sse(text)]
            assert names[0] == "message_start" and names[-1] == "message_stop", names
        else:
            assert json.loads(text)["type"] == "message"
        return
    body = json.loads(text)
    assert body["type"] == "error" and body["error"]["type"] in ERROR_TYPES, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert headers.get("request-id")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "model",
                    "max_tokens",
                    "messages",
                    "role",
                    "content",
                    "type",
                    "text",
                    "source",
                    "tools",
                    "tool_choice",
                    "system",
                    "stream",
                    "name",
                    "input",
                    "thinking",
                    "x",
                ]
            )
            | st.text(max_size=6),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


def test_property_arbitrary_json(make_stack):
    stack = make_stack("openai")

    @settings(
        max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(json_values)
    def check(body):
        code, headers, text = http(stack, "POST", "/v1/messages", body, timeout=5)
        check_answer(code, headers, text, isinstance(body, dict) and body.get("stream") is True)

    check()


def _base_request(draw) -> dict:
    tool = {
        "name": "Bash",
        "description": "Run a command",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
    }
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "list files"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1x1}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "ok"},
                {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {"command": "ls"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": [{"type": "text", "text": "a.txt"}],
                    "is_error": False,
                }
            ],
        },
        {"role": "system", "content": "env: linux"},
    ]
    body: dict[str, Any] = {
        "model": "claude-opus-5-5",
        "max_tokens": 1000,
        "messages": messages[: draw(st.integers(1, len(messages)))],
    }
    if draw(st.booleans()):
        body["system"] = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    if draw(st.booleans()):
        body["tools"] = [tool]
        body["tool_choice"] = draw(
            st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}, {"type": "tool", "name": "Bash"}])
        )
    if draw(st.booleans()):
        body["thinking"] = {"type": "adaptive", "display": "omitted"}
    body["stream"] = draw(st.booleans())
    return body


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _get(value: Any, path: tuple) -> Any:
    for p in path:
        value = value[p]
    return value


BLOCK_TYPES = [
    "text",
    "image",
    "document",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
    "server_tool_use",
    "web_search_tool_result",
    "search_result",
    "tool_reference",
    "compaction",
    "video",
    "",
    "TEXT",
    "mcp_tool_use",
    "container_upload",
]


@st.composite
def near_valid_requests(draw) -> dict:
    body = _base_request(draw)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(body) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get(body, path[:-1]), path[-1]
        kind = draw(st.sampled_from(["drop", "retype", "block-type", "null", "empty"]))
        if kind == "drop":
            if isinstance(parent, dict):
                del parent[key]
            else:
                parent.pop(key)
        elif kind == "retype":
            parent[key] = draw(st.sampled_from([0, -1, 1.5, True, "x", [], {}, [1], {"type": "text"}, "", None]))
        elif kind == "block-type":
            target = _get(body, path)
            if isinstance(target, dict):
                target["type"] = draw(st.sampled_from(BLOCK_TYPES))
            else:
                parent[key] = {"type": draw(st.sampled_from(BLOCK_TYPES)), "text": "t"}
        elif kind == "null":
            parent[key] = None
        else:
            target = _get(body, path)
            parent[key] = type(target)() if isinstance(target, (list, dict, str)) else target
    return body


def test_property_near_valid_requests(make_stack, provider):
    stack = make_stack(provider)

    @settings(
        max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(near_valid_requests())
    def check(body):
        code, headers, text = http(stack, "POST", "/v1/messages", body, timeout=5)
        check_answer(code, headers, text, isinstance(body, dict) and body.get("stream") is True)

    check()


def test_parse_request_never_crashes_unit():
    """The validator itself: any JSON -> a MessagesRequest or an ApiError(400), nothing else."""

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(json_values | near_valid_requests())
    def check(body):
        try:
            cp.parse_request(body)
        except cp.ApiError as exc:
            assert exc.status == 400 and exc.type == "invalid_request_error"

    check()


# --- JSON: the same with and without orjson ----------------------------------------------------


def test_json_output_same_with_and_without_orjson():
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    for value in [
        {"type": "text_delta", "text": 'naïve \u2028 "quoted" \\ \n\t\x01 😀'},
        {"a": [1, 2.5, None, True]},
        {"input": {"nested": {"k": "v"}}, "n": -3},
    ]:
        assert cp.dumps(value) == encoder.encode(value)
        assert cp.dumps_bytes(value) == encoder.encode(value).encode()


# ======================================================================================
# 4. TOKENS
# ======================================================================================


# --- Token counting ----------------------------------------------------------------------------


def test_count_tokens_through_sdk(make_stack):
    stack = make_stack("openai")
    result = stack.client().messages.count_tokens(
        model="claude-opus-5-5",
        system="You are terse.",
        messages=[{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}],
    )
    assert 10 <= result.input_tokens <= 40
    assert stack.backend.requests == []  # no backend call


@pytest.mark.parametrize("tokenizer", ["vllm", "llamacpp", None])
def test_count_tokens_with_backend_tokenizer(make_stack, tokenizer, caplog):
    stack = make_stack("openai", count_tokens="backend")
    stack.backend.tokenizer = tokenizer
    kwargs = dict(
        model="claude-opus-5-5", system="sys words here", messages=[{"role": "user", "content": "one two three four"}]
    )
    counts = [stack.client().messages.count_tokens(**kwargs).input_tokens for _ in range(2)]
    heuristic = cp.count_request_tokens(cp.parse_request(dict(kwargs), count_only=True))
    expected = {"vllm": 321, "llamacpp": 7, None: heuristic}[tokenizer]
    assert counts == [expected, expected]
    calls = [r for r in stack.backend.requests if "tokenize" in r]
    if tokenizer == "vllm":
        assert len(calls) == 1 and calls[0]["tokenize"]["messages"][0]["role"] == "system"  # cached after one call
    if tokenizer is None:
        assert "no usable tokenizer" in caplog.text


def test_token_counter_accuracy_by_category():
    """count_text_tokens() is within 10% of tiktoken cl100k_base for every
    category of fixtures/token_corpus.json (counts precomputed in the file),
    and never under-counts a long sample by more than 10%."""
    corpus = json.loads((FIXTURES / "token_corpus.json").read_text(encoding="utf-8"))
    ref, est = defaultdict(int), defaultdict(int)
    under = []
    for sample in corpus:
        n = cp.count_text_tokens(sample["text"])
        ref[sample["category"]] += sample["cl100k"]
        est[sample["category"]] += n
        if len(sample["text"]) >= 4000 and n < 0.9 * sample["cl100k"]:
            under.append((sample["category"], sample.get("source"), n, sample["cl100k"]))
    assert set(ref) >= {
        "prose",
        "code_python",
        "code_js",
        "code_go_or_rust",
        "json",
        "shell_output",
        "cjk",
        "base64_noise",
    }
    errors = {cat: est[cat] / ref[cat] - 1 for cat in ref}
    off = {cat: f"{100 * e:+.1f}% ({est[cat]} vs {ref[cat]})" for cat, e in errors.items() if abs(e) > 0.10}
    assert not off, f"token estimate off by more than 10%: {off}"
    assert not under, f"long samples under-counted by more than 10%: {under}"


def test_token_counter_accuracy_by_language():
    """count_text_tokens() is within 10% of cl100k_base for every language and mixed-text category of
    fixtures/token_corpus_i18n.json (real text: UDHR, Django/Sphinx/Debian translations, translated man pages,
    code and Markdown with CJK, emoji; counts precomputed by bench/token_corpus_i18n.py), and no sample of
    2,000 characters or more is off by more than 15%."""
    long_sample_tolerance = 0.15
    corpus = json.loads((FIXTURES / "token_corpus_i18n.json").read_text(encoding="utf-8"))
    ref, est = defaultdict(int), defaultdict(int)
    off_samples = []
    for sample in corpus:
        assert sample["source"] and sample["licence"]
        n = cp.count_text_tokens(sample["text"])
        ref[sample["category"]] += sample["cl100k"]
        est[sample["category"]] += n
        if len(sample["text"]) >= 2000 and abs(n / sample["cl100k"] - 1) > long_sample_tolerance:
            off_samples.append((sample["category"], sample["source"], n, sample["cl100k"]))
    languages = "en fr de es pt it nl pl cs tr vi ru uk el ar he hi th zh ja ko".split()
    assert set(ref) >= {*languages, "mixed_code", "mixed_markdown_cjk", "mixed_emoji"}
    errors = {cat: est[cat] / ref[cat] - 1 for cat in ref}
    off = {cat: f"{100 * e:+.1f}% ({est[cat]} vs {ref[cat]})" for cat, e in errors.items() if abs(e) > 0.10}
    assert not off, f"token estimate off by more than 10%: {off}"
    assert not off_samples, f"long samples off by more than {long_sample_tolerance:.0%}: {off_samples}"


def test_count_tokens_claude_code_request_and_images():
    request = parse_fixture(2)
    count = cp.count_request_tokens(request)
    # cl100k over exactly what the backend receives (message contents, tool-call arguments, compact tool
    # definitions) is 10,718 tokens; the estimate adds a few per message and per tool for the template.
    assert abs(count - 10718) / 10718 < 0.10
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (800).to_bytes(4, "big") + (600).to_bytes(4, "big")
    assert cp.image_tokens("image/png", base64.b64encode(header + b"\x08\x06\x00\x00\x00").decode()) == 640
    assert cp.image_tokens("image/png", "not base64 at all") == 1600  # unknown: Anthropic's maximum


# ======================================================================================
# 5. REQUEST TRANSLATION
# ======================================================================================


# --- Pure translation: Claude Code's real requests, cache-stable prompts, system messages ------


def parse_fixture(turn: int) -> cp.MessagesRequest:
    return cp.parse_request(cc_fixture(turn)["body"])


ROUTE_OPENAI = cp.Route("qwen3-coder", "openai", "http://127.0.0.1:8000/v1")


ROUTE_OLLAMA = cp.Route("qwen3:8b", "ollama", "http://127.0.0.1:11434")


def backend_body(request: cp.MessagesRequest, provider: str, strategy: str = "reminder") -> dict:
    """What the proxy sends the backend for this parsed request."""
    route = ROUTE_OPENAI if provider == "openai" else ROUTE_OLLAMA
    conv = cp.build_conversation(request, strategy)
    return cp.PROVIDER_IMPLS[provider].body(conv, request, route)[0]


def test_claude_code_fixture_translates(provider):
    request = parse_fixture(2)
    body = backend_body(request, provider)
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
        assert "user" not in body  # Claude Code's device and session ids stay here unless --send-user-id
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
    base = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "system", "content": "note A"},
    ]
    longer = base + [{"role": "user", "content": "next"}]
    r1 = cp.parse_request({"model": "m", "max_tokens": 5, "messages": base})
    r2 = cp.parse_request({"model": "m", "max_tokens": 5, "messages": longer})
    b1, b2 = backend_body(r1, "openai"), backend_body(r2, "openai")
    assert b1["messages"][:2] == b2["messages"][:2]
    assert b1["messages"][-1] == {"role": "user", "content": "<system-reminder>\nnote A\n</system-reminder>"}
    assert b2["messages"][-1]["content"] == "<system-reminder>\nnote A\n</system-reminder>\n\nnext"


@pytest.mark.parametrize("strategy", ["reminder", "hoist", "inline"])
def test_system_message_strategies(strategy):
    request = cp.parse_request(
        {
            "model": "m",
            "max_tokens": 5,
            "system": "S",
            "messages": [
                {"role": "user", "content": "u1"},
                {"role": "system", "content": [{"type": "text", "text": "env"}]},
                {"role": "system", "content": []},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
            ],
        }
    )
    messages = backend_body(request, "openai", strategy)["messages"]
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
    request = cp.parse_request(
        {
            "model": "m",
            "max_tokens": 300,
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "stream": True,
            "stop_sequences": ["###"],
            "metadata": {"user_id": "u-1"},
            "messages": [{"role": "user", "content": "x"}],
        }
    )
    openai = backend_body(request, "openai")
    assert (
        openai["max_tokens"],
        openai["temperature"],
        openai["top_p"],
        openai["top_k"],
        openai.get("user"),
    ) == (300, 0.2, 0.9, 40, None)
    assert "stop" not in openai  # the proxy watches for stop sequences itself (issue 13)
    assert openai["stream_options"] == {"include_usage": True}
    official = cp.PROVIDER_IMPLS["openai"].body(
        cp.build_conversation(request), request, cp.Route("gpt-4.1", "openai", "https://api.openai.com/v1")
    )[0]
    assert "top_k" not in official  # the official API rejects it
    ollama = backend_body(request, "ollama")
    assert ollama["options"] == {
        "num_predict": 300,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "num_ctx": 32768,
    }
    assert ollama["stream"] is True and "user" not in ollama


def test_map_cap_and_context_window():
    request = cp.parse_request({"model": "m", "max_tokens": 128000, "messages": [{"role": "user", "content": "x"}]})
    route = cp.Route("small", "ollama", "http://h", max_tokens=8192, context_window=32768)
    body = cp.ollama_request(cp.build_conversation(request), request, route)
    assert body["options"]["num_predict"] == 8192 and body["options"]["num_ctx"] == 32768


# --- Tool use: the real Claude Code turn 2 (parallel tool calls and their results) -------------


def replay(stack, body: dict, fixture: dict) -> dict:
    headers = {k: v for k, v in fixture["headers"].items() if k.lower() not in ("content-length", "host")}
    status, _, text = http(stack, "POST", fixture["path"], body, headers)
    assert status == 200, text
    events = raw_sse(text)
    assert events[-1][0] == "message_stop"
    return stack.backend.requests[-1]


def test_fixture_turn2(make_stack, provider):
    fx = cc_fixture(2)
    body = fx["body"]
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "one", " two"))
    sent = replay(stack, body, fx)
    msgs = sent["messages"]
    calls = [b for b in body["messages"][2]["content"] if b["type"] == "tool_use"]
    results = [b for b in body["messages"][3]["content"] if b["type"] == "tool_result"]
    a = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    assistant = msgs[a]
    assert [c["id"] for c in assistant["tool_calls"]] == [c["id"] for c in calls]
    for got, want in zip(assistant["tool_calls"], calls):
        assert got["function"]["name"] == want["name"]
        if provider == "openai":
            assert got["type"] == "function"
            assert isinstance(got["function"]["arguments"], str)
            assert json.loads(got["function"]["arguments"]) == want["input"]
        else:
            assert got["function"]["arguments"] == want["input"]  # an object, not a string
    tool_msgs = msgs[a + 1 : a + 3]
    assert [m["role"] for m in tool_msgs] == ["tool", "tool"]
    assert [m["tool_call_id"] for m in tool_msgs] == [r["tool_use_id"] for r in results]
    assert [m["content"] for m in tool_msgs] == ["one", "two"]
    # tools: everything but the deferred one, by their original names
    want_tools = [t["name"] for t in body["tools"] if not t.get("defer_loading")]
    assert [t["function"]["name"] for t in sent["tools"]] == want_tools
    assert anthropic_only_keys(sent) == []
    # the role:"system" message is kept, as a <system-reminder> in a user message
    env = body["messages"][1]["content"]
    env_text = env if isinstance(env, str) else env[0]["text"]
    users = [m["content"] for m in msgs if m["role"] == "user"]
    assert any(isinstance(c, str) and f"<system-reminder>\n{env_text}" in c for c in users), users
    if provider == "openai":
        assert assistant.get("content") in ("", None)
        assert len(msgs) == a + 3  # nothing after the tool messages (the turn holds only tool results)
        assert "DeferredToolPlaceholder" not in json.dumps(sent["tools"])
        assert sent["max_tokens"] == 128000
        assert "Run two commands" in users[0]
    else:
        assert [m["tool_name"] for m in tool_msgs] == ["Bash", "Bash"]
        assert sent["options"]["num_predict"] == 128000


def test_fixture_turn1_is_prefix_of_turn2(make_stack, provider):
    """The real turn 1 and turn 2 requests: what the backend gets for turn 1 is a prefix of turn 2 (KV cache)."""
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "x"), text_answer(provider, "y"))
    first = replay(stack, cc_fixture(1)["body"], cc_fixture(1))
    second = replay(stack, cc_fixture(2)["body"], cc_fixture(2))
    m1, m2 = first["messages"], second["messages"]
    assert len(m2) > len(m1)
    for i, msg in enumerate(m1):
        assert json.dumps(msg) == json.dumps(m2[i]), i
    assert json.dumps(first["tools"]) == json.dumps(second["tools"])


def test_fixture_deferred_tool_revealed_by_tool_reference(make_stack, provider):
    fx = cc_fixture(2)
    body = copy.deepcopy(fx["body"])
    body["messages"][3]["content"][1]["content"] = [
        {"type": "text", "text": "two"},
        {"type": "tool_reference", "tool_name": "DeferredToolPlaceholder"},
    ]
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "ok"))
    sent = replay(stack, body, fx)
    names = [t["function"]["name"] for t in sent["tools"]]
    assert "DeferredToolPlaceholder" in names
    assert len(names) == len(body["tools"])
    assert anthropic_only_keys(sent) == []
    tool_msgs = [m for m in sent["messages"] if m["role"] == "tool"]
    assert tool_msgs[1]["content"].startswith("two")
    assert "DeferredToolPlaceholder" in tool_msgs[1]["content"]


def test_fixture_through_sdk(make_stack, provider):
    """The same body through the SDK's stream accumulator (extra fields via extra_body)."""
    body = copy.deepcopy(cc_fixture(2)["body"])
    body.pop("stream")
    extra = {"context_management": body.pop("context_management"), "output_config": body.pop("output_config")}
    stack = make_stack(provider)
    stack.backend.queue(tool_answer(provider, [("call_zz00zz00zz", "Bash", {"command": "echo three"})], "Next:"))
    with stack.client().messages.stream(extra_body=extra, **body) as s:
        final = s.get_final_message()
    assert summarize(final)["blocks"] == [("text", "Next:"), ("tool_use", "Bash", {"command": "echo three"})]
    assert final.stop_reason == "tool_use"
    sent = stack.backend.requests[0]
    ids = [c["id"] for m in sent["messages"] for c in m.get("tool_calls") or ()]
    assert ids == ["toolu_479c5658869b425f979f78ed", "toolu_730d3b4b5c8840ae8c38b534"]


# --- Tool use: tool_choice ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "choice, expected, parallel",
    [
        (None, None, None),
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        ({"type": "tool", "name": "get_time"}, {"type": "function", "function": {"name": "get_time"}}, None),
        ({"type": "none"}, "none", None),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        (
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            {"type": "function", "function": {"name": "get_weather"}},
            False,
        ),
        ({"type": "auto", "disable_parallel_tool_use": False}, "auto", None),
    ],
)
def test_openai_tool_choice(make_stack, choice, expected, parallel):
    stack = make_stack("openai")
    stack.backend.queue(text_answer("openai", "ok"))
    kw = {"tool_choice": choice} if choice else {}
    stack.client().messages.create(**body_of(**kw))
    sent = stack.backend.requests[0]
    assert sent.get("tool_choice") == expected
    assert sent.get("parallel_tool_calls") == parallel
    if expected != "none":
        assert [t["function"]["name"] for t in sent["tools"]] == [t["name"] for t in TOOLS]


@pytest.mark.parametrize(
    "choice, has_tools",
    [
        (None, True),
        ({"type": "auto"}, True),
        ({"type": "any"}, True),
        ({"type": "tool", "name": "get_time"}, True),
        ({"type": "none"}, False),
        ({"type": "auto", "disable_parallel_tool_use": True}, True),
    ],
)
def test_ollama_tool_choice(make_stack, choice, has_tools):
    stack = make_stack("ollama")
    stack.backend.queue(text_answer("ollama", "ok"))
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": PARIS}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "Sunny"}]},
    ]
    kw = {"tool_choice": choice} if choice else {}
    stack.client().messages.create(**body_of(messages=history, **kw))
    sent = stack.backend.requests[0]
    assert ("tools" in sent) is has_tools
    assert "tool_choice" not in sent and "parallel_tool_calls" not in sent
    # tool history stays in the messages even when tools are removed
    assert sent["messages"][-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][-1]["role"] == "tool"


# --- Tool use: tool_result variants ------------------------------------------------------------


def two_calls_then(results: list, after: list = ()) -> list:
    return [
        {"role": "user", "content": "Do two things."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Doing both."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": PARIS},
                {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": TZ},
            ],
        },
        {"role": "user", "content": list(results) + list(after)},
    ]


def send(stack, provider, messages) -> list:
    stack.backend.queue(text_answer(provider, "ok"))
    stack.client().messages.create(**body_of(messages=messages))
    return stack.backend.requests[-1]["messages"]


def test_tool_result_is_error(make_stack, provider):
    stack = make_stack(provider)
    msgs = send(
        stack,
        provider,
        two_calls_then(
            [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "city not found", "is_error": True},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B",
                    "is_error": True,
                    "content": [{"type": "text", "text": "bad tz"}],
                },
            ]
        ),
    )
    tools = [m for m in msgs if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tools] == ["toolu_01A", "toolu_01B"]
    assert tools[0]["content"].startswith("Error") and "city not found" in tools[0]["content"]
    assert tools[1]["content"].startswith("Error") and "bad tz" in tools[1]["content"]
    assert msgs[-1]["role"] == "tool"


def test_tool_result_is_error_false_not_marked(make_stack, provider):
    stack = make_stack(provider)
    msgs = send(
        stack,
        provider,
        two_calls_then(
            [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "Sunny", "is_error": False},
                {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "12:00"},
            ]
        ),
    )
    assert [m["content"] for m in msgs if m["role"] == "tool"] == ["Sunny", "12:00"]


SCREENSHOT_RESULTS = [  # the first result holds an image
    {
        "type": "tool_result",
        "tool_use_id": "toolu_01A",
        "content": [
            {"type": "text", "text": "screenshot:"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1x1}},
        ],
    },
    {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "12:00"},
]


def test_tool_result_images_openai(make_stack):
    """OpenAI tool messages are text only: images go in ONE user message after ALL tool messages."""
    stack = make_stack("openai")
    msgs = send(
        stack, "openai", two_calls_then(SCREENSHOT_RESULTS, after=[{"type": "text", "text": "What do you see?"}])
    )
    a = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    assert [m["role"] for m in msgs[a:]] == ["assistant", "tool", "tool", "user"]
    assert [m["tool_call_id"] for m in msgs[a + 1 : a + 3]] == ["toolu_01A", "toolu_01B"]
    assert all(isinstance(m["content"], str) for m in msgs[a + 1 : a + 3])
    assert msgs[a + 1]["content"].startswith("screenshot:")
    assert msgs[a + 2]["content"] == "12:00"
    user_content = msgs[-1]["content"]
    assert isinstance(user_content, list)
    urls = [p["image_url"]["url"] for p in user_content if p["type"] == "image_url"]
    assert urls == [f"data:image/png;base64,{PNG_1x1}"]
    texts = [p["text"] for p in user_content if p["type"] == "text"]
    assert "What do you see?" in texts
    # the image comes before the user's own text, so it reads as the tool output
    kinds = [p["type"] for p in user_content]
    assert kinds.index("image_url") < max(i for i, p in enumerate(user_content) if p.get("text") == "What do you see?")


def test_tool_result_images_ollama(make_stack):
    stack = make_stack("ollama")
    msgs = send(stack, "ollama", two_calls_then(SCREENSHOT_RESULTS))
    a = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    assert [m["role"] for m in msgs[a : a + 3]] == ["assistant", "tool", "tool"]
    assert [m["tool_name"] for m in msgs[a + 1 : a + 3]] == ["get_weather", "get_time"]
    images = [(i, img) for i, m in enumerate(msgs) for img in m.get("images") or ()]
    assert images and all(i > a for i, _ in images)
    assert [img for _, img in images] == [PNG_1x1]  # raw base64, no data: prefix
    assert all(i >= a + 3 for i, _ in images)  # never between the tool messages


@pytest.mark.parametrize("content", ["", [], None], ids=["empty_string", "empty_list", "absent"])
def test_tool_result_empty_content(make_stack, provider, content):
    stack = make_stack(provider)
    result = {"type": "tool_result", "tool_use_id": "toolu_01A"}
    if content is not None:
        result["content"] = content
    msgs = send(
        stack,
        provider,
        two_calls_then([result, {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "12:00"}]),
    )
    tools = [m for m in msgs if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tools] == ["toolu_01A", "toolu_01B"]
    assert isinstance(tools[0]["content"], str)
    assert tools[1]["content"] == "12:00"
    if provider == "ollama":
        assert [m["tool_name"] for m in tools] == ["get_weather", "get_time"]


def test_tool_result_text_and_document_blocks(make_stack, provider):
    stack = make_stack(provider)
    msgs = send(
        stack,
        provider,
        two_calls_then(
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01A",
                    "content": [
                        {"type": "text", "text": "part one"},
                        {"type": "text", "text": "part two"},
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "doc body"},
                            "title": "T",
                        },
                    ],
                },
                {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "12:00"},
            ]
        ),
    )
    first = next(m for m in msgs if m["role"] == "tool")
    for needle in ("part one", "part two", "doc body"):
        assert needle in first["content"]


# --- Tool use: server tools are dropped with a warning -----------------------------------------


def test_server_tools_dropped_with_warning(make_stack, provider, caplog):
    caplog.set_level(logging.WARNING, logger="claude_proxy")
    name = f"web_search_{uuid.uuid4().hex[:8]}"  # warnings are once per process: a fresh name
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "ok"))
    msg = stack.client().messages.create(
        **body_of(
            tools=[
                WEATHER_TOOL,
                {"type": "web_search_20250305", "name": name, "max_uses": 5},
                {"type": "custom", "name": "custom_typed", "input_schema": {"type": "object"}},
            ]
        )
    )
    assert msg.content[0].text == "ok"
    sent = stack.backend.requests[0]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "custom_typed"]
    warnings = [
        r
        for r in caplog.records
        if r.name == "claude_proxy" and r.levelno == logging.WARNING and name in r.getMessage()
    ]
    assert warnings, [r.getMessage() for r in caplog.records]


def test_only_server_tools_sends_no_tools(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "ok"))
    stack.client().messages.create(
        **body_of(tools=[{"type": "web_search_20250305", "name": "web_search"}], tool_choice={"type": "auto"})
    )
    sent = stack.backend.requests[0]
    assert "tools" not in sent and "tool_choice" not in sent


def test_server_tool_blocks_in_history(make_stack, provider):
    """server_tool_use / web_search_tool_result blocks from an earlier Anthropic turn: no crash, no function call."""
    stack = make_stack(provider)
    history = [
        {"role": "user", "content": "Search"},
        {
            "role": "assistant",
            "content": [
                {"type": "server_tool_use", "id": "srvtoolu_01X", "name": "web_search", "input": {"query": "q"}},
                {
                    "type": "web_search_tool_result",
                    "tool_use_id": "srvtoolu_01X",
                    "content": [
                        {
                            "type": "web_search_result",
                            "title": "R",
                            "url": "https://e.com",
                            "encrypted_content": "zz",
                            "page_age": None,
                        }
                    ],
                },
                {"type": "text", "text": "Found it."},
            ],
        },
        {"role": "user", "content": "Thanks"},
    ]
    stack.backend.queue(text_answer(provider, "ok"))
    msg = stack.client().messages.create(
        **body_of(messages=history, tools=[WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search"}])
    )
    assert msg.content[0].text == "ok"
    sent = stack.backend.requests[0]
    assert not any(m.get("tool_calls") for m in sent["messages"])
    assert "zz" not in json.dumps(sent)  # encrypted content is not sent


# --- Tool use: a multi-step agent loop: what the backend sees, and prefix (cache) stability ----


def test_multi_step_loop(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(
        tool_answer(provider, [("call_turn1000001", "get_weather", PARIS)]),
        tool_answer(provider, [("call_turn2000001", "get_time", TZ)], text="Now the time."),
        text_answer(provider, "Sunny, ", "noon."),
    )
    client = stack.client()
    messages: list = [{"role": "user", "content": "Weather and time in Paris?"}]
    system = "You are a helpful agent."
    results = {"get_weather": "Sunny, 21C", "get_time": "12:00"}
    finals = []
    for _ in range(3):
        with client.messages.stream(
            model="claude-opus-5-5", max_tokens=1024, system=system, tools=TOOLS, messages=messages
        ) as s:
            msg = s.get_final_message()
        finals.append(msg)
        if msg.stop_reason != "tool_use":
            break
        messages = messages + [
            as_history(msg),
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": b.id, "content": results[b.name]}
                    for b in msg.content
                    if b.type == "tool_use"
                ],
            },
        ]
    assert [m.stop_reason for m in finals] == ["tool_use", "tool_use", "end_turn"]
    assert finals[-1].content[0].text == "Sunny, noon."
    reqs = stack.backend.requests
    assert len(reqs) == 3
    call1 = finals[0].content[0]
    call2 = [b for b in finals[1].content if b.type == "tool_use"][0]
    # turn 2: system, user, assistant(call 1), tool(result 1)
    m2 = reqs[1]["messages"]
    assert [m["role"] for m in m2] == ["system", "user", "assistant", "tool"]
    assert m2[2]["tool_calls"][0]["id"] == call1.id
    assert m2[3]["tool_call_id"] == call1.id and m2[3]["content"] == "Sunny, 21C"
    args = m2[2]["tool_calls"][0]["function"]["arguments"]
    assert (json.loads(args) if provider == "openai" else args) == PARIS
    if provider == "ollama":
        assert m2[3]["tool_name"] == "get_weather"
    m3 = reqs[2]["messages"]
    assert [m["role"] for m in m3] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert m3[4]["content"] == "Now the time."
    assert m3[4]["tool_calls"][0]["id"] == call2.id and m3[5]["tool_call_id"] == call2.id
    # cache stability: each request's messages are a byte-for-byte prefix of the next one's
    for earlier, later in ((reqs[0], reqs[1]), (reqs[1], reqs[2])):
        a, b = earlier["messages"], later["messages"]
        assert len(b) > len(a)
        for i in range(len(a)):
            assert json.dumps(a[i]) == json.dumps(b[i]), (i, a[i], b[i])
        assert json.dumps(earlier["tools"]) == json.dumps(later["tools"])


def test_multi_step_loop_with_thinking_history_openai(make_stack):
    """Thinking returned with a tool call comes back in history; the prefix stays stable across turns."""
    stack = make_stack("openai")
    stack.backend.queue(
        SSE(
            [ROLE, oai_chunk({"reasoning_content": "Need weather."})]
            + canonical(0, "call_turn1000001", "get_weather", PARIS_JSON)
            + [finish(), USAGE]
        ),
        text_answer("openai", "Sunny."),
        text_answer("openai", "Bye."),
    )
    client = stack.client()
    messages: list = [{"role": "user", "content": "Weather?"}]
    msg = client.messages.create(model="claude-opus-5-5", max_tokens=1024, tools=TOOLS, messages=messages)
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    messages += [
        as_history(msg),
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": msg.content[1].id, "content": "Sunny"}]},
    ]
    msg2 = client.messages.create(model="claude-opus-5-5", max_tokens=1024, tools=TOOLS, messages=messages)
    messages += [as_history(msg2), {"role": "user", "content": "Thanks"}]
    client.messages.create(model="claude-opus-5-5", max_tokens=1024, tools=TOOLS, messages=messages)
    r2, r3 = stack.backend.requests[1]["messages"], stack.backend.requests[2]["messages"]
    assert r2[1]["reasoning_content"] == "Need weather."  # the current tool loop's reasoning goes back (issue 13)
    for i in range(len(r2)):  # after a new user message it is dropped, as Qwen3's template renders it
        r2[i].pop("reasoning_content", None)
        assert json.dumps(r2[i]) == json.dumps(r3[i]), i


# --- Tool use: names OpenAI cannot take: shortened for the backend, mapped back for the client ---


LONG = "mcp__a_very_long_server_name_for_testing__" + "create_pull_request_review_comment_reply"


LONG2 = "mcp__a_very_long_server_name_for_testing__" + "create_pull_request_review_comment_thread"


ODD = "mcp.server/tool name"


OPENAI_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def named_tool(name: str) -> dict:
    return {
        "name": name,
        "description": "x",
        "input_schema": {"type": "object", "properties": {"body": {"type": "string"}}},
    }


def test_long_tool_names_openai(make_stack):
    assert len(LONG) > 64 and len(LONG2) > 64 and LONG[:64] == LONG2[:64]
    stack = make_stack("openai")

    async def answer(request):
        sent = await request.json()
        alias = {t["function"]["description"]: t["function"]["name"] for t in sent["tools"]}
        aliases = [t["function"]["name"] for t in sent["tools"]]
        assert all(OPENAI_NAME.match(a) for a in aliases), aliases
        assert len(set(aliases)) == len(aliases)
        chunks = (
            [ROLE]
            + canonical(0, "call_long0000001", alias["long2"], '{"body": "hi"}')
            + canonical(1, "call_long0000002", alias["odd"], '{"body": "yo"}')
            + [finish(), USAGE]
        )
        return await write_sse(request, chunks)

    tools = [
        dict(named_tool(LONG), description="long"),
        dict(named_tool(LONG2), description="long2"),
        dict(named_tool(ODD), description="odd"),
        WEATHER_TOOL,
    ]
    stack.backend.queue(answer, answer, answer)
    body = body_of(tools=tools)
    raw = check_stream(sse_events(stack, body))
    client = stack.client()
    with client.messages.stream(**body) as s:
        streamed = summarize(s.get_final_message())
    created = summarize(client.messages.create(**body))
    expected = [("tool_use", LONG2, {"body": "hi"}), ("tool_use", ODD, {"body": "yo"})]
    assert raw["blocks"] == streamed["blocks"] == created["blocks"] == expected
    sent = stack.backend.requests[0]
    assert "get_weather" in [t["function"]["name"] for t in sent["tools"]]  # short names unchanged

    # next turn: the history and tool_choice use the same aliases as the tools list
    stack.backend.queue(text_answer("openai", "done"))
    ids = created["ids"]
    client.messages.create(
        **body_of(
            tools=tools,
            tool_choice={"type": "tool", "name": LONG},
            messages=[
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": ids[0], "name": LONG2, "input": {"body": "hi"}},
                        {"type": "tool_use", "id": ids[1], "name": ODD, "input": {"body": "yo"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": ids[0], "content": "ok"},
                        {"type": "tool_result", "tool_use_id": ids[1], "content": "ok"},
                    ],
                },
            ],
        )
    )
    sent = stack.backend.requests[-1]
    alias = {t["function"]["description"]: t["function"]["name"] for t in sent["tools"]}
    history = [c["function"]["name"] for c in sent["messages"][-3]["tool_calls"]]
    assert history == [alias["long2"], alias["odd"]]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": alias["long"]}}
    assert LONG not in json.dumps(sent) and LONG2 not in json.dumps(sent)


def test_long_tool_names_ollama_unchanged(make_stack):
    stack = make_stack("ollama")
    stack.backend.queue(
        NDJSON([ollama_chunk(tool_calls=[oll_call(LONG, {"body": "hi"}, "call_k3j2h1g0")]), ollama_chunk(done=True)])
    )
    msg = stack.client().messages.create(**body_of(tools=[named_tool(LONG), WEATHER_TOOL]))
    assert [(b.name, b.input) for b in msg.content] == [(LONG, {"body": "hi"})]
    assert [t["function"]["name"] for t in stack.backend.requests[0]["tools"]] == [LONG, "get_weather"]


# --- Thinking, images, documents (both directions) ---------------------------------------------


THINK_REQ = dict(model="claude-opus-5-5", max_tokens=200, messages=USER_HI)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "reasoning_details"])
def test_openai_reasoning_fields_become_thinking(make_stack, field):
    stack = make_stack("openai")
    piece = (
        (lambda t: {"reasoning_details": [{"type": "reasoning.text", "text": t}]})
        if field == "reasoning_details"
        else (lambda t: {field: t})
    )
    chunks = [
        oai_chunk({"role": "assistant", "content": ""}),
        oai_chunk(piece("Let me ")),
        oai_chunk(piece("think.")),
        oai_chunk({"content": "Answer."}),
        oai_chunk({}, "stop"),
        oai_chunk(choices=[], usage=oai_usage(10, 30, reasoning=20)),
    ]
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
    stack.backend.queue(
        NDJSON(
            [
                ollama_chunk("<thi"),
                ollama_chunk("nk>hidden plan</th"),
                ollama_chunk("ink>\n\nVisible"),
                ollama_chunk(done=True),
            ]
        )
    )
    client = stack.client()
    first = client.messages.create(**THINK_REQ)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in first.content] == [
        ("thinking", "Check."),
        ("text", "Done."),
    ]
    with client.messages.stream(**THINK_REQ) as s:
        second = s.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in second.content] == [
        ("thinking", "hidden plan"),
        ("text", "Visible"),
    ]


def test_thinking_display_omitted_round_trips_through_signature(make_stack):
    """Claude Code asks for display "omitted": the text is hidden, and restored from the signature when the
    conversation is sent back (DeepSeek needs it on tool turns)."""
    stack = make_stack("openai")
    stack.backend.queue(
        SSE([oai_chunk({"reasoning_content": "secret plan"}), oai_chunk({"content": "ok"}), oai_chunk({}, "stop")])
    )
    msg = stack.client().messages.create(
        model="m", max_tokens=50, messages=USER_HI, thinking={"type": "adaptive", "display": "omitted"}
    )
    block = msg.content[0]
    assert block.type == "thinking" and block.thinking == "" and block.signature.startswith("cpx1.")
    assert cp.reasoning_from_signature(block.signature) == "secret plan"
    request = cp.parse_request(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [block.model_dump(), {"type": "tool_use", "id": "toolu_1", "name": "T", "input": {}}],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}]},
            ],
        }
    )
    route = cp.Route("deepseek-chat", "openai", "https://api.deepseek.com/v1")
    body = cp.PROVIDER_IMPLS["openai"].body(cp.build_conversation(request), request, route)[0]
    assert body["messages"][1]["reasoning_content"] == "secret plan"
    ollama = cp.ollama_request(cp.build_conversation(request), request, ROUTE_OLLAMA)
    assert ollama["messages"][1]["thinking"] == "secret plan"
    plain = backend_body(request, "openai")  # not DeepSeek: sent within the current tool loop (issue 13)
    assert plain["messages"][1]["reasoning_content"] == "secret plan"
    off = cp.PROVIDER_IMPLS["openai"].body(
        cp.build_conversation(request), request, cp.Route("m", "openai", "http://x/v1", reasoning_history=False)
    )[0]
    assert "reasoning_content" not in off["messages"][1]


def test_thinking_request_switches():
    def parsed(**kw: Any) -> cp.MessagesRequest:
        return cp.parse_request({"model": "m", "max_tokens": 5, "messages": USER_HI, **kw})

    assert (
        backend_body(parsed(thinking={"type": "enabled", "budget_tokens": 2048}), "openai")["reasoning_effort"] == "low"
    )
    assert (
        backend_body(parsed(thinking={"type": "enabled", "budget_tokens": 20000}), "openai")["reasoning_effort"]
        == "high"
    )
    assert (
        backend_body(parsed(thinking={"type": "adaptive"}, output_config={"effort": "high"}), "openai")[
            "reasoning_effort"
        ]
        == "high"
    )
    assert "reasoning_effort" not in backend_body(parsed(thinking={"type": "disabled"}), "openai")
    assert backend_body(parsed(thinking={"type": "enabled", "budget_tokens": 2048}), "ollama")["think"] is True
    assert backend_body(parsed(thinking={"type": "disabled"}), "ollama")["think"] is False
    assert backend_body(parsed(thinking={"type": "adaptive"}), "ollama")["think"] is True
    assert "think" not in backend_body(parsed(), "ollama")


def test_backend_rejecting_reasoning_effort_is_retried_without_it(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(
        Reply(
            400,
            {
                "error": {
                    "message": "Unrecognized request argument supplied: reasoning_effort",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
        SSE(oai_text_stream("fine")),
        SSE(oai_text_stream("again")),
    )
    client = stack.client()
    kwargs = dict(
        model="m", max_tokens=50, messages=USER_HI, thinking={"type": "adaptive"}, output_config={"effort": "medium"}
    )
    assert client.messages.create(**kwargs).content[0].text == "fine"
    assert client.messages.create(**kwargs).content[0].text == "again"
    sent = stack.backend.requests
    assert "reasoning_effort" in sent[0] and "reasoning_effort" not in sent[1] and "reasoning_effort" not in sent[2]


def test_images_both_providers(make_stack, provider):
    stack = make_stack(provider)
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_1x1}},
    ]
    stack.client().messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": content}])
    sent = stack.backend.requests[0]["messages"][-1]
    if provider == "openai":
        assert sent["content"] == [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_1x1}},
        ]
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


def test_document_text_becomes_text(make_stack):
    stack = make_stack("openai")
    doc = {
        "type": "document",
        "title": "Notes",
        "source": {"type": "text", "media_type": "text/plain", "data": "alpha"},
    }
    stack.client().messages.create(model="m", max_tokens=20, messages=[{"role": "user", "content": [doc]}])
    assert stack.backend.requests[0]["messages"][-1]["content"] == '<document title="Notes">\nalpha\n</document>'


# --- Prompt-based tool calling: servers that cannot take `tools` ------------------------------------

NO_TOOLS_ERRORS = {
    # Ollama (ollama/ollama#5793, #14795): HTTP 400 from /api/chat and /v1/chat/completions
    "ollama": (400, {"error": "registry.ollama.ai/library/gemma2:latest does not support tools"}, "ollama show"),
    # vLLM started without --enable-auto-tool-choice (its serving_chat check)
    "vllm": (
        400,
        {
            "object": "error",
            "message": '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        "--enable-auto-tool-choice --tool-call-parser",
    ),
    # llama.cpp without --jinja: tools/server/server-common.cpp throws "tools param requires --jinja flag" (HTTP 500)
    "llamacpp": (
        500,
        {"error": {"code": 500, "message": "tools param requires --jinja flag", "type": "server_error"}},
        "--jinja",
    ),
}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("server", NO_TOOLS_ERRORS)
def test_backend_rejecting_tools_switches_to_prompt_tools(make_stack, provider, server, caplog):
    status, error, fix = NO_TOOLS_ERRORS[server]
    stack = make_stack(provider)
    stack.backend.queue(Reply(status, error), text_answer(provider, *pieces(HERMES_CALL, 5)))
    client = stack.client()
    with caplog.at_level(logging.INFO, logger="claude_proxy"):
        msg = client.messages.create(**body_of(system="Be brief."))
    assert summarize(msg)["blocks"] == [W] and msg.stop_reason == "tool_use"
    first, second = stack.backend.requests
    assert "tools" in first and "tools" not in second and "tool_choice" not in second
    system = second["messages"][0]["content"]
    assert system.startswith("Be brief.\n\n# Tools\n") and '"name":"get_weather"' in system and "<tool_call>" in system
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "does not take tools" in r.getMessage()]
    assert len(warnings) == 1 and fix in warnings[0].getMessage()
    # remembered for the model: the next request goes out in prompt mode at once, with its history as text
    stack.backend.queue(text_answer(provider, "Sunny."))
    messages = body_of()["messages"] + [
        as_history(msg),
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": msg.content[0].id, "content": "Sunny"}]},
    ]
    assert client.messages.create(**body_of(system="Be brief.", messages=messages)).content[0].text == "Sunny."
    third = stack.backend.requests[2]
    assert "tools" not in third
    assert third["messages"][2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>',
    }
    assert third["messages"][3]["role"] == "user"
    assert third["messages"][3]["content"] == "<tool_response>\nSunny\n</tool_response>"
    assert third["messages"][:2] == second["messages"][:2]  # the prompt prefix is stable across turns


def test_a_backend_that_keeps_refusing_is_not_asked_forever(make_stack, provider):
    """Regression: a backend that answered 'tools are not supported' also to the prompt-tools body got the
    request again and again, with no delay; and a backend that keeps naming fields stops after a few resends."""
    stack = make_stack(provider)
    refusal = Reply(500, {"error": {"message": "tools are not supported for this model"}})
    stack.backend.queue(*[copy.deepcopy(refusal) for _ in range(10)])
    status, _, _ = http(stack, "POST", "/v1/messages", req(tools=[WEATHER_TOOL]))
    assert status >= 500 and len(stack.backend.requests) == 2  # native, then prompt-based tools, then the error
    stack.backend.script.clear()
    stack.backend.requests.clear()
    endless = Reply(400, {"error": {"message": "Unrecognized request argument supplied: top_k"}})
    stack.backend.queue(*[copy.deepcopy(endless) for _ in range(20)])
    assert http(stack, "POST", "/v1/messages", req(top_k=5))[0] == 400
    assert len(stack.backend.requests) <= cp.MAX_BODY_ADAPTATIONS + 1


def test_prompt_tools_selected_in_the_map(make_stack, provider):
    stack = make_stack(provider, model_map={"claude-*": {"model": "m", "tool_calls": "prompt"}})
    result = run_modes(stack, text_answer(provider, *pieces(TEXT_CALL_FORMATS["qwen3_coder"][0], 2)), tools=TEXT_TOOLS)
    assert_tool_use(result, TEXT_CALL_FORMATS["qwen3_coder"][1])
    assert all("tools" not in r for r in stack.backend.requests)
    with pytest.raises(cp.ConfigError, match="tool_calls"):
        cp.Config(model_map={"x": {"model": "m", "tool_calls": "xml"}})


def test_prompt_tools_on_even_when_text_tool_calls_off(make_stack, provider):
    """Prompt mode reads calls from the text whatever the switch says: it is the only way they come."""
    stack = make_stack(provider, text_tool_calls=False)
    stack.backend.queue(Reply(*NO_TOOLS_ERRORS["ollama"][:2]), text_answer(provider, HERMES_CALL))
    assert summarize(stack.client().messages.create(**body_of()))["blocks"] == [W]


def test_prompt_tools_rendering_is_deterministic_and_a_prefix_across_turns():
    def body(messages: list, **kw) -> dict:
        req = cp.parse_request(body_of(messages=messages, system="S", **kw))
        conv = cp.prompt_tools_conversation(cp.build_conversation(req), req)
        return cp.openai_request(conv, req, ROUTE_OPENAI)

    turn1 = [{"role": "user", "content": "Weather and time in Paris?"}]
    turn2 = turn1 + [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": PARIS},
                {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": TZ},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "Sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_02", "content": "12:00", "is_error": False},
                {"type": "text", "text": "<system-reminder>x</system-reminder>"},
            ],
        },
    ]
    one, two = body(turn1), body(turn2)
    assert one == body(turn1)  # deterministic
    assert two["messages"][: len(one["messages"])] == one["messages"]
    tools_text = two["messages"][0]["content"]
    assert tools_text.startswith("S\n\n# Tools\n") and tools_text.count('{"type":"function"') == len(TOOLS)
    assert two["messages"][2]["content"] == (
        'Checking.\n\n<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name":"get_time","arguments":{"tz":"Europe/Paris"}}\n</tool_call>'
    )
    assert two["messages"][3] == {
        "role": "user",
        "content": "<tool_response>\nSunny\n</tool_response>\n\n<tool_response>\n12:00\n</tool_response>\n\n"
        "<system-reminder>x</system-reminder>",
    }
    assert len(two["messages"]) == 4 and "tools" not in two
    forced = body(turn1, tool_choice={"type": "tool", "name": "get_time"})["messages"][0]["content"]
    assert forced.endswith("Answer with a call of the function get_time.")


# --- Reasoning kept inside the current tool loop ----------------------------------------------------


def loop_messages(thinking: str = "Need weather.") -> list:
    def assistant(call_id: str, text: str) -> dict:
        return {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": text, "signature": "cpx1."},
                {"type": "tool_use", "id": call_id, "name": "get_weather", "input": PARIS},
            ],
        }

    def result(call_id: str) -> dict:
        return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call_id, "content": "Sunny"}]}

    return [
        {"role": "user", "content": "Weather?"},
        assistant("toolu_old0000001", "Old loop."),
        result("toolu_old0000001"),
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "And now?"},
        assistant("toolu_new0000001", thinking),
        result("toolu_new0000001"),
        assistant("toolu_new0000002", "Check again."),
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_new0000002", "content": "Sunny"},
                {"type": "text", "text": "<system-reminder>r</system-reminder>"},  # still the same loop
            ],
        },
    ]


def test_reasoning_sent_back_for_the_current_tool_loop_only():
    req = cp.parse_request(body_of(messages=loop_messages()))
    messages = backend_body(req, "openai")["messages"]
    sent = [(m["role"], m.get("reasoning_content")) for m in messages if m["role"] == "assistant"]
    assert sent == [
        ("assistant", None),
        ("assistant", None),
        ("assistant", "Need weather."),
        ("assistant", "Check again."),
    ]
    route = cp.Route("m", "openai", "http://x/v1", reasoning_history=False)
    off = cp.PROVIDER_IMPLS["openai"].body(cp.build_conversation(req), req, route)[0]["messages"]
    assert not any("reasoning_content" in m for m in off)
    route = cp.Route("m", "openai", "http://x/v1", reasoning_history=True)
    on = cp.PROVIDER_IMPLS["openai"].body(cp.build_conversation(req), req, route)[0]["messages"]
    assert [m.get("reasoning_content") for m in on if m["role"] == "assistant"] == [
        "Old loop.",
        None,  # a text-only turn without reasoning
        "Need weather.",
        "Check again.",
    ]


def test_reasoning_in_loop_is_byte_stable_across_turns():
    full = loop_messages()
    bodies = [backend_body(cp.parse_request(body_of(messages=full[:n])), "openai") for n in (7, 9)]
    shorter, longer = (json.dumps(b["messages"]) for b in bodies)
    assert longer.startswith(shorter[:-1])  # turn N's messages are a prefix of turn N+1's


def test_reasoning_goes_back_in_the_field_the_backend_used(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(
        SSE([ROLE, oai_chunk({"reasoning": "Need weather."}), oai_chunk({"content": "ok"}), finish("stop")])
    )
    client = stack.client()
    client.messages.create(**body_of())
    stack.backend.queue(text_answer("openai", "ok"))
    client.messages.create(**body_of(messages=loop_messages()))
    sent = [m for m in stack.backend.requests[1]["messages"] if m["role"] == "assistant"]
    assert [m.get("reasoning") for m in sent] == [None, None, "Need weather.", "Check again."]
    assert not any("reasoning_content" in m for m in sent)


def test_backend_rejecting_reasoning_field_gets_it_dropped_and_remembered(make_stack, caplog):
    stack = make_stack("openai")
    error = {"error": {"message": "Unrecognized request argument supplied: reasoning_content", "type": "invalid"}}
    stack.backend.queue(Reply(400, error), text_answer("openai", "ok"), text_answer("openai", "ok"))
    client = stack.client()
    with caplog.at_level(logging.WARNING, logger="claude_proxy"):
        assert client.messages.create(**body_of(messages=loop_messages())).content[0].text == "ok"
        assert client.messages.create(**body_of(messages=loop_messages())).content[0].text == "ok"
    first, second, third = stack.backend.requests
    assert any("reasoning_content" in m for m in first["messages"])
    assert not any("reasoning_content" in m for m in second["messages"] + third["messages"])
    assert sum("rejected earlier reasoning" in r.getMessage() for r in caplog.records) == 1


# ======================================================================================
# 6. RESPONSE TRANSLATION
# ======================================================================================


# --- Tool use: invalid arguments from small models: always a parseable stream, repaired when possible ---


ANY_DICT = object()


BAD_ARGS = {
    "trailing_text": ('{"path": "a.py"} I hope this helps!', {"path": "a.py"}),
    "extra_closing_brace": ('{"path": "a.py"}}', {"path": "a.py"}),
    "single_quotes": ("{'path': 'a.py'}", {"path": "a.py"}),
    "single_quotes_with_true_in_value": (
        "{'command': 'test -f x && echo true || echo null'}",
        {"command": "test -f x && echo true || echo null"},
    ),
    "python_literals": ("{'recursive': True, 'limit': None}", {"recursive": True, "limit": None}),
    "missing_closing_brace": ('{"path": "a.py"', {"path": "a.py"}),
    "missing_quote_and_brace": ('{"path": "a.py', {"path": "a.py"}),
    "missing_nested_closers": ('{"edits": [{"old": "a", "new": "b"}', {"edits": [{"old": "a", "new": "b"}]}),
    "cut_after_number": ('{"n": 12', {"n": 12}),
    "code_fence_json": ('```json\n{"path": "a.py"}\n```', {"path": "a.py"}),
    "code_fence_plain": ('```\n{"path": "a.py"}\n```', {"path": "a.py"}),
    "double_encoded_string": (json.dumps('{"path": "a.py"}'), {"path": "a.py"}),
    "leading_prose": ('Sure! {"path": "a.py"}', {"path": "a.py"}),
    "total_garbage": ("I will read the file now.", {}),
    "garbage_after_brace": ('{"path": "a.py", oops}', ANY_DICT),
    "array_not_object": ('["a.py"]', ANY_DICT),
    "trailing_comma": ('{"path": "a.py",}', {"path": "a.py"}),
    "raw_newline_in_string": ('{"content": "line1\nline2"}', {"content": "line1\nline2"}),
}


@pytest.mark.parametrize("split", [1, 1000], ids=["char", "whole"])  # one char per fragment; all in one
@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_openai_invalid_arguments_repaired(make_stack, case, split):
    args, expected = BAD_ARGS[case]
    stack = make_stack("openai")
    chunks = [ROLE] + canonical(0, "call_aaaaaaaa0001", "Read", args, split) + [finish(), USAGE]
    result = run_modes(stack, SSE(chunks))
    ((kind, name, value),) = result["blocks"]
    assert (kind, name) == ("tool_use", "Read")
    assert result["stop_reason"] == "tool_use"
    if expected is not ANY_DICT:
        assert value == expected


@pytest.mark.parametrize(
    "case", ["trailing_text", "single_quotes", "missing_closing_brace", "total_garbage", "code_fence_json"]
)
def test_openai_non_streaming_body_invalid_arguments(make_stack, case):
    args, expected = BAD_ARGS[case]
    stack = make_stack("openai")
    body = oai_completion(
        None,
        tool_calls=[{"id": "call_aaaaaaaa0001", "type": "function", "function": {"name": "Read", "arguments": args}}],
        finish="tool_calls",
    )
    result = run_modes(stack, Reply(body=body))
    assert result["blocks"] == [("tool_use", "Read", expected)]


def test_truncated_arguments_at_max_tokens(make_stack):
    """Cut off by max_tokens mid-arguments: stop_reason max_tokens, and still valid JSON for the SDK."""
    stack = make_stack("openai")
    chunks = (
        [ROLE]
        + canonical(0, "call_aaaaaaaa0001", "Read", '{"path": "a.py", "content": "def f(', 5)
        + [finish("length"), USAGE]
    )
    result = run_modes(stack, SSE(chunks))
    ((kind, name, value),) = result["blocks"]
    assert (kind, name) == ("tool_use", "Read") and isinstance(value, dict)
    assert value.get("path") == "a.py"
    assert result["stop_reason"] == "max_tokens"


# --- Tool use, unit level: argument repair, JSON prefixes, the event builder -------------------


@pytest.mark.parametrize("case", sorted(set(BAD_ARGS) - {"raw_newline_in_string"}))  # end to end only
def test_repair_arguments_unit(case):
    args, expected = BAD_ARGS[case]
    repaired = cp.repair_arguments(args)
    if expected is ANY_DICT:
        assert repaired is None or isinstance(json.loads(repaired), dict)
    elif expected == {} and case == "total_garbage":
        assert repaired is None or json.loads(repaired) == {}
    else:
        assert repaired is not None and json.loads(repaired) == expected


def test_json_prefix_nothing_safe_after_a_break():
    """Once the arguments stop being a JSON prefix, later fragments must not become 'safe' (streamable)."""
    checker = cp.JsonPrefix()
    assert checker.feed("I w") == 0 and checker.broken
    assert checker.feed("ill read") == 0
    assert checker.feed(" it") == 0
    checker = cp.JsonPrefix()
    checker.feed('{"a": 1} ')
    assert checker.safe == 9
    checker.feed("trailing")
    checker.feed(" words")
    assert checker.safe <= 9


@pytest.mark.parametrize("fragments", [["I w", "ill ", "read"], ['{"a": 1}', " ok", " bye"], ["{", '{"a"', "x"]])
def test_event_builder_broken_arguments_always_valid_json(fragments):
    """Pure fold: whatever fragments arrive, the concatenated input_json_delta parses as an object."""
    ev = cp.EventBuilder("msg_test", "m", 1)
    ev.start_message()
    ev.tool_fragment(0, "call_aaaaaaaa0001", "Read", "")
    for piece in fragments:
        ev.tool_fragment(0, None, None, piece)
    ev.backend_stop("tool_calls")
    ev.end_message()
    events = ev.take()
    joined = "".join(
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    )
    assert isinstance(json.loads(joined), dict), joined
    assert isinstance(cp.fold_events(events)["content"][0]["input"], dict)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"path": "a.txt",', {"path": "a.txt"}),  # a dangling comma: no invented key
        ('{"path": "a.txt", "mode', {"path": "a.txt"}),  # a half key is dropped
        ('{"path": "a.txt", "mode":', {"path": "a.txt"}),  # a key without its value too
        ('{"a": tru', {}),  # a half literal drops its member
        ('{"a": [1, tr', {"a": [1]}),
        ('{"a": "x\\u00', {"a": "x"}),  # a half escape in a value string
        ('{"a": {"b": [1, 2', {"a": {"b": [1, 2]}}),
    ],
)
def test_repair_never_invents_members(text, expected):
    assert json.loads(cp.repair_arguments(text)) == expected


def test_keys_are_held_back_until_their_value_begins():
    check = cp.JsonPrefix()
    assert check.feed('{"pa') == 1 and check.feed('th": "a') == 11 and check.feed('.txt", "x": tr') == 16
    assert check.feed("ue}") == 28 and check.is_whole


@pytest.mark.parametrize(
    "fragments, expected",
    [
        # a delta that repeats the text so far: read as a snapshot it breaks the JSON, as a delta it does not
        (['{"a":', '{"a":1}}'], {"a": {"a": 1}}),
        (["{", '{"city"', '{"city": "Paris"}'], {"city": "Paris"}),  # cumulative snapshots
        (['{"a":1', '{"a":1,"b":2}'], {"a": 1, "b": 2}),
        # a snapshot that ends after `:`, `,` or `[`: doubled, the text would still be a valid prefix
        (['{"path":', '{"path": "a.py"}'], {"path": "a.py"}),
        (['{"path": "a.py", "limit":', '{"path": "a.py", "limit": 5}'], {"path": "a.py", "limit": 5}),
        (['{"a": 1,', '{"a": 1, "b": 2}'], {"a": 1, "b": 2}),
        (['{"a": [', '{"a": [1, 2]}'], {"a": [1, 2]}),
        (['{"a": [', '{"a": [1', '{"a": [1, 2]}'], {"a": [1, 2]}),
        (['{"a": "x', "y", '"}'], {"a": "xy"}),  # plain deltas
    ],
)
def test_snapshots_told_apart_from_deltas(fragments, expected):
    call = cp.ToolCall(0)
    for fragment in fragments:
        call.add(fragment)
    assert json.loads(call.args) == expected


def test_long_arguments_in_small_fragments_take_linear_time():
    """1 MB of arguments in 4-character fragments, natively and written as text: no copy of everything so far per
    fragment (that took 14 s natively and 6 s in <tool_call>; now well under a second each)."""
    args = json.dumps({"path": "a.py", "content": ("x" * 60 + "\n") * 16000})
    start = time.perf_counter()
    call, out = cp.ToolCall(0), []
    for i in range(0, len(args), 4):
        call.add(args[i : i + 4])
        out.append(call.take_safe())
    out += call.close()
    assert time.perf_counter() - start < 4 and "".join(out) == args
    for marker, body in [
        ("<tool_call>", '<tool_call>\n{"name": "Read", "arguments": ' + args + "}\n</tool_call>"),
        ("{", '{"name": "Read", "arguments": ' + args + "}"),
        ("[TOOL_CALLS]", "[TOOL_CALLS]Read[ARGS]" + args),
    ]:
        start = time.perf_counter()
        watcher = cp.TextCalls({"Read": {}})
        found = [item for i in range(0, len(body), 4) for item in watcher.feed(body[i : i + 4])] + watcher.flush()
        assert time.perf_counter() - start < 4, marker
        assert found == [("call", (marker, "Read", json.loads(args)))]
    code = json.dumps({"path": "a.js", "content": "function f(a) { return [a]; }\n" * 33000})  # a brace in every piece
    # (a bare-JSON answer used to be decoded again from its start at every piece holding a brace: 2 s at 400 KB)
    body = '{"name": "Read", "arguments": ' + code + "}"
    start = time.perf_counter()
    watcher = cp.TextCalls({"Read": {}})
    found = [item for i in range(0, len(body), 4) for item in watcher.feed(body[i : i + 4])] + watcher.flush()
    assert time.perf_counter() - start < 4 and found == [("call", ("{", "Read", json.loads(code)))]


@pytest.mark.parametrize("cut", range(1, 14))
def test_long_text_call_with_its_closing_tag_split_anywhere(cut):
    """A call written as text with long arguments (its pieces are kept apart until the closing tag): the tag split at
    any position, then text after it."""
    args = {"path": "a.py", "content": "y" * 400}
    body = '<tool_call>\n{"name": "Read", "arguments": ' + json.dumps(args) + "}\n</tool_call>\nDone."
    at = body.index("</tool_call>") + cut - 1
    pieces = [body[i : i + 7] for i in range(0, at - at % 7, 7)] + [body[at - at % 7 : at], body[at:]]
    events, message = fold_text([p for p in pieces if p], {"Read": {}})
    check_stream(events)
    assert text_blocks(message) == [("tool_use", "Read", args), ("text", "\nDone.")]


@pytest.mark.parametrize(
    "body",
    [
        '<tool_call>\n{"name": "Read", "arguments": @A@}\n</tool_call>',
        '{"name": "Read", "arguments": @A@}',
        '{"name": "Read", "arguments": @A@} and then prose',  # a JSON object is a call only as the whole answer
        "[TOOL_CALLS]Read[ARGS]@A@",
        '[TOOL_CALLS][{"name": "Read", "arguments": @A@}]',
    ],
)
@pytest.mark.parametrize("size", [1, 3, 7, 64])
def test_long_text_calls_any_piece_size(body, size):
    """Calls written as text with long arguments (kept apart in pieces until they may end): the same blocks as in
    one piece, `}` and `]` inside strings and white space included."""
    args = json.dumps({"path": "a.py", "content": "if x:\n    y = {1: [2]}\n" * 40 + "   \n\n"}, indent=1)
    text = body.replace("@A@", args)
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    events, message = fold_text(pieces, {"Read": {}})
    check_stream(events)
    assert text_blocks(message) == text_blocks(fold_text([text], {"Read": {}})[1])
    assert ("tool_use", "Read", json.loads(args)) in text_blocks(message) or "prose" in text


def test_escape_split_across_fragments():
    call = cp.ToolCall(0)
    for fragment in ['{"content": "x = 1\\', "nprint(x)", '",\n  "file_path": "a.py"}']:
        call.add(fragment)
    assert json.loads(call.args) == {"content": "x = 1\nprint(x)", "file_path": "a.py"}


def _interleaved(ops: list) -> list:
    ev = cp.EventBuilder("msg_1", "m", 10)
    ev.start_message()
    for op, *args in ops:
        getattr(ev, op)(*args)
    ev.backend_stop("tool_calls")
    ev.end_message()
    return check_stream(ev.take())["blocks"]


def test_text_between_argument_fragments_waits_for_the_call():
    """Content or reasoning that arrives while a call's arguments are not yet a whole object (servers that interleave
    them) is sent after the call, in order; it used to close the call and drop the rest of its arguments."""
    read = ("tool_use", "Read", {"path": "a.py"})
    first, rest = (
        ("tool_fragment", 0, "call_abcdefgh", "Read", '{"pa'),
        ("tool_fragment", 0, None, None, 'th": "a.py"}'),
    )
    assert _interleaved([first, ("content", "\n"), rest]) == [read]  # white space alone is dropped
    assert _interleaved(
        [first, ("content", "On"), ("thinking", "hm"), ("content", "e"), rest, ("content", " two")]
    ) == [
        read,
        ("text", "On"),
        ("thinking", "hm"),
        ("text", "e two"),
    ]
    second = ("tool_fragment", 1, "call_bbbbbbbb", "Read", '{"path": "b"}')
    assert _interleaved([first, ("content", "x"), rest, second]) == [
        read,
        ("text", "x"),
        ("tool_use", "Read", {"path": "b"}),
    ]
    assert _interleaved([first, ("content", "x")]) == [("tool_use", "Read", {}), ("text", "x")]  # never lost


def test_whitespace_before_a_tool_call_is_not_emitted_after_it(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(
        SSE(
            [oai_chunk({"role": "assistant", "content": ""}), oai_chunk({"content": "\n\n"})]
            + oai_tool_call_chunks(0, "call_abcdefgh1", "get_weather", '{"city": "Paris"}')
            + [oai_chunk({}, "tool_calls")]
        )
    )
    msg = stack.client().messages.create(model="m", max_tokens=50, messages=USER_HI)
    assert [b.type for b in msg.content] == ["tool_use"]


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _streamed_arguments(fragments: list, reason: str) -> list:
    ev = cp.EventBuilder("msg_1", "m", 10)
    ev.start_message()
    for fragment in fragments:
        ev.tool_fragment(0, "call_abcdefgh", "name", fragment)
    ev.backend_stop(reason)
    ev.end_message()
    return [
        d["delta"]["partial_json"]
        for name, d in ev.take()
        if name == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    ]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=5),
    st.sampled_from([None, 1, 2]),
    st.booleans(),
    st.lists(st.integers(0, 10**6), max_size=8),
    st.integers(0, 10**6),
)
def test_property_streamed_arguments_always_parse(value, indent, ascii_only, cuts, truncate_at):
    """Any object, split anywhere: every streamed prefix is one the SDK's partial parser accepts and the
    whole is the object; cut off anywhere (max_tokens), the whole is still a valid object."""
    from jiter import from_json

    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    points = sorted({c % (len(text) + 1) for c in cuts})
    fragments = [text[a:b] for a, b in zip([0] + points, points + [len(text)])]
    parts = _streamed_arguments(fragments, "tool_calls")
    assert json.loads("".join(parts)) == value
    sent = ""
    for part in parts:
        sent += part
        from_json(sent.encode(), partial_mode="trailing-strings")
    cut = truncate_at % (len(text) + 1)
    assert isinstance(json.loads("".join(_streamed_arguments([text[:cut]], "length"))), dict)


# --- The fold's parts: inline <think>, whole tool calls ---------------------------------------------


@pytest.mark.parametrize("cut", range(0, 12))
def test_think_tags_split_at_every_position(cut):
    text = "<think>why</think>so"
    tags = cp.ThinkTags()
    pieces = tags.feed(text[:cut]) + tags.feed(text[cut:]) + tags.flush()
    joined = {kind: "".join(p for k, p in pieces if k == kind) for kind in ("thinking", "text")}
    assert joined == {"thinking": "why", "text": "so"}


def test_think_tags_only_at_the_start():
    tags = cp.ThinkTags()
    assert tags.feed("  hello <think>") == [("text", "  hello <think>")] and tags.state == "off"
    assert tags.feed("<think>x") == [("text", "<think>x")]


def test_tool_calls_whole_calls_get_their_own_keys():
    calls = cp.ToolCalls()
    a = calls.whole("id_aaaaaaaa", "Bash", {"command": "ls"})
    b = calls.whole("id_aaaaaaaa", "Bash", None)
    assert a is not b and a.args == '{"command":"ls"}' and b.args == "{}"
    assert calls.pending() == [a, b]


# --- Usage, stop reasons, output limits, structured output -------------------------------------


def test_cached_tokens_and_stop_sequence(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(SSE(oai_text_stream("x", usage=oai_usage(100, 5, cached=80))))
    stack.backend.queue(SSE(oai_text_stream("y", finish="stop", stop_reason="###")))
    client = stack.client()
    msg = client.messages.create(model="m", max_tokens=20, messages=USER_HI)
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens) == (20, 80)
    msg = client.messages.create(model="m", max_tokens=20, messages=USER_HI, stop_sequences=["###"])
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "###")


def test_backend_output_cap_below_the_request_is_a_warning_once_per_model(make_stack, provider, caplog):
    """The server stopped at its own cap (llama.cpp -n 100) while the client allowed 4000: stop_reason stays
    max_tokens, and one WARNING says how to raise the cap; stopping at the client's own limit says nothing."""
    stack = make_stack(provider)
    capped = (
        SSE(oai_text_stream("cut", finish="length", usage=oai_usage(completion=100)))
        if provider == "openai"
        else NDJSON(ollama_text_stream("cut", done_reason="length", completion=100))
    )
    caplog.set_level(logging.WARNING, logger="claude_proxy")
    for max_tokens in (100, 4000, 4000):
        stack.backend.queue(copy.deepcopy(capped))
        msg = stack.client().messages.create(model="m", max_tokens=max_tokens, messages=USER_HI)
        assert msg.stop_reason == "max_tokens"
    warnings = [r.getMessage() for r in caplog.records if "caps output on its own" in r.getMessage()]
    assert len(warnings) == 1 and "stopped at 100 output tokens" in warnings[0] and "given 4000" in warnings[0]
    assert "--n-predict" in warnings[0] and '"max_tokens": 100' in warnings[0]


def test_length_and_content_filter_stop_reasons(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(
        SSE(oai_text_stream("cut", finish="length"))
        if provider == "openai"
        else NDJSON(ollama_text_stream("cut", done_reason="length"))
    )
    msg = stack.client().messages.create(model="m", max_tokens=1, messages=USER_HI)
    assert msg.stop_reason == "max_tokens"


def test_max_tokens_too_large_is_lowered_and_remembered(make_stack):
    stack = make_stack("openai")
    vllm = {
        "object": "error",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 128000. "
        "This model's maximum context length is 32768 tokens and your request has 1234 input tokens "
        "(128000 > 32768 - 1234).",
    }
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
    stack.client().messages.create(
        model="m", max_tokens=20, messages=USER_HI, output_config={"format": {"type": "json_schema", "schema": schema}}
    )
    sent = stack.backend.requests[0]
    if provider == "openai":
        assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    else:
        assert sent["format"] == schema


def test_scale_usage(make_stack):
    stack = make_stack(
        "openai", scale_usage=True, model_map={"claude-haiku-5-5": {"model": "small", "context_window": 50000}}
    )
    stack.backend.queue(SSE(oai_text_stream("x", usage=oai_usage(1000, 5))))
    msg = stack.client().messages.create(model="claude-haiku-5-5", max_tokens=20, messages=USER_HI)
    # Claude Code assumes 1M for this name and compacts 33k before it; the proxy wants it at 75% of 50k
    assert msg.usage.input_tokens == round(1000 * 967_000 / 37_500) and msg.usage.output_tokens == 5


def test_backend_wanting_max_completion_tokens(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(
        Reply(
            400,
            {
                "error": {
                    "message": "Unsupported parameter: 'max_tokens' is not supported with "
                    "this model. Use 'max_completion_tokens' instead.",
                    "type": "invalid_request_error",
                    "param": "max_tokens",
                    "code": "unsupported_parameter",
                }
            },
        ),
        SSE(oai_text_stream("a")),
        SSE(oai_text_stream("b")),
    )
    client = stack.client()
    client.messages.create(model="m", max_tokens=50, messages=USER_HI)
    client.messages.create(model="m", max_tokens=60, messages=USER_HI)
    sent = stack.backend.requests
    assert sent[0]["max_tokens"] == 50 and "max_tokens" not in sent[1] and sent[1]["max_completion_tokens"] == 50
    assert sent[2]["max_completion_tokens"] == 60 and "max_tokens" not in sent[2]


def test_official_openai_gets_max_completion_tokens():
    req = cp.parse_request({"model": "m", "max_tokens": 10, "top_k": 5, "messages": USER_HI})
    body = cp.PROVIDER_IMPLS["openai"].body(
        cp.build_conversation(req), req, cp.Route("gpt-5", "openai", "https://api.openai.com/v1")
    )[0]
    assert body["max_completion_tokens"] == 10 and "max_tokens" not in body and "top_k" not in body


# --- Tool use: OpenAI-compatible streaming tool-call shapes ------------------------------------


def _fresh() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex


OPENAI_STREAMS = {
    # OpenAI exactly: the first chunk carries role, content null and the first fragment
    "openai_exact": (
        [
            oai_chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [frag(0, "call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", "")],
                },
                refusal=None,
            )
        ]
        + [tc(frag(0, args=p)) for p in pieces(PARIS_JSON, 3)]
        + [finish(), USAGE],
        [W],
    ),
    "canonical": (
        [ROLE] + canonical(0, "call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", PARIS_JSON) + [finish(), USAGE],
        [W],
    ),
    "id_repeated": (
        [ROLE, tc(frag(0, "chatcmpl-tool-8c1d2e3f", "get_weather", ""))]
        + [tc(frag(0, "chatcmpl-tool-8c1d2e3f", args=p)) for p in pieces(PARIS_JSON)]
        + [finish(), USAGE],
        [W],
    ),
    "id_and_name_repeated": (
        [ROLE]
        + [tc(frag(0, "call_k3j2h1g0x", "get_weather", p)) for p in [""] + pieces(PARIS_JSON)]
        + [finish(), USAGE],
        [W],
    ),
    "old_vllm_fresh_id_per_fragment": (
        [ROLE, tc(frag(0, _fresh(), "get_weather", ""))]
        + [tc(frag(0, _fresh(), args=p)) for p in pieces(PARIS_JSON)]
        + [finish(), USAGE],
        [W],
    ),
    "old_vllm_fresh_ids_two_calls": (
        [ROLE, tc(frag(0, _fresh(), "get_weather", ""))]
        + [tc(frag(0, _fresh(), args=p)) for p in pieces(PARIS_JSON)]
        + [tc(frag(1, _fresh(), "get_time", ""))]
        + [tc(frag(1, _fresh(), args=p)) for p in pieces(TZ_JSON)]
        + [finish(), USAGE],
        [W, T],
    ),
    "missing_index": (
        [ROLE, tc(frag(id="call_gem1ni0001", name="get_weather", args=""))]
        + [tc(frag(args=p)) for p in pieces(PARIS_JSON)]
        + [finish(), USAGE],
        [W],
    ),
    "missing_index_two_calls": (
        [ROLE, tc(frag(id="call_gem1ni0001", name="get_weather", args=""))]
        + [tc(frag(args=p)) for p in pieces(PARIS_JSON)]
        + [tc(frag(id="call_gem1ni0002", name="get_time", args=""))]
        + [tc(frag(args=p)) for p in pieces(TZ_JSON)]
        + [finish(), USAGE],
        [W, T],
    ),
    "missing_index_whole_calls_one_chunk": (
        [
            ROLE,
            tc(
                frag(id="call_gem1ni0001", name="get_weather", args=PARIS_JSON),
                frag(id="call_gem1ni0002", name="get_time", args=TZ_JSON),
            ),
            finish(),
            USAGE,
        ],
        [W, T],
    ),
    # Ollama /v1: the whole call in one chunk, a separate finish chunk, usage without details
    "whole_call_one_chunk": (
        [
            oai_chunk(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [frag(0, "call_x1y2z3w4", "get_weather", PARIS_JSON)],
                },
                model="qwen3:8b",
            ),
            finish(model="qwen3:8b"),
            oai_chunk(choices=[], usage={"prompt_tokens": 40, "completion_tokens": 18, "total_tokens": 58}),
        ],
        [W],
    ),
    "two_whole_calls_one_chunk": (
        [
            oai_chunk(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        frag(0, "call_x1y2z3w4", "get_weather", PARIS_JSON),
                        frag(1, "call_a9b8c7d6", "get_time", TZ_JSON),
                    ],
                }
            ),
            finish(),
            USAGE,
        ],
        [W, T],
    ),
    # SGLang: arguments before the name
    "args_before_name": (
        [
            ROLE,
            tc(frag(0, args='{"city": ')),
            tc(frag(0, args='"Paris"}')),
            tc(frag(0, "call_sgl00000001", "get_weather")),
            finish(),
            USAGE,
        ],
        [W],
    ),
    "args_before_name_then_more_args": (
        [
            ROLE,
            tc(frag(0, args='{"ci')),
            tc(frag(0, "call_sgl00000001", "get_weather", 'ty": ')),
            tc(frag(0, args='"Paris"}')),
            finish(),
            USAGE,
        ],
        [W],
    ),
    "cumulative_snapshots": (
        [
            ROLE,
            tc(frag(0, "call_cum0000001", "get_weather", "")),
            tc(frag(0, args='{"ci')),
            tc(frag(0, args='{"city": "Pa')),
            tc(frag(0, args=PARIS_JSON)),
            finish(),
            USAGE,
        ],
        [W],
    ),
    "cumulative_snapshots_after_colon": (  # doubled, the text would still be a valid prefix
        [
            ROLE,
            tc(frag(0, "call_cum0000001", "get_weather", '{"city":')),
            tc(frag(0, args=PARIS_JSON)),
            finish(),
            USAGE,
        ],
        [W],
    ),
    "content_between_argument_fragments": (
        [
            ROLE,
            tc(frag(0, "call_sgl00000001", "get_weather", '{"ci')),
            oai_chunk({"content": "\n"}),
            tc(frag(0, args='ty": "Paris"}')),
            finish(),
            USAGE,
        ],
        [W],
    ),
    "cumulative_snapshots_from_brace": (
        [
            ROLE,
            tc(frag(0, "call_cum0000001", "get_weather", "")),
            tc(frag(0, args="{")),
            tc(frag(0, args='{"city"')),
            tc(frag(0, args='{"city": "Par')),
            tc(frag(0, args=PARIS_JSON)),
            finish(),
            USAGE,
        ],
        [W],
    ),
    "finish_stop_with_calls": (
        [ROLE] + canonical(0, "call_DdmO9pD3xa9XTPNJ32zg2hcA", "get_weather", PARIS_JSON) + [finish("stop"), USAGE],
        [W],
    ),
    "parallel_sequential": (
        [ROLE]
        + canonical(0, "call_aaaaaaaa0001", "get_weather", PARIS_JSON)
        + canonical(1, "call_bbbbbbbb0002", "get_time", TZ_JSON)
        + [finish(), USAGE],
        [W, T],
    ),
    "parallel_interleaved": (
        [ROLE, tc(frag(0, "call_aaaaaaaa0001", "get_weather", "")), tc(frag(1, "call_bbbbbbbb0002", "get_time", ""))]
        + [tc(frag(i, args=p)) for a, b in zip(pieces(PARIS_JSON, 6), pieces(TZ_JSON, 8)) for i, p in ((0, a), (1, b))]
        + [finish(), USAGE],
        [W, T],
    ),
    "parallel_interleaved_one_chunk": (
        [ROLE, tc(frag(0, "call_aaaaaaaa0001", "get_weather", ""), frag(1, "call_bbbbbbbb0002", "get_time", ""))]
        + [tc(frag(0, args=a), frag(1, args=b)) for a, b in zip(pieces(PARIS_JSON, 6), pieces(TZ_JSON, 8))]
        + [finish(), USAGE],
        [W, T],
    ),
    "parallel_index_from_1": (
        [ROLE]
        + canonical(1, "call_aaaaaaaa0001", "get_weather", PARIS_JSON)
        + canonical(2, "call_bbbbbbbb0002", "get_time", TZ_JSON)
        + [finish(), USAGE],
        [W, T],
    ),
    "empty_arguments": (
        [ROLE, tc(frag(0, "call_empty000001", "list_files", "")), finish(), USAGE],
        [("tool_use", "list_files", {})],
    ),
    "empty_object_arguments": (
        [ROLE, tc(frag(0, "call_empty000001", "list_files", "{}")), finish(), USAGE],
        [("tool_use", "list_files", {})],
    ),
    "no_arguments_key": (
        [ROLE, tc(frag(0, "call_empty000001", "list_files")), finish(), USAGE],
        [("tool_use", "list_files", {})],
    ),
    "whitespace_arguments": (
        [ROLE, tc(frag(0, "call_empty000001", "list_files", " ")), finish(), USAGE],
        [("tool_use", "list_files", {})],
    ),
    "leading_newline_piece": (
        [
            ROLE,
            tc(frag(0, "call_aaaaaaaa0001", "get_weather", "")),
            tc(frag(0, args="\n")),
            tc(frag(0, args=PARIS_JSON)),
            finish(),
            USAGE,
        ],
        [W],
    ),
    "text_before_calls": (
        [ROLE, oai_chunk({"content": "Let me check"}), oai_chunk({"content": " the weather."})]
        + canonical(0, "call_aaaaaaaa0001", "get_weather", PARIS_JSON)
        + canonical(1, "call_bbbbbbbb0002", "get_time", TZ_JSON)
        + [finish(), USAGE],
        [("text", "Let me check the weather."), W, T],
    ),
    "reasoning_then_call": (
        [ROLE, oai_chunk({"reasoning": "The user wants"}), oai_chunk({"reasoning": " weather."})]
        + canonical(0, "call_aaaaaaaa0001", "get_weather", PARIS_JSON)
        + [finish(), USAGE],
        [("thinking", "The user wants weather."), W],
    ),
    "arguments_as_object": (
        [ROLE, tc(frag(0, "call_obj0000001", "get_weather", {"city": "Paris"})), finish(), USAGE],
        [W],
    ),
    "usage_on_finish_chunk": (
        [ROLE] + canonical(0, "call_aaaaaaaa0001", "get_weather", PARIS_JSON) + [finish(usage=oai_usage(40, 18))],
        [W],
    ),
    "nested_and_unicode_arguments": (
        [ROLE]
        + canonical(
            0,
            "call_aaaaaaaa0001",
            "Read",
            json.dumps({"path": '/tmp/é "x"\\y', "content": "a\nb\t\u2603 {not: json}"}),
            3,
        )
        + [finish(), USAGE],
        [("tool_use", "Read", {"path": '/tmp/é "x"\\y', "content": "a\nb\t\u2603 {not: json}"})],
    ),
}


OPENAI_STREAMS["escapes_split_across_chunks"] = (
    [
        ROLE,
        tc(frag(0, "call_aaaaaaaa0001", "Read", "")),
        tc(frag(0, args='{"path": "a\\')),
        tc(frag(0, args="nb\\u00")),
        tc(frag(0, args='e9", "content": ')),
        tc(frag(0, args='"x", "n": 1')),
        tc(frag(0, args="0}")),
        finish(),
        USAGE,
    ],
    [("tool_use", "Read", {"path": "a\nb\u00e9", "content": "x", "n": 10})],
)


@pytest.mark.parametrize("case", sorted(OPENAI_STREAMS))
def test_openai_stream_tool_call_shapes(make_stack, case):
    chunks, expected = OPENAI_STREAMS[case]
    assert_tool_use(run_modes(make_stack("openai"), SSE(chunks)), expected, usage=(40, 18))


def test_openai_stream_usage_absent_still_tool_use(make_stack):
    """No usage at all (interrupted include_usage): still a valid message with stop_reason tool_use."""
    stack = make_stack("openai")
    chunks = [ROLE] + canonical(0, "call_aaaaaaaa0001", "get_weather", PARIS_JSON) + [finish()]
    result = run_modes(stack, SSE(chunks))
    assert result["blocks"] == [W] and result["stop_reason"] == "tool_use"
    assert result["usage"][1] >= 1


def test_openai_stream_tool_args_stream_live(make_stack):
    """Canonical arguments reach the client as input_json_delta pieces as they arrive, not one blob at the end."""
    stack = make_stack("openai")
    args = json.dumps({"path": "/a/b.py", "content": "x" * 50})
    stack.backend.queue(SSE([ROLE] + canonical(0, "call_aaaaaaaa0001", "Read", args, 5) + [finish(), USAGE]))
    events = sse_events(stack, body_of())
    deltas = [
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    ]
    assert len([d for d in deltas if d]) > 3
    assert json.loads("".join(deltas)) == json.loads(args)


def test_openai_stream_backend_ids_round_trip_when_usable(make_stack):
    """Tool-use ids: a usable backend id may be passed through; whatever is emitted is what the client echoes
    back, and the proxy sends that same string to the backend next turn."""
    stack = make_stack("openai")
    stack.backend.queue(
        SSE([ROLE] + canonical(0, "chatcmpl-tool-3f9a0b1c2d", "get_weather", PARIS_JSON) + [finish(), USAGE]),
        text_answer("openai", "Sunny."),
    )
    client = stack.client()
    msg = client.messages.create(**body_of())
    call = msg.content[0]
    client.messages.create(
        **body_of(
            messages=[
                {"role": "user", "content": "What's the weather in Paris?"},
                as_history(msg),
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]},
            ]
        )
    )
    sent = stack.backend.requests[1]["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == call.id
    assert sent[-1] == {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}


# --- Tool use: Ollama NDJSON -------------------------------------------------------------------


OLLAMA_STREAMS = {
    "with_id": (
        [ollama_chunk(tool_calls=[oll_call("get_weather", PARIS, "call_k3j2h1g0")]), ollama_chunk(done=True)],
        [W],
    ),
    "without_id": ([ollama_chunk(tool_calls=[oll_call("get_weather", PARIS)]), ollama_chunk(done=True)], [W]),
    "several_in_one_chunk": (
        [
            ollama_chunk(
                tool_calls=[
                    oll_call("get_weather", PARIS, "call_k3j2h1g0"),
                    oll_call("get_time", TZ, "call_p9q8r7s6", 1),
                ]
            ),
            ollama_chunk(done=True),
        ],
        [W, T],
    ),
    "several_in_one_chunk_without_ids": (
        [
            ollama_chunk(
                tool_calls=[
                    oll_call("get_weather", PARIS),
                    oll_call("get_time", TZ, index=1),
                    oll_call("get_weather", {"city": "Oslo"}, index=2),
                ]
            ),
            ollama_chunk(done=True),
        ],
        [W, T, ("tool_use", "get_weather", {"city": "Oslo"})],
    ),
    "calls_in_separate_chunks": (
        [
            ollama_chunk(tool_calls=[oll_call("get_weather", PARIS, "call_k3j2h1g0")]),
            ollama_chunk(tool_calls=[oll_call("get_time", TZ, "call_p9q8r7s6", 1)]),
            ollama_chunk(done=True),
        ],
        [W, T],
    ),
    "thinking_and_content_one_chunk_then_calls": (
        [
            ollama_chunk(thinking="The user"),
            ollama_chunk("Let me", thinking=" wants weather."),
            ollama_chunk(" check."),
            ollama_chunk(tool_calls=[oll_call("get_weather", PARIS, "call_k3j2h1g0")]),
            ollama_chunk(done=True),
        ],
        [("thinking", "The user wants weather."), ("text", "Let me check."), W],
    ),
    "empty_arguments": (
        [ollama_chunk(tool_calls=[oll_call("list_files", {}, "call_k3j2h1g0")]), ollama_chunk(done=True)],
        [("tool_use", "list_files", {})],
    ),
    "null_arguments": (
        [
            ollama_chunk(tool_calls=[{"id": "call_k3j2h1g0", "function": {"index": 0, "name": "list_files"}}]),
            ollama_chunk(done=True),
        ],
        [("tool_use", "list_files", {})],
    ),
    "call_in_done_chunk": (
        [ollama_chunk(tool_calls=[oll_call("get_weather", PARIS, "call_k3j2h1g0")], done=True)],
        [W],
    ),
}


@pytest.mark.parametrize("case", sorted(OLLAMA_STREAMS))
def test_ollama_stream_tool_calls(make_stack, case):
    objects, expected = OLLAMA_STREAMS[case]
    # tool_use although Ollama says done_reason "stop"
    assert_tool_use(run_modes(make_stack("ollama"), NDJSON(objects)), expected, usage=(26, 10))


@pytest.mark.parametrize(
    "case", ["with_id", "without_id", "several_in_one_chunk_without_ids", "thinking_and_content_one_chunk_then_calls"]
)
def test_ollama_non_streamed_json_body(make_stack, case):
    """An Ollama answer as one JSON object (the shape of its `stream: false` reply)."""
    objects, expected = OLLAMA_STREAMS[case]
    message = {"role": "assistant", "content": "", "thinking": None, "tool_calls": []}
    thinking, content = "", ""
    for obj in objects:
        m = obj["message"]
        thinking += m.get("thinking") or ""
        content += m.get("content") or ""
        message["tool_calls"] += m.get("tool_calls") or []
    message.update(content=content, thinking=thinking or None)
    if message["thinking"] is None:
        del message["thinking"]
    body = ollama_chunk(done=True)
    body["message"] = message
    assert_tool_use(run_modes(make_stack("ollama"), Reply(body=body)), expected)


def test_ollama_generated_ids_unique_across_turns(make_stack):
    """Minted ids (old Ollama sends none) must be unique in the conversation."""
    stack = make_stack("ollama")
    answer = NDJSON(
        [
            ollama_chunk(tool_calls=[oll_call("get_weather", PARIS), oll_call("get_time", TZ, index=1)]),
            ollama_chunk(done=True),
        ]
    )
    stack.backend.queue(answer, answer)
    client = stack.client()
    ids = [b.id for _ in range(2) for b in client.messages.create(**body_of()).content]
    assert len(ids) == 4 and len(set(ids)) == 4 and all(ids)


# --- Tool use: OpenAI servers that ignore stream:true and answer with one chat.completion JSON ---


OPENAI_BODIES = {
    "one_call": (oai_completion(None, [oai_call("call_aaaaaaaa0001", "get_weather", PARIS_JSON)], "tool_calls"), [W]),
    "text_and_two_calls": (
        oai_completion(
            "Checking both.",
            [
                oai_call("call_aaaaaaaa0001", "get_weather", PARIS_JSON),
                oai_call("call_bbbbbbbb0002", "get_time", TZ_JSON),
            ],
            "tool_calls",
        ),
        [("text", "Checking both."), W, T],
    ),
    "finish_stop_with_calls": (
        oai_completion("", [oai_call("call_aaaaaaaa0001", "get_weather", PARIS_JSON)], "stop"),
        [W],
    ),
    "arguments_object": (
        oai_completion(None, [oai_call("call_aaaaaaaa0001", "get_weather", PARIS)], "tool_calls"),
        [W],
    ),
    "empty_arguments": (
        oai_completion(None, [oai_call("call_aaaaaaaa0001", "list_files", "")], "tool_calls"),
        [("tool_use", "list_files", {})],
    ),
    "same_id_twice": (
        oai_completion(
            None, [oai_call("call_0", "get_weather", PARIS_JSON), oai_call("call_0", "get_time", TZ_JSON)], "tool_calls"
        ),
        [W, T],
    ),
    "reasoning_content_and_call": (
        oai_completion(
            None,
            [oai_call("call_aaaaaaaa0001", "get_weather", PARIS_JSON)],
            "tool_calls",
            reasoning_content="Need weather.",
        ),
        [("thinking", "Need weather."), W],
    ),
}


@pytest.mark.parametrize("case", sorted(OPENAI_BODIES))
def test_openai_non_streamed_json_body(make_stack, case):
    body, expected = OPENAI_BODIES[case]
    assert_tool_use(run_modes(make_stack("openai"), Reply(body=body)), expected, usage=(12, 7))


# --- Tool calls written as text (issue 13) ----------------------------------------------------------

# Templates cited below are llama.cpp's copies of the models' own chat templates (models/templates/*.jinja), and
# the servers' parsers: vLLM's tool_parsers (hermes, qwen3_coder / qwen3_xml, glm4_moe, mistral, minimax_m2) and
# llama.cpp's common/chat.cpp.

RUN_TOOL = {
    "name": "run",
    "description": "Run a command",
    "input_schema": {
        "type": "object",
        "properties": {
            "command": {"type": "string"},
            "timeout": {"type": "integer"},
            "ratio": {"type": "number"},
            "background": {"type": "boolean"},
            "env": {"type": "object"},
            "args": {"type": "array"},
            "note": {"type": ["string", "null"]},
        },
    },
}
TEXT_TOOLS = TOOLS + [RUN_TOOL]
TEXT_SCHEMAS = {t["name"]: t["input_schema"] for t in TEXT_TOOLS}

# (text the model writes, the blocks the client must get)
TEXT_CALL_FORMATS = {
    # Hermes / Qwen2.5 / Qwen3: Qwen-Qwen2.5-7B-Instruct.jinja and Qwen-Qwen3-0.6B.jinja ("For each function call,
    # return a json object with function name and arguments within <tool_call></tool_call> XML tags"); vLLM hermes
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        [("text", "Let me check.\n"), W],
    ),
    "hermes_parameters": ('<tool_call>\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n</tool_call>', [W]),
    "hermes_string_arguments": (
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>',
        [W],
    ),
    "hermes_several": (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        [W, T],
    ),
    # Qwen3-Coder XML: Qwen3-Coder.jinja ("<tool_call>\n<function=example_function_name>\n<parameter=...>\nvalue_1\n
    # </parameter>"); vLLM qwen3_coder / qwen3_xml parsers
    "qwen3_coder": (
        "I'll run it.\n<tool_call>\n<function=run>\n<parameter=command>\nls -la\n</parameter>\n<parameter=timeout>\n"
        "30\n</parameter>\n<parameter=background>\nfalse\n</parameter>\n</function>\n</tool_call>",
        [("text", "I'll run it.\n"), ("tool_use", "run", {"command": "ls -la", "timeout": 30, "background": False})],
    ),
    "qwen3_coder_without_outer_tag": (
        "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
        [W],
    ),
    # GLM-4.5+/4.6: GLM-4.6.jinja ("<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>...");
    # vLLM glm4_moe parser
    "glm": (
        "<tool_call>run\n<arg_key>command</arg_key>\n<arg_value>echo hi</arg_value>\n<arg_key>args</arg_key>\n"
        '<arg_value>["a", 1]</arg_value>\n</tool_call>',
        [("tool_use", "run", {"command": "echo hi", "args": ["a", 1]})],
    ),
    # Anthropic-style XML that models trained on Claude transcripts print (DeepSeek-V3.2.jinja writes the same
    # shape with DSML-prefixed tags: "<function_calls>\n<invoke name=\"$FUNCTION_NAME\">\n<parameter name=...")
    "function_calls": (
        '<function_calls>\n<invoke name="run">\n<parameter name="command">pwd</parameter>\n'
        '<parameter name="ratio">0.5</parameter>\n</invoke>\n<invoke name="get_weather">\n'
        '<parameter name="city">Paris</parameter>\n</invoke>\n</function_calls>',
        [("tool_use", "run", {"command": "pwd", "ratio": 0.5}), W],
    ),
    # MiniMax-M2: MiniMax-M2.jinja (toolcall_begin_token <minimax:tool_call>, then <invoke name=...><parameter
    # name=...>); vLLM minimax_m2 parser
    "minimax": (
        '<minimax:tool_call>\n<invoke name="run">\n<parameter name="env">{"A": "1"}</parameter>\n</invoke>\n'
        "</minimax:tool_call>",
        [("tool_use", "run", {"env": {"A": "1"}})],
    ),
    # A bare JSON object as the whole answer: meta-llama-Llama-3.1-8B-Instruct.jinja ("Respond in the format
    # {"name": function name, "parameters": dictionary of argument name and its value}"); vLLM llama3_json; Ollama
    # returning Qwen3's call as content
    "bare_json": ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [W]),
    "bare_json_arguments": ('\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', [W]),
    # Mistral before v11: mistralai-Mistral-Nemo-Instruct-2407.jinja ("[TOOL_CALLS][" + JSON list); llama.cpp
    # common/chat-parsers mistral-nemo, vLLM mistral parser (pre-v11)
    "mistral_list": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]',
        [W],
    ),
    # Mistral v11+: Mistral-Small-3.2-24B-Instruct-2506.jinja ("[TOOL_CALLS]" + name + "[ARGS]" + arguments|tojson);
    # vLLM mistral parser (v11+)
    "mistral_args": (
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}',
        [W, T],
    ),
}


def fold_text(pieces: list, tools: dict | None = None, *, finish: str = "stop", stops: list | None = None):
    """Content pieces through an EventBuilder with the text-call watcher on -> (events, message)."""
    watcher = cp.TextCalls(dict(TEXT_SCHEMAS) if tools is None else tools)
    ev = cp.EventBuilder("msg_1", "m", 10, text_calls=watcher, stop_sequences=stops)
    ev.start_message()
    events = ev.take()
    for piece in pieces:
        ev.content(piece)
        events += ev.take()
    ev.backend_stop(finish)
    ev.end_message()
    events += ev.take()
    return events, cp.fold_events(events)


def text_blocks(message: dict) -> list:
    out = []
    for b in message["content"]:
        if b["type"] == "tool_use":
            assert b["id"].startswith("toolu_")
            out.append(("tool_use", b["name"], b["input"]))
        else:
            out.append((b["type"], b.get("text")))
    return out


@pytest.mark.parametrize("fmt", TEXT_CALL_FORMATS)
def test_text_calls_each_format(fmt):
    text, expected = TEXT_CALL_FORMATS[fmt]
    events, message = fold_text([text])
    assert text_blocks(message) == expected
    assert message["stop_reason"] == "tool_use"
    assert check_stream(events)["blocks"] == expected  # Anthropic's event grammar


@pytest.mark.parametrize("fmt", TEXT_CALL_FORMATS)
def test_text_calls_split_at_every_position(fmt):
    """A marker (and everything else) split across two chunks at any position gives the same blocks."""
    text, expected = TEXT_CALL_FORMATS[fmt]
    for cut in range(1, len(text)):
        assert text_blocks(fold_text([text[:cut], text[cut:]])[1]) == expected, cut


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(TEXT_CALL_FORMATS)),
    before=st.sampled_from(["", "Sure.\n", "a < b and [x] `y`\n", "```\ncode\n```\n"]),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12),
)
def test_property_text_calls_any_chunking(fmt, before, cuts):
    """Any chunking, any prose before the call (with <, [ and fences that are not markers): the same message as
    one chunk gives, and the text before the call is never changed."""
    text, expected = TEXT_CALL_FORMATS[fmt]
    if fmt.startswith("bare_json") and before:
        expected = [("text", before + text)]  # a JSON object is a call only as the whole answer
    elif before:
        expected = [("text", before + expected[0][1])] + expected[1:] if expected[0][0] == "text" else expected
        expected = expected if expected[0][0] == "text" else [("text", before)] + expected
    whole = before + text
    points = sorted({c % len(whole) for c in cuts if c % len(whole)})
    pieces = [whole[a:b] for a, b in zip([0] + points, points + [len(whole)])]
    assert text_blocks(fold_text(pieces)[1]) == expected


def test_text_calls_stream_live_and_hold_back_only_a_possible_marker():
    watcher = cp.TextCalls(dict(TEXT_SCHEMAS))
    ev = cp.EventBuilder("msg_1", "m", 10, text_calls=watcher)
    ev.start_message()
    ev.take()

    def texts() -> str:
        return "".join(d["delta"].get("text", "") for n, d in ev.take() if n == "content_block_delta")

    ev.content("Hello ")
    assert texts() == "Hello "  # no marker possible: streams at once
    ev.content("there <tool")
    assert texts() == "there "  # only "<tool" is held back
    ev.content("ing> is fine, [TOOL")
    assert texts() == "<tooling> is fine, "  # released unchanged the moment it cannot be a marker
    ev.content("S] ok <tool_call>`code`")
    assert texts() == "[TOOLS] ok <tool_call>`code"  # a marker whose body cannot be a call is text at once
    ev.content(' <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert texts() == "` "  # (a backtick could have begun a ``` fence); a call in progress is held
    ev.content('is"}}\n</tool_call>')
    ev.backend_stop("stop")
    ev.end_message()
    events = ev.take()
    assert [d["content_block"]["type"] for n, d in events if n == "content_block_start"] == ["tool_use"]
    args = "".join(d["delta"].get("partial_json", "") for n, d in events if n == "content_block_delta")
    assert json.loads(args) == {"city": "Paris"}


@pytest.mark.parametrize(
    "text",
    [
        # a name the request did not offer
        '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',
        "<function=delete_everything>\n<parameter=x>\n1\n</parameter>\n</function>",
        '<function_calls>\n<invoke name="delete_everything">\n</invoke>\n</function_calls>',
        "<tool_call>delete_everything\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>",
        '[TOOL_CALLS]delete_everything[ARGS]{"a": 1}',
        '[TOOL_CALLS][{"name": "delete_everything", "arguments": {}}]',
        '{"name": "delete_everything", "arguments": {}}',
        # inside a markdown code fence: an example, not a call
        'Use this format:\n```\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>\n```",
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        # ordinary JSON answers and prose
        '{"name": "Bob", "age": 3}',
        '{"result": {"name": "get_weather"}}',
        "Write <tool_call> and </tool_call> around the JSON.",
        "The array [TOOL_CALLS] is empty; a < b; <function=x is not a tag.",
        '{"name": "get_weather", "arguments": {"city": "Paris"}} and then some prose',
    ],
)
def test_text_that_is_not_a_call_stays_text_unchanged(text):
    for chunked in ([text], list(text)):
        _, message = fold_text(chunked)
        assert text_blocks(message) == [("text", text)]
        assert message["stop_reason"] == "end_turn"


def test_xml_values_converted_by_input_schema():
    args = cp._xml_arguments(
        [
            ("command", "\n  indented\nlines  \n"),
            ("timeout", "\n30\n"),
            ("ratio", "2.5"),
            ("background", "True"),
            ("env", '\n{"A": "1"}\n'),
            ("args", "[1, 2]"),
            ("note", "\nnull-able string\n"),
            ("unknown", "\n42\n"),
        ],
        RUN_TOOL["input_schema"],
    )
    assert args == {
        "command": "  indented\nlines  ",  # verbatim, minus the newline the templates add around it
        "timeout": 30,
        "ratio": 2.5,
        "background": True,
        "env": {"A": "1"},
        "args": [1, 2],
        "note": "null-able string",
        "unknown": "42",  # not in the schema: text
    }
    assert cp.typed_value("thirty", {"type": "integer"}) == "thirty"  # unparseable: the text, not a crash


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', {"city": "Pa"}),
        ("<tool_call>\n<function=run>\n<parameter=command>\nls -l", {"command": "ls -l"}),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Pa', {"city": "Pa"}),
    ],
)
def test_text_call_cut_off_by_max_tokens_is_closed(text, expected):
    name = "run" if "run" in text else "get_weather"
    for chunked in ([text], list(text)):
        events, message = fold_text(chunked, finish="length")
        assert text_blocks(message) == [("tool_use", name, expected)]
        assert message["stop_reason"] == "max_tokens"
        check_stream(events)


def test_native_tool_calls_win_over_text_calls():
    watcher = cp.TextCalls(dict(TEXT_SCHEMAS))
    ev = cp.EventBuilder("msg_1", "m", 10, text_calls=watcher)
    ev.start_message()
    ev.content('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    ev.tool_fragment(0, "call_native00001", "get_weather", PARIS_JSON)
    ev.backend_stop("tool_calls")
    ev.end_message()
    message = cp.fold_events(ev.take())
    assert [b["type"] for b in message["content"]] == ["tool_use"]
    assert message["content"][0]["id"] == "call_native00001"


def test_no_watcher_when_no_tools_or_tool_choice_none_or_switched_off():
    config = cp.Config(provider="openai", base_url="http://x/v1", default_model="m")
    route = cp.Route("m", "openai", "http://x/v1")

    def watcher(body: dict, config=config, route=route):
        req = cp.parse_request(body)
        return cp.exchange(req, route, config, 1.0, "req_1", cp.RequestRecord()).builder.text_calls

    assert watcher(body_of()) is not None
    assert watcher(body_of(tools=[])) is None
    assert watcher(body_of(tool_choice={"type": "none"})) is None
    assert watcher(body_of(), config=cp.Config(provider="openai", default_model="m", text_tool_calls=False)) is None
    assert watcher(body_of(), route=cp.Route("m", "openai", "http://x/v1", text_tool_calls=False)) is None
    schema = {"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
    assert watcher(body_of(**schema)) is None  # structured output: a JSON answer is the answer


def test_text_calls_switched_off_end_to_end(make_stack, provider):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    stack = make_stack(provider, text_tool_calls=False)
    stack.backend.queue(text_answer(provider, text))
    msg = stack.client().messages.create(**body_of())
    assert [(b.type, b.text) for b in msg.content] == [("text", text)]
    stack = make_stack(provider, model_map={"claude-*": {"model": "m", "text_tool_calls": False}})
    stack.backend.queue(text_answer(provider, text))
    assert stack.client().messages.create(**body_of()).content[0].type == "text"


@pytest.mark.parametrize("fmt", ["hermes", "qwen3_coder", "glm", "function_calls", "bare_json", "mistral_args"])
def test_text_calls_end_to_end_tiny_chunks(make_stack, provider, fmt, caplog):
    """Streamed in 1- and 3-character chunks, both providers: raw SSE grammar, the SDK's accumulator and the
    non-streaming answer agree; one INFO line per recovered call."""
    text, expected = TEXT_CALL_FORMATS[fmt]
    stack = make_stack(provider)
    for n in (1, 3):
        caplog.clear()
        stack.backend.requests.clear()
        with caplog.at_level(logging.INFO, logger="claude_proxy"):
            result = run_modes(stack, text_answer(provider, *pieces(text, n)), tools=TEXT_TOOLS)
        assert_tool_use(result, expected)
        recovered = [r for r in caplog.records if "recovered a tool call written as text" in r.getMessage()]
        assert len(recovered) == 3 * sum(1 for b in expected if b[0] == "tool_use")  # three requests


def test_long_text_call_arguments_are_cheap():
    """A call with 200 KB of arguments in 4-character chunks: the closing tag is searched once, not per chunk."""
    content = "x" * 200_000
    text = '<tool_call>\n{"name": "Read", "arguments": {"path": "a", "content": "' + content + '"}}\n</tool_call>'
    t0 = time.perf_counter()
    _, message = fold_text(pieces(text, 4))
    assert time.perf_counter() - t0 < 2.0
    assert text_blocks(message) == [("tool_use", "Read", {"path": "a", "content": content})]
    long_prose = "Use <tool_call> tags like this: " + "word " * 100
    assert text_blocks(fold_text([long_prose])[1]) == [("text", long_prose)]


def test_inline_think_then_text_call():
    """Qwen3 on a server with neither a reasoning nor a tool parser: <think> first, then the call, as text."""
    text = "<think>\nThe user wants weather.\n</think>\n\n" + TEXT_CALL_FORMATS["hermes"][0]
    for cut in range(1, len(text)):
        message = fold_text([text[:cut], text[cut:]])[1]
        assert text_blocks(message) == [("thinking", None), ("text", "Let me check.\n"), W], cut
        assert message["content"][0]["thinking"].strip() == "The user wants weather."


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(alphabet="ab#E N\n", max_size=30),
    stop=st.sampled_from(["###", "END", "\n\n"]),
    after=st.text(alphabet="ab#EN \n", max_size=10),
    cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=8),
)
def test_property_stop_strings_any_chunking(before, stop, after, cuts):
    """The text before the first match of any stop string, whatever the chunking; never held past the end."""
    stops = ["###", "END", "\n\n"]
    whole = before + stop + after
    first = min((i, s) for s in stops if (i := whole.find(s)) >= 0)
    points = sorted({c % len(whole) for c in cuts if c % len(whole)})
    chunks = [whole[a:b] for a, b in zip([0] + points, points + [len(whole)])]
    _, message = fold_text(chunks, tools={}, stops=stops)
    assert "".join(b["text"] for b in message["content"]) == whole[: first[0]]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", first[1])


# --- Stop sequences watched by the proxy (llama.cpp and Ollama do not say which matched) ------------


def test_stop_strings_unit_hold_back_only_a_partial_match():
    stops = cp.StopStrings(["###", "END"])
    assert stops.feed("Hello #") == ("Hello ", None)  # only "#" is held
    assert stops.feed("#x E") == ("##x ", None)
    assert stops.feed("Nd") == ("ENd", None)
    assert stops.feed(" a ##") == (" a ", None)
    assert stops.feed("#tail") == ("", "###")
    assert cp.StopStrings(["ab", "b"]).feed("xab") == ("x", "ab")  # the earliest match wins


@pytest.mark.parametrize("split", [1, 2, 5])
def test_stop_sequence_reported_and_backend_closed(make_stack, provider, split):
    stack = make_stack(provider)
    text = "Here it is.\n###\nMore text the client must not see."
    answer = text_answer(provider, *pieces(text, split), *(["x"] * 40))
    answer.delay = 0.01  # the backend goes on writing: the proxy hangs up on it
    client = stack.client()
    stack.backend.queue(answer)
    msg = client.messages.create(**body_of(stop_sequences=["END", "###"]))
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "###")
    assert [(b.type, b.text) for b in msg.content] == [("text", "Here it is.\n")]
    assert "stop" not in stack.backend.requests[0] and "stop" not in stack.backend.requests[0].get("options", {})
    assert wait_for(lambda: stack.backend.disconnects == 1)
    stack.backend.queue(answer, answer)
    with client.messages.stream(**body_of(stop_sequences=["###"])) as s:
        streamed = s.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence, streamed.content[0].text) == (
        "stop_sequence",
        "###",
        "Here it is.\n",
    )
    events = check_stream(sse_events(stack, body_of(stop_sequences=["###"])))
    assert events["blocks"] == [("text", "Here it is.\n")] and events["stop_reason"] == "stop_sequence"


def test_stop_sequence_partial_match_released_at_the_end(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "a #", "#"))
    msg = stack.client().messages.create(**body_of(stop_sequences=["###"]))
    assert (msg.stop_reason, msg.stop_sequence, msg.content[0].text) == ("end_turn", None, "a ##")


def test_stop_sequence_before_a_text_tool_call(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "Done.\nObservation:", HERMES_CALL))
    msg = stack.client().messages.create(**body_of(stop_sequences=["Observation:"]))
    assert (msg.stop_reason, [b.type for b in msg.content]) == ("stop_sequence", ["text"])


def test_stop_sequence_after_a_text_tool_call_is_tool_use_without_a_sequence(make_stack, provider):
    """Regression: a stop string matched after a recovered call gave stop_reason tool_use with stop_sequence set;
    Anthropic sets stop_sequence only with stop_reason stop_sequence."""
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "Sure ", HERMES_CALL, " then Observation: more"))
    msg = stack.client().messages.create(**body_of(stop_sequences=["Observation:"]))
    assert (msg.stop_reason, msg.stop_sequence) == ("tool_use", None)
    assert [b.type for b in msg.content] == ["text", "tool_use", "text"]  # " then " before the stop string


# --- Errors: backend HTTP errors before the stream ---------------------------------------------


BACKEND_ERROR_MESSAGE = "Invalid value for 'temperature': must be between 0 and 2 (backend says so)"


def backend_error_body(shape: str, status: int, message: str = BACKEND_ERROR_MESSAGE) -> tuple[Any, str, str]:
    """An error answer as this kind of server sends it -> (body, content type, the text the client must see)."""
    if shape == "openai":
        return (
            {"error": {"message": message, "type": "invalid_request_error", "param": "temperature", "code": None}},
            "application/json",
            message,
        )
    if shape == "vllm":
        return (
            {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status},
            "application/json",
            message,
        )
    if shape == "ollama":
        msg = 'model "qwen3:99b" not found, try pulling it first'
        return {"error": msg}, "application/json", msg
    if shape == "html":
        page = (
            f"<html>\r\n<head><title>{status} Gateway Says No</title></head>\r\n<body>\r\n<center><h1>{status} "
            "Gateway Says No</h1></center>\r\n<hr><center>nginx/1.27.3</center>\r\n</body>\r\n</html>\r\n"
        )
        return page, "text/html", f"{status} Gateway Says No"
    if shape == "empty":
        return "", "application/json", ""
    raise AssertionError(shape)


# backend status -> (client status, error type, SDK exception, x-should-retry)
STATUS_MATRIX = [
    (400, 400, "invalid_request_error", anthropic.BadRequestError, "false"),
    (401, 401, "authentication_error", anthropic.AuthenticationError, "false"),
    (403, 403, "permission_error", anthropic.PermissionDeniedError, "false"),
    (404, 404, "not_found_error", anthropic.NotFoundError, "false"),
    (413, 413, "request_too_large", anthropic.ContentTooLargeError, "false"),
    (429, 429, "rate_limit_error", anthropic.RateLimitError, "true"),
    (500, 500, "api_error", anthropic.InternalServerError, "any"),
    (502, 502, "api_error", anthropic.InternalServerError, "true"),
    (503, 529, "overloaded_error", anthropic.OverloadedError, "true"),
    (529, 529, "overloaded_error", anthropic.OverloadedError, "true"),
]


SHAPES = ["openai", "vllm", "ollama", "html", "empty"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "backend_status,status,etype,exc_class,retry", STATUS_MATRIX, ids=[str(r[0]) for r in STATUS_MATRIX]
)
def test_backend_http_error_maps(make_stack, backend_status, status, etype, exc_class, retry, shape):
    stack = make_stack("openai")
    body, ctype, shown = backend_error_body(shape, backend_status)
    stack.backend.queue(Reply(backend_status, body, content_type=ctype))
    with pytest.raises(exc_class) as info:
        stack.client().messages.create(model="claude-opus-5-5", max_tokens=50, messages=USER_HI)
    err = info.value
    message = assert_sdk_error(err, status, etype)
    assert shown in message, message
    if shape == "empty":
        assert str(backend_status) in message or "empty" in message, message
    if retry != "any":
        assert err.response.headers.get("x-should-retry") == retry
    assert len(stack.backend.requests) == 1  # HTTP errors are not retried inside the proxy
    assert_serves(stack, "openai")


@pytest.mark.parametrize(
    "backend_status,status,etype,exc_class,retry", STATUS_MATRIX, ids=[str(r[0]) for r in STATUS_MATRIX]
)
def test_backend_http_error_before_stream_is_http_error(
    make_stack, provider, backend_status, status, etype, exc_class, retry
):
    """With stream: true the error still comes as an HTTP status: nothing was sent yet."""
    stack = make_stack(provider)
    body, ctype, shown = backend_error_body("ollama" if provider == "ollama" else "vllm", backend_status)
    stack.backend.queue(Reply(backend_status, body, content_type=ctype))
    with pytest.raises(exc_class) as info:
        with stack.client().messages.stream(model="claude-opus-5-5", max_tokens=50, messages=USER_HI) as s:
            list(s)
    message = assert_sdk_error(info.value, status, etype)
    assert shown in message
    if retry != "any":
        assert info.value.response.headers.get("x-should-retry") == retry
    assert len(stack.backend.requests) == 1
    assert_serves(stack, provider)


@pytest.mark.parametrize("backend_status,status", [(429, 429), (503, 529)])
def test_retry_after_is_forwarded(make_stack, backend_status, status):
    stack = make_stack("openai")
    body, ctype, _ = backend_error_body("openai", backend_status, "Rate limit reached for requests")
    stack.backend.queue(Reply(backend_status, body, content_type=ctype, headers={"retry-after": "7"}))
    code, headers, text = http(stack, "POST", "/v1/messages", VALID)
    assert_error(code, headers, text, status, "rate_limit_error" if status == 429 else "overloaded_error", "true")
    assert headers.get("retry-after") == "7"
    assert len(stack.backend.requests) == 1


@pytest.mark.parametrize(
    "backend_status,status,etype",
    [
        (404, 404, "not_found_error"),
        (400, 400, "invalid_request_error"),
        (500, 500, "api_error"),
        (503, 529, "overloaded_error"),
    ],
)
def test_ollama_native_errors(make_stack, backend_status, status, etype):
    stack = make_stack("ollama")
    message = {
        404: 'model "qwen3:99b" not found, try pulling it first',
        400: "registry.ollama.ai/library/gemma3:1b does not support tools",
        500: "llama runner process has terminated: exit status 2",
        503: "server busy, please try again.  maximum pending requests exceeded",
    }[backend_status]
    stack.backend.queue(Reply(backend_status, {"error": message}))
    code, headers, text = http(stack, "POST", "/v1/messages", VALID)
    shown = assert_error(code, headers, text, status, etype)
    assert message in shown
    assert len(stack.backend.requests) == 1


def test_backend_plain_text_error(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(Reply(500, "Internal Server Error: CUDA out of memory", content_type="text/plain"))
    code, headers, text = http(stack, "POST", "/v1/messages", VALID)
    assert "CUDA out of memory" in assert_error(code, headers, text, 500, "api_error")


# --- Errors: context overflow ------------------------------------------------------------------


OVERFLOWS = {
    "openai": {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your messages "
            "resulted in 9000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    },
    "vllm-requested": {
        "object": "error",
        "message": "This model's maximum context length is 8192 tokens. However, "
        "you requested 9050 tokens (9000 in the messages, 50 in the completion). Please reduce the "
        "length of the messages or completion.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    },
    "vllm-request-has": {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your "
            "request has 9000 input tokens. Please reduce the length of the input messages.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    },
    # vLLM >= 0.11: "requested 0 output tokens and your prompt contains at least N input tokens"
    "vllm-0-output": {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, you "
            "requested 0 output tokens and your prompt contains at least 9000 input tokens, for "
            "a total of at least 9000 tokens. Please reduce the length of the input prompt or "
            "the number of requested output tokens. (parameter=input_tokens, value=9000)",
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }
    },
    "llamacpp-numbers-in-message": {
        "error": {
            "code": 400,
            "message": "request (9000 tokens) exceeds the available context size (8192 tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 9000,
            "n_ctx": 8192,
        }
    },
    # older llama.cpp builds: the numbers are only in n_prompt_tokens / n_ctx beside the message
    "llamacpp-numbers-in-fields": {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 9000,
            "n_ctx": 8192,
        }
    },
}


@pytest.mark.parametrize("name", list(OVERFLOWS))
def test_context_overflow_is_prompt_too_long(make_stack, name):
    stack = make_stack("openai")
    stack.backend.queue(Reply(400, OVERFLOWS[name]))
    with pytest.raises(anthropic.BadRequestError) as info:
        stack.client().messages.create(model="claude-opus-5-5", max_tokens=50, messages=USER_HI)
    message = assert_sdk_error(info.value, 400, "invalid_request_error")
    assert message == "prompt is too long: 9000 tokens > 8192 maximum"
    assert info.value.response.headers.get("x-should-retry") == "false"
    assert len(stack.backend.requests) == 1


def test_context_overflow_vllm_output_budget_is_lowered(make_stack):
    """vLLM >= 0.11: 'you requested 1000 output tokens and your prompt contains at least 8001 input tokens, for a
    total of at least 9001 tokens'. The prompt fits: the proxy lowers max_tokens to what is left (191) and
    retries, as it does for the older '(N in the messages, M in the completion)' wording."""
    stack = make_stack("openai")
    stack.backend.queue(
        Reply(
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 8192 tokens. "
                    "However, you requested 1000 output tokens and your prompt contains at least 8001 input tokens, "
                    "for a total of at least 9001 tokens. Please "
                    "reduce the length of the input prompt or the number of requested output tokens. "
                    "(parameter=input_tokens, value=8001)",
                    "type": "BadRequestError",
                    "param": "input_tokens",
                    "code": 400,
                }
            },
        ),
        text_answer("openai", "fits"),
    )
    code, headers, text = http(stack, "POST", "/v1/messages", req(max_tokens=1000))
    assert code == 200, text
    assert len(stack.backend.requests) == 2
    sent = stack.backend.requests[1]
    assert sent.get("max_tokens", sent.get("max_completion_tokens")) <= 191


def test_context_overflow_older_vllm_output_budget_is_lowered(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(
        Reply(
            400,
            {
                "object": "error",
                "message": "This model's maximum context length is 8192 tokens. "
                "However, you requested 9000 tokens (8000 in the messages, 1000 in the "
                "completion). Please reduce the length of the messages or completion.",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
        ),
        text_answer("openai", "fits"),
    )
    code, _, text = http(stack, "POST", "/v1/messages", req(max_tokens=1000))
    assert code == 200, text
    sent = stack.backend.requests[1]
    assert sent.get("max_tokens", sent.get("max_completion_tokens")) <= 192


def test_context_overflow_when_streaming(make_stack):
    stack = make_stack("openai")
    stack.backend.queue(Reply(400, OVERFLOWS["openai"]))
    code, headers, text, _ = raw_stream(stack, VALID)
    message = assert_error(code, headers, text, 400, "invalid_request_error", "false")
    assert message == "prompt is too long: 9000 tokens > 8192 maximum"


# ======================================================================================
# 7. PROVIDERS
# ======================================================================================


# --- Discovery ---------------------------------------------------------------------------------


def test_zero_config_discovers_backend_models(make_stack, provider):
    stack = make_stack(provider, default_model=None)
    stack.client().messages.create(model="claude-opus-5-5", max_tokens=10, messages=USER_HI)
    stack.client().messages.create(model="claude-haiku-5-5", max_tokens=10, messages=USER_HI)
    models = [r["model"] for r in stack.backend.requests]
    assert models == (["qwen3-coder", "qwen3-coder"] if provider == "openai" else ["qwen3:8b", "qwen3:1.7b"])
    listed = stack.client().models.list()
    assert (
        provider == "openai"
        and [m.id for m in listed.data] == ["qwen3-coder"]
        or [m.id for m in listed.data] == ["qwen3:8b", "qwen3:1.7b"]
    )


# ======================================================================================
# 8. STREAMING AND BACKEND I/O
# ======================================================================================


# --- Basics through the SDK, both providers ----------------------------------------------------


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


# --- Reliability: failures after the stream started --------------------------------------------


def _drop_handler(provider: str) -> Callable:
    async def handler(request: web.Request) -> web.StreamResponse:
        if provider == "openai":
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for chunk in oai_text_stream("Hel", "lo")[:2]:
                await resp.write(sse_bytes(chunk))
        else:
            resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
            await resp.prepare(request)
            await resp.write(ndjson_bytes(ollama_chunk("Hel")))
        await asyncio.sleep(0.05)
        request.transport.close()  # the backend process dies: no terminating chunk
        return resp

    return handler


def _stall_handler(provider: str) -> Callable:
    """Some output, then silence longer than the proxy's timeout (0.3 s), then the rest."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if provider == "openai":
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            lines = [sse_bytes(c) for c in oai_text_stream("Hel", "lo") + ["[DONE]"]]
        else:
            resp = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
            lines = [ndjson_bytes(c) for c in ollama_text_stream("Hel", "lo")]
        await resp.prepare(request)
        await resp.write(b"".join(lines[:2]))
        try:
            await asyncio.sleep(0.8)
            await resp.write(b"".join(lines[2:]))
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    return handler


OAI_HEAD = oai_text_stream("Hel", "lo")[:3]  # role chunk + two content chunks


OLL_HEAD = [ollama_chunk("Hel"), ollama_chunk("lo")]


OAI_ERROR = {
    "error": {
        "message": "CUDA error: an illegal memory access was encountered",
        "type": "server_error",
        "param": None,
        "code": 500,
    }
}


OLL_ERROR = {"error": "an error was encountered while running the model"}


OAI_BROKEN = '{"id":"chatcmpl-7f3a9c","choices":[{"delta":{"content":"x"'


OLL_BROKEN = b'{"model":"qwen3:8b","message":{"role":"assistant","content":\n'


def mid_stream_fault(kind: str, provider: str) -> Any:
    """Faults after some output; the fault arrives in a later read than the output (delay 0.05 s)."""
    if kind == "drop":
        return _drop_handler(provider)
    if kind == "stall":
        return _stall_handler(provider)
    if kind == "error-object":
        if provider == "openai":
            return SSE(OAI_HEAD + [OAI_ERROR], done=False, delay=0.05)
        return NDJSON(OLL_HEAD + [OLL_ERROR], delay=0.05)
    if kind == "malformed":
        if provider == "openai":
            return SSE(OAI_HEAD + [OAI_BROKEN], done=False, delay=0.05)
        return NDJSON(OLL_HEAD + [OLL_BROKEN], delay=0.05)
    if kind == "truncated":
        if provider == "openai":
            return SSE(OAI_HEAD, done=False)  # neither a finish_reason nor [DONE]
        return NDJSON(OLL_HEAD)  # no done: true
    raise AssertionError(kind)


FAULTS = ["drop", "error-object", "malformed", "stall", "truncated"]


def fault_stack(make_stack, provider: str, kind: str):
    return make_stack(provider, timeout=0.3) if kind == "stall" else make_stack(provider)


@pytest.mark.parametrize("kind", FAULTS)
def test_mid_stream_fault_becomes_error_event(make_stack, provider, kind):
    stack = fault_stack(make_stack, provider, kind)
    stack.backend.queue(mid_stream_fault(kind, provider))
    started = time.monotonic()
    code, headers, text, events = raw_stream(stack, VALID)
    assert time.monotonic() - started < 1.5
    assert code == 200, text
    names = [name for _, name, _ in events]
    assert names[0] == "message_start"
    assert "content_block_delta" in names  # what arrived before the fault was forwarded
    assert names[-1] == "error", names
    assert "message_stop" not in names
    error = events[-1][2]
    assert error["type"] == "error"
    assert error["error"]["type"] in ("api_error", "overloaded_error", "timeout_error")
    assert error["error"]["message"]
    assert_serves(stack, provider)


@pytest.mark.parametrize("kind", FAULTS)
def test_mid_stream_fault_raises_in_sdk_stream(make_stack, provider, kind):
    stack = fault_stack(make_stack, provider, kind)
    stack.backend.queue(mid_stream_fault(kind, provider))
    texts: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with stack.client().messages.stream(model="claude-opus-5-5", max_tokens=50, messages=USER_HI) as s:
            for text in s.text_stream:
                texts.append(text)
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "error"
    assert "".join(texts).startswith("Hel")
    assert_serves(stack, provider)


@pytest.mark.parametrize("kind", FAULTS)
def test_mid_stream_fault_non_streaming_is_5xx(make_stack, provider, kind):
    stack = fault_stack(make_stack, provider, kind)
    stack.backend.queue(mid_stream_fault(kind, provider))
    code, headers, text = http(stack, "POST", "/v1/messages", VALID)
    assert 500 <= code < 600, (code, text)
    body = json.loads(text)
    assert body["type"] == "error" and body["error"]["type"] in ("api_error", "overloaded_error", "timeout_error")
    assert headers.get("request-id")
    with pytest.raises(anthropic.InternalServerError):
        stack.backend.queue(mid_stream_fault(kind, provider))
        stack.client().messages.create(model="claude-opus-5-5", max_tokens=50, messages=USER_HI)
    assert_serves(stack, provider)


def test_mid_stream_error_keeps_backend_message(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(mid_stream_fault("error-object", provider))
    _, _, _, events = raw_stream(stack, VALID)
    expected = "illegal memory access" if provider == "openai" else "an error was encountered while running"
    assert expected in events[-1][2]["error"]["message"]


@pytest.mark.parametrize("kind", ["error-object", "malformed"])
def test_output_before_fault_in_same_read_is_forwarded(make_stack, provider, kind):
    """The backend's text and its error arrive in one TCP read: the text decoded before the error still reaches
    the client, followed by `event: error` (nothing the backend produced is silently dropped)."""
    stack = make_stack(provider)
    if provider == "openai":
        tail = OAI_ERROR if kind == "error-object" else OAI_BROKEN
        stack.backend.queue(SSE([b"".join(sse_bytes(c) for c in OAI_HEAD + [tail])], done=False))
    else:
        tail = ndjson_bytes(OLL_ERROR) if kind == "error-object" else OLL_BROKEN
        stack.backend.queue(NDJSON([b"".join(ndjson_bytes(c) for c in OLL_HEAD) + tail]))
    _, _, _, events = raw_stream(stack, VALID)
    names = [n for _, n, _ in events]
    assert names[-1] == "error" and "message_stop" not in names
    text = "".join(d["delta"].get("text", "") for _, n, d in events if n == "content_block_delta")
    assert text == "Hello", names


def test_stream_with_finish_but_without_done_is_complete(make_stack):
    """Servers that end after the finish/usage chunk without `data: [DONE]` still completed the answer."""
    stack = make_stack("openai")
    stack.backend.queue(SSE(oai_text_stream("ok"), done=False))
    _, _, _, events = raw_stream(stack, VALID)
    assert [n for _, n, _ in events][-1] == "message_stop"


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [{"index": 0, "delta": "x"}]},  # delta a string
        {"choices": [{"index": 0, "delta": {"reasoning": 5}}]},  # reasoning a number
        {"usage": {"prompt_tokens": "12"}, "choices": []},  # usage as strings
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]},
    ],
)
def test_odd_shaped_backend_json_is_an_error_event_not_a_broken_stream(make_stack, chunk):
    stack = make_stack("openai")
    stack.backend.queue(SSE([oai_chunk({"content": "Hel"}), chunk]), SSE([oai_chunk({"content": "Hel"}), chunk]))
    status, _, _, events = raw_stream(stack, req())
    assert status == 200
    names = [e[1] for e in events]
    assert names[-1] == "error" and "message_stop" not in names
    assert events[-1][2]["error"]["type"] == "api_error" and "unexpected shape" in events[-1][2]["error"]["message"]
    code, headers, text = http(stack, "POST", "/v1/messages", req())  # non-streaming: a clean 502
    assert_error(code, headers, text, 502, "api_error")
    assert_serves(stack, "openai")
    assert not stack.app[cp.BACKEND].session.connector._acquired  # every backend response released


def test_non_streaming_client_disconnect_closes_the_backend(make_stack):
    stack = make_stack("openai", ping_interval=0.05)
    stack.backend.queue(SSE(oai_text_stream(*["x"] * 40), delay=0.05))
    with pytest.raises(OSError):  # urllib: the read timed out
        http(stack, "POST", "/v1/messages", req(), timeout=0.3)  # the client gives up
    assert wait_for(lambda: stack.backend.disconnects >= 1, timeout=3)
    assert_serves(stack, "openai")


@pytest.mark.parametrize("streaming", [True, False])
def test_client_leaving_before_the_backend_answers_closes_the_backend(make_stack, streaming):
    """A local model may think for minutes before its first byte: a client that gives up meanwhile (Esc in
    Claude Code) must not leave the backend computing."""
    stack = make_stack("openai")
    closed = []

    async def slow_headers(request: web.Request) -> web.StreamResponse:
        for _ in range(150):  # up to 3 s before any byte, watching our side of the connection
            await asyncio.sleep(0.02)
            if request.transport is None or request.transport.is_closing():
                closed.append(True)
                return web.Response(status=499)
        return web.Response(status=500)

    stack.backend.queue(slow_headers)
    with pytest.raises(OSError):  # urllib: the read timed out
        http(stack, "POST", "/v1/messages", req(stream=streaming), timeout=0.3)
    assert wait_for(lambda: bool(closed), timeout=2.5)
    assert_serves(stack, "openai")


# --- Reliability: connection-level retries inside the proxy ------------------------------------


async def _closing_server(counter: list) -> tuple[asyncio.AbstractServer, int]:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counter.append(1)
        try:
            await asyncio.wait_for(reader.read(1), 1)  # take the request, then hang up without a byte
        except asyncio.TimeoutError:
            pass
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("retries", [0, 2])
def test_backend_closing_every_connection_is_502_after_retries(make_stack, loop_thread, retries):
    counter: list = []
    server, port = loop_thread.run(_closing_server(counter))
    try:
        stack = make_stack("openai", base_url=f"http://127.0.0.1:{port}/v1", retries=retries, discover=False)
        code, headers, text = http(stack, "POST", "/v1/messages", VALID)
        assert_error(code, headers, text, 502, "api_error", "true")
        assert len(counter) == retries + 1
    finally:
        server.close()


def test_backend_closing_once_is_retried(make_stack, provider):
    stack = make_stack(provider)

    async def hang_up(request: web.Request) -> web.StreamResponse:
        request.transport.close()  # accepted, read the request, closed before any response byte
        return web.Response()

    stack.backend.queue(hang_up, text_answer(provider, "after", " retry"))
    msg = stack.client().messages.create(model="claude-opus-5-5", max_tokens=50, messages=USER_HI)
    assert msg.content[0].text == "after retry"
    assert len(stack.backend.requests) == 2


def test_refused_connection_retries_then_502(make_stack):
    stack = make_stack("openai", base_url=f"http://127.0.0.1:{free_port()}/v1", retries=2)
    started = time.monotonic()
    code, headers, text = http(stack, "POST", "/v1/messages", VALID)
    elapsed = time.monotonic() - started
    assert_error(code, headers, text, 502, "api_error", "true")
    assert "is it running at http://127.0.0.1:" in text
    assert 0.1 <= elapsed < 2.5  # it backed off between attempts, briefly


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_http_errors_are_not_retried(make_stack, status):
    stack = make_stack("openai", retries=3)
    stack.backend.queue(Reply(status, {"error": {"message": "nope", "type": "server_error"}}))
    code, _, _ = http(stack, "POST", "/v1/messages", VALID)
    assert code >= 429
    assert len(stack.backend.requests) == 1


# --- Reliability: pings and early stream start -------------------------------------------------


def test_pings_while_backend_is_silent(make_stack, provider):
    stack = make_stack(provider, ping_interval=0.05)
    answer = (
        SSE(oai_text_stream("late"), first_delay=0.3)
        if provider == "openai"
        else NDJSON(ollama_text_stream("late"), first_delay=0.3)
    )
    stack.backend.queue(answer)
    code, _, _, events = raw_stream(stack, VALID)
    assert code == 200
    names = [n for _, n, _ in events]
    assert names[0] == "message_start"
    first_content = names.index("content_block_start")
    assert names.count("ping") >= 3
    assert names[1:first_content].count("ping") >= 3  # pings before the first content
    t_start = events[0][0]
    t_content = events[first_content][0]
    assert t_start < 0.2, events[:3]  # the client's stream opened as soon as the backend answered 2xx
    assert t_content >= 0.28
    assert names[-1] == "message_stop"


def test_message_start_before_backend_first_chunk_sdk(make_stack):
    """The SDK sees message_start while the backend has not sent a chunk yet."""
    stack = make_stack("openai", ping_interval=0.05)
    stack.backend.queue(SSE(oai_text_stream("late"), first_delay=0.4))
    started = time.monotonic()
    with stack.client().messages.stream(model="claude-opus-5-5", max_tokens=50, messages=USER_HI) as s:
        first = next(iter(s))
        t_first = time.monotonic() - started
        assert first.type == "message_start"
        rest = [e.type for e in s]
    assert t_first < 0.3
    assert rest[-1] == "message_stop"


# --- Reliability: client disconnect mid-stream -------------------------------------------------


@pytest.mark.parametrize("ping_interval", [10.0, 0.05])
def test_client_disconnect_closes_backend(make_stack, provider, ping_interval):
    stack = make_stack(provider, ping_interval=ping_interval)
    many = [f"w{i} " for i in range(200)]
    stack.backend.queue(
        SSE(oai_text_stream(*many), delay=0.03)
        if provider == "openai"
        else NDJSON(ollama_text_stream(*many), delay=0.03)
    )
    code, _, _, events = raw_stream(stack, VALID, stop=lambda block: "content_block_delta" in block)
    assert code == 200 and events[-1][1] == "content_block_delta"
    hung_up = time.monotonic()
    assert wait_for(lambda: stack.backend.disconnects >= 1, 2.0), "the backend kept streaming to nobody"
    assert time.monotonic() - hung_up < 1.5
    assert_serves(stack, provider)


# --- Reliability: no leaks ---------------------------------------------------------------------


def test_no_task_or_connection_leaks_after_mixed_traffic(make_stack):
    """Many requests mixed with faults: afterwards no extra tasks on the loop, no connection held."""
    stack = make_stack("openai", timeout=0.3)
    backend = stack.app[cp.BACKEND]

    async def drop(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
        request.transport.close()
        return resp

    client = stack.client()
    baseline = stack.loop.run(_task_count())
    for i in range(60):
        kind = i % 5
        if kind == 0:
            stack.backend.queue(SSE(oai_text_stream("a", "b")))
        elif kind == 1:
            stack.backend.queue(Reply(500, {"error": {"message": "boom", "type": "server_error"}}))
        elif kind == 2:
            stack.backend.queue(drop)
        elif kind == 3:
            stack.backend.queue(SSE(oai_text_stream("slow"), first_delay=1.0))  # > timeout: stall
        else:
            stack.backend.queue(SSE(oai_text_stream("c")))
        try:
            if i % 2:
                client.messages.create(model="m", max_tokens=5, messages=USER_HI)
            else:
                with client.messages.stream(model="m", max_tokens=5, messages=USER_HI) as s:
                    s.get_final_message()
        except anthropic.APIError:
            pass
    client.close()
    # left: the loop's own tasks, plus at most the idle keep-alive connection the proxy's pool holds
    assert wait_for(lambda: stack.loop.run(_task_count()) <= baseline, timeout=3), stack.loop.run(_task_names())
    connector = backend.session.connector
    assert wait_for(lambda: not connector._acquired, timeout=3)  # every backend connection released or closed
    assert cp.Metrics is not None and stack.app[cp.METRICS].active_streams == 0


async def _task_names() -> list:
    await asyncio.sleep(0.05)
    return [t.get_coro().__qualname__ for t in asyncio.all_tasks() if not t.done()]


async def _task_count() -> int:
    """Tasks on the loop, not counting idle keep-alive connection handlers (up to two: the SDK's
    connection to the proxy, and the proxy's pooled connection to the backend)."""
    names = await _task_names()
    return len(names) - min(2, names.count("RequestHandler.start"))


# --- Errors: unreachable and silent backends ---------------------------------------------------


def test_backend_unreachable_is_502(make_stack, provider):
    port = free_port()
    base = f"http://127.0.0.1:{port}" + ("/v1" if provider == "openai" else "")
    stack = make_stack(provider, base_url=base, retries=1)
    started = time.monotonic()
    with pytest.raises(anthropic.InternalServerError) as info:
        stack.client().messages.create(model="claude-opus-5-5", max_tokens=50, messages=USER_HI)
    assert time.monotonic() - started < 3
    message = assert_sdk_error(info.value, 502, "api_error")
    assert "unreachable" in message
    assert info.value.response.headers.get("x-should-retry") == "true"
    # streaming: still an HTTP error, nothing was started
    code, headers, text, _ = raw_stream(stack, VALID)
    assert_error(code, headers, text, 502, "api_error", "true")


@pytest.mark.parametrize("stream", [False, True])
def test_backend_timeout_before_first_byte_is_504(make_stack, provider, stream):
    stack = make_stack(provider, timeout=0.3)
    stack.backend.queue(
        Reply(200, oai_completion("late") if provider == "openai" else ollama_chunk("late", done=True), delay=0.8)
    )
    started = time.monotonic()
    if stream:
        code, headers, text, _ = raw_stream(stack, VALID)
    else:
        code, headers, text = http(stack, "POST", "/v1/messages", VALID)
    assert time.monotonic() - started < 0.75
    assert_error(code, headers, text, 504, "api_error", "true")
    assert "--timeout or PROVIDER_TIMEOUT_MS" in text  # the message names the knob
    assert len(stack.backend.requests) == 1  # a timeout is not retried
    assert_serves(stack, provider)


def test_backend_timeout_through_sdk(make_stack):
    stack = make_stack("openai", timeout=0.3)
    stack.backend.queue(Reply(200, oai_completion("late"), delay=0.8))
    with pytest.raises(anthropic.InternalServerError) as info:
        stack.client().messages.create(model="claude-opus-5-5", max_tokens=50, messages=USER_HI)
    assert_sdk_error(info.value, 504, "api_error")
    assert info.value.response.headers.get("x-should-retry") == "true"


def test_count_tokens_logs_at_debug_with_model_and_count(make_stack, caplog):
    """Claude Code sends dozens of count_tokens for one /context: no INFO line each; DEBUG has model and count."""
    stack = make_stack("openai")
    caplog.set_level(logging.DEBUG, logger="claude_proxy")
    count = stack.client().messages.count_tokens(model="claude-opus-5-5", messages=USER_HI).input_tokens
    stack.client().messages.create(model="claude-opus-5-5", max_tokens=5, messages=USER_HI)

    def lines(path: str) -> list:
        return [r for r in caplog.records if getattr(r, "fields", {}).get("path") == path]

    assert wait_for(lambda: lines("/v1/messages"))
    (counted,) = lines("/v1/messages/count_tokens")
    assert counted.levelno == logging.DEBUG and counted.fields["model"] == "claude-opus-5-5"
    assert counted.fields["input_tokens"] == count
    assert lines("/v1/messages")[0].levelno == logging.INFO


# --- A backend refusing an optional field ------------------------------------------------------


def test_optional_field_is_dropped_only_when_the_backend_names_it(make_stack):
    stack = make_stack("openai", send_user_id=True)
    alternate = {
        "object": "error",
        "message": "Conversation roles must alternate user/assistant/user/assistant/...",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    stack.backend.queue(Reply(400, alternate))
    body = req(metadata={"user_id": "u-1"})
    code, headers, text = http(stack, "POST", "/v1/messages", body)
    assert_error(code, headers, text, 400, "invalid_request_error", "false")
    assert len(stack.backend.requests) == 1  # not retried without `user`
    http(stack, "POST", "/v1/messages", body)
    assert stack.backend.requests[1]["user"] == "u-1"  # and not dropped for later requests


def test_user_id_is_not_sent_unless_configured(make_stack):
    """metadata.user_id is Claude Code's device and session id: kept from backends unless asked for."""
    body = req(metadata={"user_id": '{"device_id":"d","session_id":"s"}'})
    stack = make_stack("openai", model_map={"claude-x": {"model": "x", "send_user_id": True}, "claude-y": "y"})
    for model in ("claude-x", "claude-y", "m"):
        assert http(stack, "POST", "/v1/messages", dict(body, model=model))[0] == 200
    assert [r.get("user") for r in stack.backend.requests] == ['{"device_id":"d","session_id":"s"}', None, None]
    on = make_stack("openai", send_user_id=True)
    assert http(on, "POST", "/v1/messages", body)[0] == 200 and on.backend.requests[0]["user"]


# --- Fetching images for Ollama ----------------------------------------------------------------


def test_fetch_images_refuses_private_addresses_and_reads_whole_images(make_stack, monkeypatch):
    stack = make_stack("ollama", fetch_images=True)
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + (2 << 20) * b"\0"  # 2 MiB, larger than one read
    big = web.Application()

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=png, content_type="image/png")

    big.router.add_get("/cat.png", image)
    from conftest import start_site

    runner, port = stack.loop.run(start_site(big))
    try:
        url = f"http://127.0.0.1:{port}/cat.png"
        content = [{"type": "image", "source": {"type": "url", "url": url}}]
        with pytest.raises(anthropic.BadRequestError) as err:
            stack.client().messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": content}])
        assert "not a public address" in err.value.message

        monkeypatch.setattr(cp, "_public_address", lambda address: True)
        stack.client().messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": content}])
        assert base64.b64decode(stack.backend.requests[-1]["messages"][-1]["images"][0]) == png
    finally:
        stack.loop.run(runner.cleanup())


class FakeResolver:
    """Names -> addresses, without the network (the inner resolver of the proxy's PublicResolver)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers, self.asked = answers, []

    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[dict[str, Any]]:
        import socket

        self.asked.append(host)
        return [
            {"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
            for a in self.answers[host]
        ]

    async def close(self) -> None:
        pass


def _image_server(stack, size: int = 2 << 20):
    """An image server on 127.0.0.1 that counts its GETs -> (port, paths asked for, cleanup)."""
    from conftest import start_site

    asked = []

    async def image(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(body=b"\x89PNG" + request.path.encode() + size * b"\0", content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", image)
    runner, port = stack.loop.run(start_site(app))
    return port, asked, lambda: stack.loop.run(runner.cleanup())


def _image_request(stack, *urls, tool_result=()):
    content = [{"type": "image", "source": {"type": "url", "url": url}} for url in urls]
    messages = [{"role": "user", "content": content}]
    if tool_result:
        images = [{"type": "image", "source": {"type": "url", "url": url}} for url in tool_result]
        tool = [{"type": "tool_use", "id": "toolu_1", "name": "look", "input": {}}]
        messages[0]["content"] = content + [{"type": "text", "text": "look"}]
        messages += [
            {"role": "assistant", "content": tool},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": images}]},
        ]
    return stack.client().messages.create(model="m", max_tokens=5, messages=messages)


def test_fetch_images_connects_only_to_the_address_it_checked(make_stack, monkeypatch):
    """DNS rebinding: the name is looked up once, by the resolver that refuses private addresses, and the
    connection goes to what it answered; the error does not say which address a name has."""
    stack = make_stack("ollama", fetch_images=True)
    port, asked, cleanup = _image_server(stack)
    fake = FakeResolver(
        {
            "rebind.test": ["127.0.0.1"],
            "metadata.test": ["169.254.169.254"],
            "mixed.test": ["93.184.216.34", "127.0.0.1"],
            "images.test": ["127.0.0.1"],
        }
    )
    stack.app[cp.BACKEND].image_resolver.inner = fake
    try:
        for host in (
            "rebind.test",
            "metadata.test",
            "mixed.test",
            "[::ffff:127.0.0.1]",
            "[::1]",
            "127.1",
            "2130706433",
        ):
            with pytest.raises(anthropic.BadRequestError) as err:
                _image_request(stack, f"http://{host}:{port}/cat.png")
            assert "not a public address" in err.value.message, host
            if host.endswith(".test"):  # the URL is quoted, never the address a name has
                assert "127.0.0.1" not in err.value.message and "169.254" not in err.value.message
        assert asked == [] and fake.asked == ["rebind.test", "metadata.test", "mixed.test"]
        # allowed, the same name connects to the address its one lookup gave (nothing else knows it)
        monkeypatch.setattr(cp, "_public_address", lambda address: address == "127.0.0.1")
        _image_request(stack, f"http://images.test:{port}/cat.png")
        assert asked == ["/cat.png"] and fake.asked[-1] == "images.test"
    finally:
        cleanup()


@pytest.mark.parametrize(
    "address, public",
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b:1::7f00:1", False),  # local-use NAT64 of 127.0.0.1
        ("::ffff:0:127.0.0.1", False),  # SIIT
        ("::127.0.0.1", False),  # IPv4-compatible
        ("64:ff9b::808:808", True),  # NAT64 of a public address
        ("2002:a9fe:a9fe::", False),  # 6to4 of 169.254.169.254
        ("127.1", False),
        ("not an address", False),
    ],
)
def test_public_address(address, public):
    assert cp._public_address(address) is public


def test_fetch_images_fetches_each_url_once_and_caps_the_request_total(make_stack, monkeypatch):
    stack = make_stack("ollama", fetch_images=True)
    port, asked, cleanup = _image_server(stack)
    monkeypatch.setattr(cp, "_public_address", lambda address: True)
    monkeypatch.setattr(cp, "MAX_IMAGE_BYTES_PER_REQUEST", 5 << 20)
    a, b, c = (f"http://127.0.0.1:{port}/{name}.png" for name in "abc")
    try:
        _image_request(stack, a, a, tool_result=[a])
        assert asked == ["/a.png"]  # one GET for the same URL three times
        sent = stack.backend.requests[-1]["messages"]
        images = [image for message in sent for image in message.get("images", [])]
        assert len(images) == 3 and len(set(images)) == 1 and base64.b64decode(images[0]).startswith(b"\x89PNG/a")
        _image_request(stack, a, b)  # 4 MiB in all: under the cap
        with pytest.raises(anthropic.BadRequestError) as err:
            _image_request(stack, a, b, a, c)  # 6 MiB
        assert "more than 5 MiB in all" in err.value.message and "/c.png" in err.value.message
        assert asked == ["/a.png", "/a.png", "/b.png", "/a.png", "/b.png", "/c.png"]
    finally:
        cleanup()


# --- Stream framing: sans-I/O decoders, split anywhere ----------------------------------------------


def _feed_all(frames, pieces):
    out = []
    for piece in pieces:
        out += frames.feed(piece)
    return out + frames.flush()


@pytest.mark.parametrize("cut", range(1, 40))
def test_sse_frames_split_anywhere_crlf_comments_and_done(cut):
    wire = (
        b': ping\r\n\r\nevent: chunk\r\ndata: {"a":1}\r\n\r\nid: 7\ndata:{"b":2}\n\ndata: [DONE]\n\ndata: {"late":1}\n'
    )
    frames = cp.SSEFrames()
    assert _feed_all(frames, [wire[:cut], wire[cut:]]) == [b'{"a":1}', b'{"b":2}'] and frames.done


@pytest.mark.parametrize(
    "tail, payloads",
    [
        (b": keep-alive", []),  # a comment without its newline at the very end
        (b'data: {"c":3}', [b'{"c":3}']),  # a last data line without its newline
        (b"data: [DONE]", []),
        (b"event: ping", []),
    ],
)
def test_sse_frames_tail_without_newline(tail, payloads):
    frames = cp.SSEFrames()
    assert frames.feed(b'data: {"a":1}\n\n' + tail) == [b'{"a":1}']
    assert frames.flush() == payloads


def test_line_frames_ndjson_blank_lines_tail_and_cap(monkeypatch):
    frames = cp.LineFrames()
    assert frames.feed(b'{"a":1}\n\n{"b"') == [b'{"a":1}'] and frames.feed(b":2}\r\n") == [b'{"b":2}\r']
    assert frames.feed(b'{"c":3}') == [] and frames.flush() == [b'{"c":3}'] and not frames.done
    monkeypatch.setattr(cp, "MAX_LINE_BYTES", 16)
    with pytest.raises(cp.ApiError) as err:
        cp.LineFrames().feed(b"x" * 17)
    assert err.value.status == 502 and err.value.kind == "oversized"


def test_whole_body_frames_is_one_payload_and_done():
    frames = cp.WholeBody()
    assert frames.feed(b'{"choices": ') == [] and frames.feed(b"[]}") == []
    assert frames.flush() == [b'{"choices": []}'] and frames.done


def test_framing_is_chosen_by_content_type_then_provider():
    openai, ollama = cp.PROVIDER_IMPLS["openai"], cp.PROVIDER_IMPLS["ollama"]
    assert isinstance(cp.frames_for("application/json", openai), cp.WholeBody)
    assert type(cp.frames_for("text/event-stream", openai)) is cp.SSEFrames
    assert type(cp.frames_for("application/x-ndjson", ollama)) is cp.LineFrames


def test_sse_answer_ending_in_a_comment_without_newline_is_not_a_502(make_stack):
    """Regression: a complete answer whose last line is `: keep-alive` with no newline was 'malformed JSON'."""
    stack = make_stack("openai")
    stack.backend.queue(SSE(oai_text_stream("fine") + [b": keep-alive"], done=False))
    msg = stack.client().messages.create(model="m", max_tokens=10, messages=USER_HI)
    assert msg.content[0].text == "fine" and msg.stop_reason == "end_turn"


# --- Context windows: model names, each model's window, overflow, usage scaling ---------------------

VLLM_MODELS = {  # vLLM 0.11 GET /v1/models
    "object": "list",
    "data": [
        {
            "id": "Qwen/Qwen3-8B",
            "object": "model",
            "created": 1764230400,
            "owned_by": "vllm",
            "root": "Qwen/Qwen3-8B",
            "parent": None,
            "max_model_len": 40960,
            "permission": [{"id": "modelperm-1", "object": "model_permission", "allow_sampling": True}],
        },
        {
            "id": "Qwen/Qwen3-0.6B",
            "object": "model",
            "created": 1764230400,
            "owned_by": "vllm",
            "root": "Qwen/Qwen3-0.6B",
            "parent": None,
            "max_model_len": 8192,
            "permission": [],
        },
    ],
}
LLAMACPP_MODELS = {  # llama-server (--ctx-size 8192 --parallel 2), as the real one in shared/real_llama answers
    "models": [{"name": "tiny", "model": "tiny", "type": "model", "capabilities": ["completion"]}],
    "object": "list",
    "data": [
        {
            "id": "tiny",
            "aliases": ["tiny"],
            "tags": [],
            "object": "model",
            "created": 1796157067,
            "owned_by": "llamacpp",
            "meta": {"vocab_type": 2, "n_vocab": 151936, "n_ctx": 16384, "n_ctx_train": 32768, "n_embd": 128},
        }
    ],
}
LLAMACPP_PROPS = {
    "default_generation_settings": {"id": 0, "n_ctx": 8192, "speculative": False, "is_processing": False},
    "total_slots": 2,
    "model_alias": "tiny",
    "model_path": "/models/tiny.gguf",
    "build_info": "b7100-1a2b3c4",
}
LMSTUDIO_MODELS = {"data": [{"id": "qwen/qwen3-coder-30b", "object": "model", "owned_by": "organization_owner"}]}
LMSTUDIO_V0 = {  # LM Studio 0.3 GET /api/v0/models
    "object": "list",
    "data": [
        {
            "id": "qwen/qwen3-coder-30b",
            "object": "model",
            "type": "llm",
            "publisher": "qwen",
            "arch": "qwen3moe",
            "compatibility_type": "gguf",
            "quantization": "Q4_K_M",
            "state": "loaded",
            "max_context_length": 262144,
            "loaded_context_length": 4096,
        }
    ],
}
OLLAMA_TAGS = {
    "models": [
        {"name": "qwen3-coder:30b", "model": "qwen3-coder:30b", "size": 18556700761, "digest": "06c1097efce0"},
        {"name": "qwen3:4b", "model": "qwen3:4b", "size": 2497293918, "digest": "359d7dd4bcda"},
    ]
}


def ollama_show(trained: int) -> dict:
    """Ollama 0.12 POST /api/show (shortened: no license, modelfile or tensors)."""
    return {
        "parameters": 'temperature 0.7\ntop_k 20\nstop "<|im_end|>"',
        "template": "{{- range .Messages }}…",
        "details": {"format": "gguf", "family": "qwen3", "parameter_size": "4.0B", "quantization_level": "Q4_K_M"},
        "model_info": {
            "general.architecture": "qwen3",
            "general.parameter_count": 4022468096,
            "qwen3.attention.head_count": 32,
            "qwen3.context_length": trained,
            "qwen3.embedding_length": 2560,
        },
        "capabilities": ["completion", "tools", "thinking"],
        "modified_at": "2026-11-20T10:00:00.000000000Z",
    }


class ServerBytes:
    """A fake backend made of the given answers per path (what one real server sends), recording requests."""

    def __init__(self, pages: dict[str, Any]) -> None:
        self.pages = pages  # "GET /v1/models" -> JSON, or a callable (body) -> web.Response
        self.requests: list[tuple[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        key = f"{request.method} {request.path}"
        self.requests.append((key, body))
        page = self.pages.get(key)
        if page is None:
            return web.Response(status=404, text="Not Found")
        if callable(page):
            return await page(request, body)
        return web.json_response(page)

    def sent(self, key: str) -> list[Any]:
        return [body for k, body in self.requests if k == key]


async def _default_chat(request: web.Request, body: dict) -> web.StreamResponse:
    ollama = request.path == "/api/chat"
    resp = web.StreamResponse(headers={"content-type": "application/x-ndjson" if ollama else "text/event-stream"})
    await resp.prepare(request)
    if ollama:
        for obj in ollama_text_stream("Hello", prompt=1000, completion=5):
            await resp.write(ndjson_bytes(obj))
    else:
        for chunk in oai_text_stream("Hello", usage=oai_usage(1000, 5)):
            await resp.write(sse_bytes(chunk))
        await resp.write(sse_bytes("[DONE]"))
    return resp


@pytest.fixture
def window_stack(make_stack):
    """window_stack(pages, provider, **config) -> (fake server, proxy Stack); the proxy starts after the server,
    so its start-up discovery reads the server's pages."""

    def make(pages: dict[str, Any], provider: str = "openai", **overrides: Any):
        server = ServerBytes({"POST /v1/chat/completions": _default_chat, "POST /api/chat": _default_chat, **pages})
        return server, make_stack(provider, backend=server, **{"default_model": None, **overrides})

    return make


def chat_key(provider: str) -> str:
    return "POST /v1/chat/completions" if provider == "openai" else "POST /api/chat"


def listing(provider: str) -> dict[str, Any]:
    """Two backend models, listed the provider's way."""
    if provider == "openai":
        return {"GET /v1/models": VLLM_MODELS}
    return {"GET /api/tags": OLLAMA_TAGS, "POST /api/show": ollama_show_handler({"qwen3:4b": 40960})}


def ollama_show_handler(trained: dict[str, int]) -> Any:
    async def show(request: web.Request, body: dict) -> web.Response:
        if body.get("model") not in trained:
            return web.json_response({"error": f"model '{body.get('model')}' not found"}, status=404)
        return web.json_response(ollama_show(trained[body["model"]]))

    return show


@pytest.mark.parametrize("default_model", [None, "qwen3-coder:30b"])
def test_backend_model_asked_by_its_own_name(window_stack, provider, default_model):
    """Zero config or not, a name the backend lists is sent as is; a Claude name still gets the pick."""
    first, second = ("Qwen/Qwen3-8B", "Qwen/Qwen3-0.6B") if provider == "openai" else ("qwen3-coder:30b", "qwen3:4b")
    server, stack = window_stack(listing(provider), provider, default_model=default_model)
    client = stack.client()
    msg = client.messages.create(model=second, max_tokens=20, messages=USER_HI)
    assert msg.model == second
    client.messages.create(model="claude-opus-5-5", max_tokens=20, messages=USER_HI)
    sent = server.sent(chat_key(provider))
    assert [b["model"] for b in sent] == [second, default_model or first]


def test_map_target_asked_by_name_keeps_its_entry(window_stack, provider):
    """A backend model the map names answers by its own name with that entry's settings (its cap, its window)."""
    model_map = {"claude-*": "qwen3:4b", "claude-haiku-5-5": {"model": "tiny-coder", "max_tokens": 64}}
    server, stack = window_stack(listing(provider), provider, model_map=model_map)
    stack.client().messages.create(model="tiny-coder", max_tokens=1000, messages=USER_HI)
    sent = server.sent(chat_key(provider))[0]
    assert sent["model"] == "tiny-coder"
    assert (sent["options"]["num_predict"] if provider == "ollama" else sent["max_tokens"]) == 64


def test_models_endpoint_lists_backend_models_with_windows(window_stack, provider):
    server, stack = window_stack(listing(provider), provider)
    models = {m.id: m for m in stack.client().models.list(limit=100)}
    if provider == "openai":
        assert models["Qwen/Qwen3-8B"].max_input_tokens == 40960
        assert models["Qwen/Qwen3-0.6B"].max_input_tokens == 8192
        assert stack.client().models.retrieve("Qwen/Qwen3-0.6B").max_input_tokens == 8192
    else:  # the num_ctx the proxy sends, capped by the trained length
        assert models["qwen3-coder:30b"].max_input_tokens == 32768
        assert models["qwen3:4b"].max_input_tokens == 32768


@pytest.mark.parametrize(
    "pages, model, window",
    [
        ({"GET /v1/models": VLLM_MODELS}, "Qwen/Qwen3-0.6B", 8192),
        ({"GET /v1/models": LLAMACPP_MODELS, "GET /props": LLAMACPP_PROPS}, "tiny", 8192),  # a slot's n_ctx
        ({"GET /v1/models": LLAMACPP_MODELS}, "tiny", 16384),  # without /props: meta.n_ctx
        ({"GET /v1/models": LMSTUDIO_MODELS, "GET /api/v0/models": LMSTUDIO_V0}, "qwen/qwen3-coder-30b", 4096),
    ],
    ids=["vllm", "llamacpp-props", "llamacpp-meta", "lmstudio"],
)
def test_openai_server_windows(window_stack, caplog, pages, model, window):
    with caplog.at_level(logging.INFO):
        server, stack = window_stack(pages, "openai")
    assert f"{model} {window} (" in caplog.text  # logged at start
    assert stack.client().models.retrieve(model).max_input_tokens == window
    # over the window: answered before the backend, in the words Claude Code compacts on
    words = "lorem ipsum dolor sit amet " * int(window * 0.3)
    with pytest.raises(anthropic.BadRequestError) as info:
        stack.client().messages.create(model=model, max_tokens=20, messages=[{"role": "user", "content": words}])
    message = assert_sdk_error(info.value, 400, "invalid_request_error")
    found = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", message)
    assert found and int(found.group(2)) == window and int(found.group(1)) > window
    assert server.sent("POST /v1/chat/completions") == []
    # a request that fits goes through
    stack.client().messages.create(model=model, max_tokens=20, messages=USER_HI)
    assert len(server.sent("POST /v1/chat/completions")) == 1


def test_unknown_window_stays_unknown(window_stack):
    server, stack = window_stack({"GET /v1/models": LMSTUDIO_MODELS}, "openai")  # no /api/v0: nothing states it
    assert stack.client().models.retrieve("qwen/qwen3-coder-30b").max_input_tokens is None
    words = "lorem ipsum " * 100_000
    stack.client().messages.create(
        model="qwen/qwen3-coder-30b", max_tokens=20, messages=[{"role": "user", "content": words}]
    )
    assert len(server.sent("POST /v1/chat/completions")) == 1  # the backend decides


@pytest.mark.parametrize(
    "model_map, context_window, trained, num_ctx",
    [
        ({}, None, 40960, 32768),  # the default
        ({}, None, 8192, 8192),  # never above the trained length
        ({"qwen3:4b": {"model": "qwen3:4b", "context_window": 65536}}, None, 131072, 65536),  # the map
        ({"qwen3:4b": {"model": "qwen3:4b", "context_window": 65536}}, None, 40960, 40960),
        ({}, 49152, 131072, 49152),  # --context-window
        ({}, None, None, 32768),  # /api/show without a context length
    ],
)
def test_ollama_always_sends_num_ctx(window_stack, caplog, model_map, context_window, trained, num_ctx):
    pages = {
        "GET /api/tags": OLLAMA_TAGS,
        "POST /api/show": ollama_show_handler({"qwen3:4b": trained} if trained else {}),
    }
    with caplog.at_level(logging.INFO):
        server, stack = window_stack(pages, "ollama", model_map=model_map, context_window=context_window)
    assert f"qwen3:4b {num_ctx} (num_ctx sent" in caplog.text and "--context-window" in caplog.text
    for model in ("qwen3:4b", "claude-opus-5-5"):
        stack.client().messages.create(model=model, max_tokens=20, messages=USER_HI)
    first, second = server.sent("POST /api/chat")
    assert first["options"]["num_ctx"] == num_ctx and first["truncate"] is False
    assert second["model"] == "qwen3-coder:30b" and second["options"]["num_ctx"] == (context_window or 32768)
    assert stack.client().models.retrieve("qwen3:4b").max_input_tokens == num_ctx


def test_ollama_num_ctx_without_a_map_route_unit():
    req = cp.parse_request(VALID)
    body = cp.ollama_request(cp.build_conversation(req), req, cp.Route("m", "ollama", "http://h"))
    assert body["options"]["num_ctx"] == cp.DEFAULT_NUM_CTX == 32768 and body["truncate"] is False


def ollama_error(status: int, text: str) -> Any:
    async def answer(request: web.Request, body: dict) -> web.Response:
        return web.json_response({"error": text}, status=status)

    return answer


@pytest.mark.parametrize(
    "status, text, expect",
    [
        (400, "the input length exceeds the context length", None),
        (500, "the input length exceeds the context length", None),
        (400, "prompt too long; exceeded max context length by 4021 tokens", (32768 + 4021, 32768)),
    ],
)
def test_ollama_overflow_becomes_prompt_is_too_long(window_stack, status, text, expect):
    pages = {"GET /api/tags": OLLAMA_TAGS, "POST /api/chat": ollama_error(status, text)}
    server, stack = window_stack(pages, "ollama")
    words = "lorem ipsum dolor sit amet " * 5000  # ~25k tokens by the estimate: under the window, sent
    with pytest.raises(anthropic.BadRequestError) as info:
        stack.client().messages.create(model="qwen3:4b", max_tokens=20, messages=[{"role": "user", "content": words}])
    message = assert_sdk_error(info.value, 400, "invalid_request_error")
    found = re.fullmatch(r"prompt is too long: (\d+) tokens > (\d+) maximum", message)
    assert found, message
    prompt, window = int(found.group(1)), int(found.group(2))
    assert window == 32768 and prompt > window
    if expect:
        assert (prompt, window) == expect
    assert info.value.response.headers.get("x-should-retry") == "false"
    assert len(server.sent("POST /api/chat")) == 1  # the backend measured it


@pytest.mark.parametrize(
    "status, message, expect",
    [
        (
            400,
            "Trying to keep the first 9000 tokens when context the overflows. However, the model is loaded with "
            "context length of only 8192 tokens, which is not enough. Try to load the model with a larger context "
            "length, or provide a shorter input",
            "prompt is too long: 9000 tokens > 8192 maximum",
        ),
        (
            400,
            "The input (516368 tokens) is longer than the model's context length (262144 tokens).",
            "prompt is too long: 516368 tokens > 262144 maximum",
        ),
        (
            400,
            "Prompt contains 240000 tokens and 0 draft tokens, too large for model with 128000 maximum context length",
            "prompt is too long: 240000 tokens > 128000 maximum",
        ),
        (400, "the input length exceeds the context length", "prompt is too long: 40000 tokens > 32768 maximum"),
        (500, "the input length exceeds the context length", "prompt is too long: 40000 tokens > 32768 maximum"),
        (
            400,
            "prompt too long; exceeded max context length by 100 tokens",
            "prompt is too long: 32868 tokens > 32768 maximum",
        ),
        (
            400,
            "request (9009 tokens) exceeds the available context size (8192 tokens), try increasing it "
            "(n_prompt_tokens=9009, n_ctx=8192)",
            "prompt is too long: 9009 tokens > 8192 maximum",
        ),
    ],
)
def test_overflow_wordings_unit(status, message, expect):
    error = cp.map_backend_error(status, message, None, 40000, 32768)
    assert (error.status, error.message, error.retry) == (400, expect, False)


def test_overflow_without_numbers_or_window_unit():
    error = cp.map_backend_error(400, "the input length exceeds the context length")
    assert error.status == 400 and error.message.startswith("prompt is too long")
    # an estimate under the window still says "over": the backend measured it
    error = cp.map_backend_error(400, "the input length exceeds the context length", None, 20000, 32768)
    assert error.message == "prompt is too long: 32769 tokens > 32768 maximum"
    # a completion that does not fit is not a prompt overflow
    vllm = "This model's maximum context length is 32768 tokens. However, you requested 40000 tokens (30000 in the "
    vllm += "messages, 10000 in the completion). Please reduce the length of the messages or completion."
    assert not cp.map_backend_error(400, vllm).message.startswith("prompt is too long")


@pytest.mark.parametrize(
    "model, believed", [("claude-opus-5-5", 1_000_000), ("claude-haiku-4-5-20251001", 200_000), ("qwen3:4b", 1_000_000)]
)
def test_client_believed_window_unit(model, believed):
    """As Claude Code 2.1.332's /context shows them (see README)."""
    assert cp.client_believed_window(model) == believed


def test_usage_scale_unit():
    # `run` tells Claude Code max(window, 132k): the factor is then that / window, /context shows the true fraction
    assert cp.usage_scale(132_000, 32_768) == pytest.approx(132_000 / 32_768)
    assert cp.usage_scale(200_000, 200_000) == 1.0
    # without `run`: Claude Code compacts 33k before 1M; the proxy makes that happen at 75% of a 32k window
    assert cp.usage_scale(1_000_000, 32_768) * 32_768 * 0.75 == pytest.approx(1_000_000 - 33_000)


def test_usage_scale_reads_small_client_windows_as_claude_code_does_unit():
    """Claude Code reads a compaction window under 100k as 100k: scaling to the smaller number would make it
    compact far too late (a 64k window told for a 32k model gave 1.26 instead of 2.7)."""
    assert cp.usage_scale(64_000, 32_768) == cp.usage_scale(100_000, 32_768) > 2.5
    assert cp.usage_scale(20_000, 8_192) == cp.usage_scale(100_000, 8_192)


def test_map_context_window_is_checked_like_the_flag():
    with pytest.raises(cp.ConfigError, match="too small"):
        cp.Config(provider="openai", model_map={"claude-x": {"model": "m", "context_window": 100}})


@pytest.mark.parametrize("client_window", [132_000, None])
def test_usage_scaled_to_the_window_claude_code_uses(window_stack, provider, client_window):
    """With `run` (client_window) or --scale-usage, usage and count_tokens are scaled so that Claude Code's own
    compaction point (its window - 33k) falls where the backend model's window is 75% full."""
    server, stack = window_stack(listing(provider), provider, client_window=client_window, scale_usage=True)
    model = "Qwen/Qwen3-0.6B" if provider == "openai" else "qwen3:4b"
    window = 8192 if provider == "openai" else 32768
    client = stack.client()
    msg = client.messages.create(model=model, max_tokens=20, messages=USER_HI)
    scale = cp.usage_scale(client_window or 1_000_000, window)
    assert msg.usage.input_tokens == round(1000 * scale) and msg.usage.output_tokens == 5
    raw = cp.count_request_tokens(cp.parse_request({**VALID, "model": model}))
    counted = client.messages.count_tokens(model=model, messages=USER_HI).input_tokens
    assert counted == round(raw * scale)


def test_usage_not_scaled_by_default(window_stack):
    server, stack = window_stack(listing("openai"), "openai")
    msg = stack.client().messages.create(model="Qwen/Qwen3-0.6B", max_tokens=20, messages=USER_HI)
    assert msg.usage.input_tokens == 1000


def llamacpp_tokenizer_pages() -> dict[str, Any]:
    """llama-server --jinja with a Qwen template: /apply-template renders tools into the system turn, as the
    real one does (see shared/real_llama); /tokenize counts words."""

    async def apply_template(request: web.Request, body: dict) -> web.Response:
        system, turns = "", []
        for m in body["messages"]:
            if m["role"] == "system":
                system = m["content"]
            else:
                turns.append(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n")
        if body.get("tools"):
            system += "\n\n# Tools\n\n<tools>\n" + "\n".join(json.dumps(t) for t in body["tools"]) + "\n</tools>"
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return web.json_response({"prompt": head + "".join(turns) + "<|im_start|>assistant\n"})

    async def tokenize(request: web.Request, body: dict) -> web.Response:
        if "content" not in body:
            return web.json_response({"error": {"code": 500, "message": '"content" must be provided'}}, status=500)
        return web.json_response({"tokens": list(range(len(body["content"].split())))})

    return {
        "GET /v1/models": LLAMACPP_MODELS,
        "GET /props": LLAMACPP_PROPS,
        "POST /apply-template": apply_template,
        "POST /tokenize": tokenize,
    }


def test_count_tokens_backend_sends_tools_and_system_to_llamacpp(window_stack):
    server, stack = window_stack(llamacpp_tokenizer_pages(), "openai", count_tokens="backend")
    tool = {
        "name": "get_weather",
        "description": "Weather for a city, in words of several kinds and lengths",
        "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}},
    }
    client = stack.client()
    bare = client.messages.count_tokens(model="tiny", messages=USER_HI).input_tokens
    with_system = client.messages.count_tokens(model="tiny", system="be brief and kind", messages=USER_HI)
    with_tools = client.messages.count_tokens(model="tiny", system="be brief and kind", messages=USER_HI, tools=[tool])
    assert bare < with_system.input_tokens < with_tools.input_tokens
    sent = server.sent("POST /apply-template")[-1]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["messages"][0] == {"role": "system", "content": "be brief and kind"}


def test_client_window_option_without_run(window_stack):
    """Claude Code started by hand with CLAUDE_CODE_AUTO_COMPACT_WINDOW=132000, the proxy with --client-window."""
    config = cp.load_config(["--client-window", "132k"], environ={}, dotenv_path="")
    assert config.client_window == 132000
    server, stack = window_stack(listing("openai"), "openai", client_window=config.client_window)
    msg = stack.client().messages.create(model="Qwen/Qwen3-0.6B", max_tokens=20, messages=USER_HI)
    assert msg.usage.input_tokens == round(1000 * 132_000 / 8192)
    env, told = cp.claude_environment(config, "http://x", "m", 8192, {})
    assert told == 132000 and env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "132000"


def test_resolve_route_order_unit():
    config = cp.Config(
        provider="ollama",
        default_model="fallback",
        model_map={"qwen3:4b": "mapped-by-key", "claude-*": "glob-target", "x": {"model": "tiny", "max_tokens": 9}},
    )
    listed = ["qwen3:4b", "qwen3-coder:30b", "claude-listed"]
    route = lambda name: cp.resolve_route(config, name, {"*": "pick"}, listed)  # noqa: E731
    assert route("qwen3:4b").model == "mapped-by-key"  # an exact key first
    assert route("tiny").max_tokens == 9  # a map target by its own name keeps its entry
    assert route("qwen3-coder:30b").model == "qwen3-coder:30b"  # a listed name as is, before the default
    assert route("claude-listed").model == "claude-listed"  # ... and before a pattern
    assert route("claude-opus-5-5").model == "glob-target"
    assert route("other").model == "fallback"


def test_overflow_inside_a_stream_is_prompt_too_long(make_stack):
    """An Ollama that answers 200 and then its overflow as the stream's first line: still the error Claude Code
    compacts on (for a non-streaming client, the HTTP 400)."""
    stack = make_stack("ollama")
    stack.backend.queue(NDJSON([{"error": "the input length exceeds the context length"}]))
    with pytest.raises(anthropic.BadRequestError) as info:
        stack.client().messages.create(model="m", max_tokens=20, messages=USER_HI)
    assert assert_sdk_error(info.value, 400, "invalid_request_error").startswith("prompt is too long")


# ======================================================================================
# 9. HTTP APP
# ======================================================================================


# --- Routes, probes, body limits ---------------------------------------------------------------


def test_unknown_path_is_404_json(make_stack):
    stack = make_stack("openai")
    for method, path in [("GET", "/nope"), ("POST", "/v1/complete"), ("GET", "/v1/messages/batches")]:
        code, headers, text = http(stack, method, path, {} if method == "POST" else None)
        assert_error(code, headers, text, 404, "not_found_error")


def test_get_messages_is_405_json(make_stack):
    stack = make_stack("openai")
    code, headers, text = http(stack, "GET", "/v1/messages")
    message = assert_error(code, headers, text, 405, "invalid_request_error")
    assert "GET" in message


@pytest.mark.parametrize("path", ["/", "/api/hello"])
def test_head_probe_is_200(make_stack, path):
    stack = make_stack("openai")
    code, headers, text = http(stack, "HEAD", path)
    assert code == 200 and text == ""


def test_health(make_stack):
    stack = make_stack("openai")
    code, headers, text = http(stack, "GET", "/health")
    assert code == 200 and json.loads(text) == {"status": "ok"}
    assert headers.get("request-id")


MODEL_MAP = {
    "claude-opus-5-5": "big-model",
    "claude-*haiku*": "small-model",
    "claude-sonnet-5-5": {"model": "mid-model", "max_tokens": 4096},
}


def test_models_list(make_stack):
    stack = make_stack("openai", model_map=MODEL_MAP, default_model="backend-model", discover=False)
    code, headers, text = http(stack, "GET", "/v1/models")
    assert code == 200
    page = json.loads(text)
    ids = ["claude-opus-5-5", "claude-sonnet-5-5", "backend-model", "big-model", "small-model", "mid-model"]
    assert [m["id"] for m in page["data"]] == ids  # backend models by their own names too
    assert page["has_more"] is False
    assert page["first_id"] == "claude-opus-5-5" and page["last_id"] == "mid-model"
    for model in page["data"]:
        assert model["type"] == "model" and model["display_name"] and model["created_at"]
    sdk_ids = [m.id for m in stack.client().models.list()]
    assert sdk_ids == ids
    code, _, text = http(stack, "GET", "/v1/models?limit=1")
    page = json.loads(text)
    assert [m["id"] for m in page["data"]] == ["claude-opus-5-5"] and page["has_more"] is True


def test_model_get_and_404(make_stack):
    stack = make_stack("openai", model_map=MODEL_MAP, default_model="backend-model", discover=False)
    model = stack.client().models.retrieve("claude-sonnet-5-5")
    assert model.id == "claude-sonnet-5-5" and model.type == "model"
    with pytest.raises(anthropic.NotFoundError) as info:
        stack.client().models.retrieve("claude-nope-1")
    assert_sdk_error(info.value, 404, "not_found_error")


def test_beta_query_string(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "beta"))
    code, _, text = http(
        stack,
        "POST",
        "/v1/messages?beta=true",
        VALID,
        headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
    )
    assert code == 200 and json.loads(text)["content"][0]["text"] == "beta"
    stack.backend.queue(text_answer(provider, "beta2"))
    msg = stack.client().beta.messages.create(model="claude-opus-5-5", max_tokens=20, messages=USER_HI)
    assert msg.content[0].text == "beta2"


def test_body_over_limit_is_413(make_stack):
    stack = make_stack("openai", max_body_bytes=2048)
    body = req(messages=[{"role": "user", "content": "x" * 4000}])
    code, headers, text = http(stack, "POST", "/v1/messages", body)
    assert_error(code, headers, text, 413, "request_too_large")
    assert stack.backend.requests == []
    with pytest.raises(anthropic.APIStatusError) as info:
        stack.client().messages.create(**body)
    assert_sdk_error(info.value, 413, "request_too_large")
    stack.backend.queue(text_answer("openai", "small"))
    code, _, text = http(stack, "POST", "/v1/messages", VALID)
    assert code == 200


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_400(make_stack, ctype):
    stack = make_stack("openai")
    code, headers, text = http(stack, "POST", "/v1/messages", VALID, headers={"content-type": ctype})
    assert "content-type" in assert_error(code, headers, text, 400, "invalid_request_error")


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("OPTIONS", "/v1/messages", 405),
        ("GET", "/../../etc/passwd", 404),
        ("GET", "/v1/../health", 404),
        ("PUT", "/v1/messages", 405),
        ("DELETE", "/health", 405),
        ("GET", "/v1/messages/count_tokens", 405),
    ],
)
def test_odd_methods_and_paths(make_stack, method, path, status):
    stack = make_stack("openai")
    req = urllib.request.Request(stack.proxy_url + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            code, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        code, text = err.code, err.read().decode()
    assert code == status
    if status >= 400:
        assert json.loads(text)["type"] == "error"


def test_header_injection_in_model_name_and_request_id(make_stack):
    stack = make_stack("openai")
    body = json.dumps({"model": "m\r\nX-Evil: 1", "max_tokens": 5, "messages": USER_HI}).encode()
    req = urllib.request.Request(
        stack.proxy_url + "/v1/messages",
        data=body,
        method="POST",
        headers={"content-type": "application/json", "x-request-id": "abc\tdef"},
    )
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("expected a 400")
    except urllib.error.HTTPError as err:
        assert err.code == 400 and "X-Evil" not in err.headers and err.headers["request-id"].startswith("req_")
        assert "model" in json.loads(err.read())["error"]["message"]


def test_model_ids_with_slashes_and_backward_paging(make_stack):
    stack = make_stack(
        "openai",
        default_model="Qwen/Qwen3-8B",
        discover=False,
        model_map={"claude-a": "x", "claude-b": "y", "claude-c": "z"},
    )
    code, _, text = http(stack, "GET", "/v1/models/Qwen/Qwen3-8B")
    assert code == 200 and json.loads(text)["id"] == "Qwen/Qwen3-8B"
    code, _, text = http(stack, "GET", "/v1/models?before_id=claude-c&limit=1")
    page = json.loads(text)
    assert [m["id"] for m in page["data"]] == ["claude-b"] and page["has_more"] is True
    code, _, text = http(stack, "GET", "/v1/models?before_id=claude-b&limit=5")
    page = json.loads(text)
    assert [m["id"] for m in page["data"]] == ["claude-a"] and page["has_more"] is False


# --- Security: inbound auth and what reaches the backend ---------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-api-key": "wrong"},
        {"authorization": "Bearer wrong"},
        {"x-api-key": "s3cret-but-longer"},
        {"authorization": "s3cret"},
    ],
    ids=["none", "wrong-key", "wrong-bearer", "prefix", "no-bearer-scheme"],
)
def test_auth_rejects(make_stack, headers):
    stack = make_stack("openai", auth_token="s3cret")
    code, hdrs, text = http(stack, "POST", "/v1/messages", VALID, headers=headers)
    assert_error(code, hdrs, text, 401, "authentication_error", "false")
    assert stack.backend.requests == []
    code, hdrs, text = http(stack, "GET", "/v1/models", headers=headers)
    assert_error(code, hdrs, text, 401, "authentication_error")


def test_auth_sdk_wrong_key(make_stack):
    stack = make_stack("openai", auth_token="s3cret")
    with pytest.raises(anthropic.AuthenticationError) as info:
        stack.client(api_key="wrong").messages.create(**VALID)
    assert_sdk_error(info.value, 401, "authentication_error")


@pytest.mark.parametrize("how", ["x-api-key", "bearer"])
def test_auth_accepts_and_key_is_not_forwarded(make_stack, how):
    stack = make_stack("openai", auth_token="s3cret", api_key="sk-backend-123")
    stack.backend.queue(text_answer("openai", "ok"))
    client = stack.client(api_key="s3cret") if how == "x-api-key" else stack.client(api_key=None, auth_token="s3cret")
    msg = client.messages.create(**VALID)
    assert msg.content[0].text == "ok"
    sent = {k.lower(): v for k, v in stack.backend.headers[0].items()}
    assert "x-api-key" not in sent
    assert sent.get("authorization") == "Bearer sk-backend-123"
    assert "s3cret" not in json.dumps(sent)


def test_client_key_not_forwarded_without_backend_key(make_stack, provider):
    stack = make_stack(provider)
    stack.backend.queue(text_answer(provider, "ok"))
    stack.client(api_key="sk-ant-client-secret").messages.create(**VALID)
    sent = {k.lower(): v for k, v in stack.backend.headers[0].items()}
    assert "x-api-key" not in sent and "authorization" not in sent
    assert "sk-ant-client-secret" not in json.dumps(sent)


@pytest.mark.parametrize("method,path", [("GET", "/health"), ("HEAD", "/"), ("HEAD", "/api/hello")])
def test_open_paths_without_auth(make_stack, method, path):
    stack = make_stack("openai", auth_token="s3cret")
    code, _, _ = http(stack, method, path)
    assert code == 200


# --- Metrics -----------------------------------------------------------------------------------


def test_metric_labels_stay_bounded_whatever_paths_clients_send(make_stack):
    """Regression: every path under /v1/messages or /v1/models became a label of its own (memory without bound,
    from unauthenticated requests too)."""
    stack = make_stack("openai", auth_token="secret-token")
    for i in range(30):
        http(stack, "GET", f"/v1/messages/x{i}")
        http(stack, "GET", f"/v1/modelsjunk{i}")
        http(stack, "GET", f"/v1/models/model-{i}")
    text = http(stack, "GET", "/metrics", headers={"x-api-key": "secret-token"})[2]
    routes = set(re.findall(r'route="([^"]*)"', text))
    assert routes <= {"other", "/v1/models/{model_id}", "/metrics"}, routes


def test_metrics_parse_and_move(make_stack):
    parser = pytest.importorskip("prometheus_client.parser")
    stack = make_stack("openai")
    stack.client().messages.create(model="claude-opus-5-5", max_tokens=10, messages=USER_HI)
    with stack.client().messages.stream(model="claude-opus-5-5", max_tokens=10, messages=USER_HI) as s:
        s.get_final_message()
    status, _, text = http(stack, "GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    requests = [
        s
        for s in families["claude_proxy_requests"].samples
        if s.labels.get("route") == "/v1/messages" and s.labels.get("status") == "200"
    ]
    assert requests and requests[0].value == 2
    assert any(s.value == 7 * 2 for s in families["claude_proxy_output_tokens"].samples)
    counts = [s for s in families["claude_proxy_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert counts[0].value == 1
    assert families["claude_proxy_active_streams"].samples[0].value == 0


# --- One request record: the log line, the outcome, error kinds in metrics --------------------------


def test_outcome_is_the_same_for_streaming_and_the_log(make_stack, provider, caplog):
    """One result value: the final message_delta, the non-streaming message and the log line agree."""
    stack = make_stack(provider)
    caplog.set_level(logging.INFO, logger="claude_proxy")
    for stream in (True, False):
        stack.backend.queue(text_answer(provider, "a", "b"))
        if stream:
            with stack.client().messages.stream(model="m", max_tokens=10, messages=USER_HI) as s:
                msg = s.get_final_message()
        else:
            msg = stack.client().messages.create(model="m", max_tokens=10, messages=USER_HI)

        def lines() -> list:
            return [r.fields for r in caplog.records if getattr(r, "fields", {}).get("path") == "/v1/messages"]

        expected = 1 if stream else 2
        assert wait_for(lambda n=expected: len(lines()) == n)  # the proxy logs once the stream has ended
        line = lines()[-1]
        assert line["stop"] == msg.stop_reason == "end_turn"
        assert (line["input_tokens"], line["output_tokens"]) == (msg.usage.input_tokens, msg.usage.output_tokens)
        assert line["stream"] is stream


def _backend_errors(stack) -> dict:
    _, _, text = http(stack, "GET", "/metrics")
    return {
        line.split("kind=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("claude_proxy_backend_errors_total{")
    }


def test_backend_error_metrics_count_backend_failures_by_kind_only(make_stack):
    """Regression: a client's invalid request (never sent) was counted as a backend error `http_400`."""
    stack = make_stack("openai")
    assert http(stack, "POST", "/v1/messages", {"model": "m", "messages": []})[0] == 400
    assert _backend_errors(stack) == {}
    stack.backend.queue(Reply(503, {"error": {"message": "busy"}}))
    with pytest.raises(anthropic.APIStatusError):
        stack.client(max_retries=0).messages.create(model="m", max_tokens=10, messages=USER_HI)
    stack.backend.queue(SSE(oai_text_stream("cut", finish=None), done=False))
    with pytest.raises(anthropic.APIStatusError):
        stack.client(max_retries=0).messages.create(model="m", max_tokens=10, messages=USER_HI)
    assert _backend_errors(stack) == {"http_503": 1, "truncated": 1}


def test_connect_timeout_has_its_own_kind(make_stack, monkeypatch):
    """Regression: a connect timeout was counted as `http_504`."""
    stack = make_stack("openai")

    async def never_connects(*args, **kwargs):
        raise cp._CONNECT_TIMEOUT("connect timed out")

    if cp._CONNECT_TIMEOUT == ():
        pytest.skip("this aiohttp does not tell connect timeouts apart")
    monkeypatch.setattr(stack.app[cp.BACKEND].session, "post", never_connects)
    status, _, body = http(stack, "POST", "/v1/messages", req())
    assert status == 504 and "could not connect" in body and "is it running" in body
    assert _backend_errors(stack) == {"connect_timeout": 1}


# ======================================================================================
# 10. CLI
# ======================================================================================


# --- Graceful shutdown -------------------------------------------------------------------------


def test_sigterm_lets_streams_finish(make_stack, tmp_path):
    stack = make_stack("openai")
    stack.backend.queue(SSE(oai_text_stream("one", "two", "three"), delay=0.3))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "claude_proxy.py"),
            "--provider",
            "openai",
            "--base-url",
            stack.backend_url,
            "--model",
            "m",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: _health(port), timeout=15)
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0)
        with client.messages.stream(model="m", max_tokens=5, messages=USER_HI) as s:
            first = next(iter(s.text_stream))
            proc.send_signal(signal.SIGTERM)  # while the backend is still streaming
            rest = "".join(s.text_stream)
            final = s.get_final_message()
        assert first + rest == "onetwothree" and final.stop_reason == "end_turn"
        assert proc.wait(10) == 0
    finally:
        proc.kill()


def test_shutdown_grace_covers_requests_still_before_their_backend_call(loop_thread):
    """Regression: a request still routing when the shutdown began was not waited for and then cut off without
    an error; now it gets the grace too, and a clean overloaded error when the grace is over."""
    import threading

    import conftest

    backend = conftest.FakeBackend()
    brunner, bport = loop_thread.run(conftest.start_site(backend.app()))
    backend.queue(SSE(oai_text_stream(*["w "] * 60), delay=0.05))  # a 3 s answer
    config = cp.Config(
        provider="openai", base_url=f"http://127.0.0.1:{bport}/v1", default_model="m", shutdown_grace=1.0
    )
    app = cp.create_app(config)
    proxy = app[cp.BACKEND]
    route = proxy.route

    async def slow_route(model: str) -> Any:  # discovery, /api/show or --fetch-images before any backend call
        await asyncio.sleep(0.4)
        return await route(model)

    proxy.route = slow_route
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=cp.SHUTDOWN_TIMEOUT)
    loop_thread.run(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop_thread.run(site.start())
    port = site._server.sockets[0].getsockname()[1]
    stopper = threading.Timer(0.2, lambda: loop_thread.run(runner.cleanup(), timeout=20))
    stopper.start()
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0)
    try:
        with pytest.raises(anthropic.APIStatusError) as err:
            with client.messages.stream(model="m", max_tokens=50, messages=USER_HI) as s:
                for _ in s.text_stream:
                    pass
        assert err.value.body["error"]["type"] == "overloaded_error" and "shutting down" in str(err.value)
    finally:
        stopper.join()
        loop_thread.run(brunner.cleanup())


def test_ctrl_c_ends_a_long_stream_within_the_bound(make_stack, tmp_path):
    """A stream that outlasts --shutdown-grace ends with a retryable overloaded error, and the process exits at
    most 2 s after the grace (Ctrl-C used to take 8-10 s, with the stream cut off without an error)."""
    stack = make_stack("openai")
    stack.backend.queue(SSE(oai_text_stream(*["w "] * 200), delay=0.05))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "claude_proxy.py"), "--provider", "openai", "--base-url", stack.backend_url]
        + ["--model", "m", "--port", str(port), "--shutdown-grace", "0.5"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: _health(port), timeout=15)
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as err:
            with client.messages.stream(model="m", max_tokens=5, messages=USER_HI) as s:
                next(iter(s.text_stream))
                started = time.monotonic()
                proc.send_signal(signal.SIGINT)
                for _ in s.text_stream:
                    pass
        assert err.value.body["error"]["type"] == "overloaded_error" and "shutting down" in str(err.value)
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 0.5 + 2 + 1  # grace + aiohttp's close + process exit
    finally:
        proc.kill()


# --- Help, check, gunicorn ---------------------------------------------------------------------


def test_help_documents_every_option():
    result = subprocess.run(
        [sys.executable, str(HERE / "claude_proxy.py"), "--help"], capture_output=True, text=True, timeout=30
    )
    for option in (
        "--host",
        "--port",
        "--provider",
        "--base-url",
        "--api-key",
        "--model",
        "--model-map",
        "--timeout",
        "--log-level",
        "--system-messages",
        "--auth-token",
        "--check",
        "--log-format",
    ):
        assert option in result.stdout


def test_port_in_use_is_one_line_and_exit_2_without_a_banner(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(HERE / "claude_proxy.py"), "--port", str(port), "--provider", "openai"]
            + ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2 and "listening" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if "WARNING" not in line]
    assert len(errors) == 1 and "cannot listen" in errors[0] and "in use" in errors[0], result.stderr


def test_banner_after_bind_suggests_the_auth_token_without_printing_it(tmp_path):
    port = free_port()
    token = "sk-proxy-0123456789abcdef"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "claude_proxy.py"), "--port", str(port), "--provider", "openai"]
        + ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--auth-token", token],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        banner = proc.stdout.readline() + proc.stdout.readline()
        assert _health(port), "the banner is printed once the port answers"
        assert f"listening on http://127.0.0.1:{port}" in banner and token not in banner
        assert f"ANTHROPIC_BASE_URL=http://127.0.0.1:{port} ANTHROPIC_API_KEY=<your --auth-token: sk…ef>" in banner
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    "provider, path, fix",
    [
        ("openai", "", "try --base-url http://127.0.0.1:{port}/v1"),  # the /v1 left out
        ("ollama", "/v1", "the ollama provider takes the server's root: --base-url http://127.0.0.1:{port} "),
    ],
)
def test_wrong_base_url_says_what_happened_and_the_fix(make_stack, capsys, provider, path, fix):
    """Regression: a base URL without /v1 got 'model ... is not mapped ... is it running?' and --check said
    'unreachable'; now both say which URL answered what, and the likely fix."""
    backend = make_stack(provider).backend
    base = f"http://127.0.0.1:{backend.port}{path}"
    fix = fix.format(port=backend.port)
    stack = make_stack(provider, base_url=base, default_model=None)
    status, _, text = http(stack, "POST", "/v1/messages", req(model="claude-opus-5-5"))
    message = json.loads(text)["error"]["message"]
    assert status == 502 and "HTTP 404 from http://127.0.0.1" in message and fix in message, message
    config = cp.Config(provider=provider, base_url=base)
    assert stack.loop.run(cp.run_check(config, out=sys.stdout)) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "FAIL: HTTP 404 from" in out and " ".join(fix.split()) in out


def test_model_map_typos_are_reported_with_the_close_names(make_stack, capsys, caplog):
    stack = make_stack("openai")
    model_map = {"claude-opus-5.5": "qwen3-coder", "claude-haiku-5-5": "qwen3-codr", "claude-*": "qwen3-coder"}
    caplog.set_level(logging.WARNING, logger="claude_proxy")
    config = cp.Config(provider="openai", base_url=stack.backend_url, model_map=model_map)
    assert stack.loop.run(cp.run_check(config, out=sys.stdout)) == 0  # warnings, not failures (the fake answers)
    out = " ".join(capsys.readouterr().out.split())
    assert "'claude-opus-5.5' matches no model name Claude Code sends (did you mean 'claude-opus-5-5'?)" in out
    assert "'claude-haiku-5-5': the backend does not list 'qwen3-codr' (close: qwen3-coder)" in out
    assert "claude-*" not in out.split("WARNING")[-1]
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "did you mean 'claude-opus-5-5'" in logged and "does not list 'qwen3-codr'" in logged


@pytest.mark.parametrize(
    "provider, reply",
    [
        ("openai", {"object": "error", "message": "The model `qwen3-codr` does not exist.", "code": 404}),
        ("ollama", {"error": 'model "qwen3-codr" not found, try pulling it first'}),
    ],
)
def test_backend_without_the_model_names_it_and_the_close_ones(make_stack, provider, reply):
    stack = make_stack(provider, model_map={"claude-x": "qwen3-codr"})
    stack.backend.queue(Reply(404, reply))
    status, _, text = http(stack, "POST", "/v1/messages", req(model="claude-x"))
    message = json.loads(text)["error"]["message"]
    assert status == 404 and "the backend has no model 'qwen3-codr'" in message and "model map" in message
    listed = "qwen3-coder" if provider == "openai" else "qwen3:8b"
    assert f"it lists {listed}" in message


def test_check_prints_long_messages_whole_and_wrapped(make_stack, capsys):
    """Regression: --check cut its results at 200 characters, and the fix at the end of a message was lost."""
    stack = make_stack("openai")
    tail = "the fix is at the very end of this message: start the server with --some-flag"
    stack.backend.queue(Reply(400, {"error": {"message": "x" * 10 + " word" * 60 + " " + tail}}))
    config = cp.Config(provider="openai", base_url=stack.backend_url, model_map={"claude-x": "m"})
    assert stack.loop.run(cp.run_check(config, out=sys.stdout)) == 1
    out = capsys.readouterr().out
    assert " ".join(out.split()).endswith(tail) and max(len(line) for line in out.splitlines()) <= 200


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
    stack = make_stack("openai")
    port = free_port()
    env = dict(os.environ, PROVIDER="openai", PROVIDER_BASE_URL=stack.backend_url, DEFAULT_MODEL="gm")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "claude_proxy:create_app()",
            "-k",
            "aiohttp.GunicornWebWorker",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
        ],
        cwd=HERE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
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


# --- run: Claude Code on the proxy ------------------------------------------------------------------


FAKE_CLAUDE = """#!{python}
import json, os, sys
import anthropic

client = anthropic.Anthropic(max_retries=0)  # ANTHROPIC_BASE_URL and ANTHROPIC_AUTH_TOKEN from the environment
model = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "claude-opus-5-5"
msg = client.messages.create(model=model, max_tokens=20, messages=[{{"role": "user", "content": "hi"}}])
names = ("ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY", "CLAUDE_CODE_AUTO_COMPACT_WINDOW",
         "CLAUDE_CODE_MAX_CONTEXT_TOKENS")
out = {{"args": sys.argv[1:], "env": {{n: os.environ.get(n) for n in names}}, "usage": msg.usage.input_tokens}}
with open(os.environ["FAKE_CLAUDE_OUT"] + ".tmp", "w") as f:
    json.dump(out, f)
os.rename(os.environ["FAKE_CLAUDE_OUT"] + ".tmp", os.environ["FAKE_CLAUDE_OUT"])
if os.environ.get("FAKE_CLAUDE_SLEEP"):
    import time
    time.sleep(float(os.environ["FAKE_CLAUDE_SLEEP"]))
sys.exit(int(os.environ.get("FAKE_CLAUDE_EXIT", "0")))
"""


def run_proxy(tmp_path, args: list[str], env: dict | None = None, claude: bool = True, background: bool = False):
    """`python claude_proxy.py <args>` with a fake `claude` (the anthropic SDK) on PATH -> (process, what it saw)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if claude:
        (bin_dir / "claude").write_text(FAKE_CLAUDE.format(python=sys.executable))
        (bin_dir / "claude").chmod(0o755)
    full_env = {
        "PATH": str(bin_dir) + os.pathsep + os.path.dirname(sys.executable),  # not where the real one is
        "TMPDIR": str(tmp_path),
        "FAKE_CLAUDE_OUT": str(tmp_path / "claude.json"),
        "ANTHROPIC_API_KEY": "sk-ant-real-key-never-needed",
        **(env or {}),
    }
    if background:
        return subprocess.Popen(
            [sys.executable, str(HERE / "claude_proxy.py"), *args],
            env=full_env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ), None
    proc = subprocess.run(
        [sys.executable, str(HERE / "claude_proxy.py"), *args],
        env=full_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seen = json.loads((tmp_path / "claude.json").read_text()) if (tmp_path / "claude.json").exists() else None
    return proc, seen


def test_run_starts_claude_code_on_the_proxy(make_stack, tmp_path, provider):
    stack = make_stack(provider)
    stack.backend.queue(
        SSE(oai_text_stream("ok", usage=oai_usage(1000, 5)))
        if provider == "openai"
        else NDJSON(ollama_text_stream("ok", prompt=1000))
    )
    model = "qwen3-coder" if provider == "openai" else "qwen3:1.7b"
    args = ["--provider", provider, "--base-url", stack.backend_url, "--auth-token", "tok-1"]
    proc, seen = run_proxy(tmp_path, [*args, "run", "-p", "hi", "--model", model], {"FAKE_CLAUDE_EXIT": "7"})
    assert proc.returncode == 7, proc.stderr  # Claude Code's exit code
    assert seen["args"] == ["-p", "hi", "--model", model]  # its arguments, untouched
    env = seen["env"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", env["ANTHROPIC_BASE_URL"])
    assert env["ANTHROPIC_AUTH_TOKEN"] == "tok-1" and env["ANTHROPIC_API_KEY"] is None
    # a 32k window (vLLM's max_model_len / Ollama's num_ctx): Claude Code is told 132k, usage is scaled to match
    assert env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == "132000"
    assert seen["usage"] == round(1000 * 132_000 / 32_768)
    assert stack.backend.requests[-1]["model"] == model
    log_path = re.search(r"log: (\S+)", proc.stderr).group(1)
    assert log_path.startswith(str(tmp_path)) and f"run: {model} -> {model}" in pathlib.Path(log_path).read_text()
    assert "POST /v1/messages" in pathlib.Path(log_path).read_text() and "POST /v1/messages" not in proc.stderr
    port = int(env["ANTHROPIC_BASE_URL"].rsplit(":", 1)[1])
    with pytest.raises(OSError):  # the proxy stopped with Claude Code
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_run_keeps_the_users_compaction_window(make_stack, tmp_path):
    stack = make_stack("openai")
    stack.backend.queue(SSE(oai_text_stream("ok", usage=oai_usage(1000, 5))))
    proc, seen = run_proxy(
        tmp_path,
        ["--provider", "openai", "--base-url", stack.backend_url, "run", "--model=qwen3-coder"],
        {"CLAUDE_CODE_AUTO_COMPACT_WINDOW": "200k"},
    )
    assert proc.returncode == 0, proc.stderr
    assert seen["env"]["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "200k"
    assert seen["env"]["ANTHROPIC_AUTH_TOKEN"]  # some key, without --auth-token
    assert seen["usage"] == round(1000 * cp.usage_scale(200_000, 32_768))


def test_run_without_claude_says_how_to_install_it(tmp_path):
    proc, seen = run_proxy(tmp_path, ["--provider", "openai", "run", "-p", "hi"], claude=False)
    assert proc.returncode == 127 and seen is None
    assert "npm install -g @anthropic-ai/claude-code" in proc.stderr


def test_split_run_unit():
    assert cp.split_run(["--provider", "openai", "run", "-p", "x", "--model", "m"]) == (
        ["--provider", "openai"],
        ["-p", "x", "--model", "m"],
    )
    assert cp.split_run(["--model", "run", "--port", "1"]) == (["--model", "run", "--port", "1"], None)
    assert cp.split_run(["--fetch-images", "run"]) == (["--fetch-images"], [])
    assert cp.claude_model(["-p", "x"], {"ANTHROPIC_MODEL": "qwen3:4b"}) == "qwen3:4b"
    assert cp.claude_model([], {}) == "claude-opus-5-5"
    assert [cp.parse_tokens(t) for t in ("132000", "128k", "1m", "x")] == [132000, 128000, 1000000, None]


def test_context_window_option():
    assert cp.load_config(["--context-window", "64k"], environ={}, dotenv_path="").context_window == 64000
    assert cp.load_config([], environ={"CONTEXT_WINDOW": "49152"}, dotenv_path="").context_window == 49152
    assert cp.load_config([], environ={}, dotenv_path="").context_window is None
    for bad in ("lots", "100"):
        with pytest.raises(cp.ConfigError, match="context"):
            cp.load_config(["--context-window", bad], environ={}, dotenv_path="")


def test_run_passes_a_stop_on_to_claude_code(make_stack, tmp_path):
    stack = make_stack("openai")
    proc, _ = run_proxy(
        tmp_path,
        ["--provider", "openai", "--base-url", stack.backend_url, "run", "--model", "qwen3-coder"],
        {"FAKE_CLAUDE_SLEEP": "30"},
        background=True,
    )
    try:
        assert wait_for(lambda: (tmp_path / "claude.json").exists(), 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM  # Claude Code ended by the signal, as a shell reports it
    finally:
        proc.kill()
        proc.communicate()


# ======================================================================================
# 11. END TO END: the real Claude Code CLI (marker e2e)
# ======================================================================================


# The official CLI, installed from npm at a pinned version (conftest.CLAUDE_CODE_VERSION, cached; conftest.claude_code
# says how), runs offline through the proxy in front of each fake backend. The backend answers by what a request
# contains, never by arrival order. Only these: `python -m pytest -m e2e`; all but these: `-m "not e2e"`.

CC_OVERFLOW = {  # each provider's own 400 for a prompt over the context window
    "openai": {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 "
            "tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    },
    "ollama": {"error": "request (9000 tokens) exceeds the available context size (8192 tokens), try increasing it"},
}


def cc_bash_calls(provider: str, *commands: str) -> Any:
    """One assistant turn of parallel Bash calls (one per command), streamed the way the provider streams them."""
    inputs = [{"command": command, "description": f"step {i}"} for i, command in enumerate(commands)]
    if provider == "ollama":
        calls = [{"function": {"index": i, "name": "Bash", "arguments": args}} for i, args in enumerate(inputs)]
        return NDJSON([ollama_chunk(tool_calls=calls), ollama_chunk(done=True)])
    chunks = [oai_chunk({"role": "assistant", "content": ""})]
    for i, args in enumerate(inputs):
        text = json.dumps(args)
        chunks += oai_tool_call_chunks(i, f"call_e2e_{i}", "Bash", text[:12], text[12:])
    return SSE(chunks + [oai_chunk({}, "tool_calls"), oai_chunk(choices=[], usage=oai_usage())])


def cc_last(body: dict) -> tuple[str, str]:
    """(role, text) of the last message the backend received."""
    message = body["messages"][-1]
    return message["role"], cc_text(message)


def cc_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def cc_turn_with(chats: list, text: str) -> dict:
    """The one backend request whose last message contains text."""
    found = [body for body in chats if text in cc_last(body)[1]]
    assert len(found) == 1, f"{len(found)} backend requests end with {text!r}: {[cc_last(b)[1][-200:] for b in chats]}"
    return found[0]


def cc_done(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"claude exited {done.returncode}; stdout: {done.stdout!r}; stderr: {done.stderr!r}"
    return done.stdout.strip()


@pytest.mark.e2e
def test_claude_code_print_shows_backend_text(claude_code, provider):
    def respond(body):
        return text_answer(provider, "Hello from ", "the fake backend.") if "Say hello" in cc_last(body)[1] else None

    cc = claude_code(respond)
    assert cc_done(cc.run("Say hello")) == "Hello from the fake backend."
    turn = cc_turn_with(cc.chats(), "Say hello")
    assert turn["model"] == "backend-model" and turn["stream"] is True
    assert any(s["body"].get("stream") is True for s in cc.sent), "Claude Code streams its requests"


@pytest.mark.e2e
def test_claude_code_system_message_stays_in_place(claude_code, provider):
    """Claude Code puts its environment text in a `role: "system"` message after the prompt; the backend gets it
    where it was, as a <system-reminder> after the prompt in the user turn, not moved into the system prompt."""
    cc = claude_code()
    cc_done(cc.run("Where am I?"))
    sent = next(s["body"] for s in cc.sent if "Where am I?" in json.dumps(s["body"]["messages"]))
    roles = [m["role"] for m in sent["messages"]]
    assert "system" in roles, f"Claude Code sent no role: system message: {roles}"
    reminder = cc_text(sent["messages"][roles.index("system")]).strip()
    assert roles.index("system") > 0 and "Where am I?" in json.dumps(sent["messages"][: roles.index("system")])

    turn = next(body for body in cc.chats() if "Where am I?" in json.dumps(body["messages"]))
    system_prompt = cc_text(turn["messages"][0])
    assert turn["messages"][0]["role"] == "system" and reminder[:60] not in system_prompt
    user = [cc_text(m) for m in turn["messages"] if m["role"] == "user"]
    assert len(user) == 1
    prompt_at = user[0].index("Where am I?")
    assert user[0].index(f"<system-reminder>\n{reminder[:60]}") > prompt_at


@pytest.mark.e2e
def test_claude_code_runs_two_parallel_bash_calls(claude_code, provider):
    def respond(body):
        role, text = cc_last(body)
        if role == "tool":
            return text_answer(provider, "Both files ", "are written.")
        if role == "user" and "Write two files" in text:
            return cc_bash_calls(provider, "echo one > one.txt && cat one.txt", "echo two > two.txt && cat two.txt")
        return None

    cc = claude_code(respond)
    assert cc_done(cc.run("Write two files", "--allowedTools", "Bash")) == "Both files are written."
    work = pathlib.Path(cc.cwd)
    assert (work / "one.txt").read_text() == "one\n" and (work / "two.txt").read_text() == "two\n"

    results = [body for body in cc.chats() if cc_last(body)[0] == "tool"]
    assert len(results) == 1, "both results come back in one request"
    messages = results[0]["messages"]
    calls, one, two = messages[-3:]
    assert [c["function"]["name"] for c in calls["tool_calls"]] == ["Bash", "Bash"]
    assert (one["role"], one["content"], two["role"], two["content"]) == ("tool", "one", "tool", "two")
    if provider == "openai":  # the ids the backend gave, back to it
        assert [one["tool_call_id"], two["tool_call_id"]] == ["call_e2e_0", "call_e2e_1"]
        assert [c["id"] for c in calls["tool_calls"]] == ["call_e2e_0", "call_e2e_1"]
    # The environment reminder (a role: system message between the prompt and the tool calls) is still in the
    # user turn before the assistant's calls.
    user = [i for i, m in enumerate(messages) if m["role"] == "user"]
    assert len(user) == 1 and user[0] == messages.index(calls) - 1
    assert "Write two files" in cc_text(messages[user[0]]) and "<system-reminder>\n# Environment" in cc_text(
        messages[user[0]]
    )


@pytest.mark.e2e
def test_claude_code_compacts_and_retries_after_prompt_too_long(claude_code, provider):
    """The backend's context-overflow 400 becomes `prompt is too long`; Claude Code summarises the conversation
    (a compaction request) and carries on from the summary, which the backend answers."""
    summary = "E2E-SUMMARY: the user asked for one.txt; it was written."
    overflowed: list[dict] = []

    def respond(body):
        role, text = cc_last(body)
        if summary in json.dumps(body["messages"]):
            return text_answer(provider, "Carried on ", "after compaction.")
        if role == "user" and "<summary>" in text:  # the compaction instructions
            return text_answer(provider, f"<analysis>Short.</analysis>\n<summary>{summary}</summary>")
        if role == "tool" and not overflowed:
            overflowed.append(body)
            return Reply(400, CC_OVERFLOW[provider])
        if role == "user" and "Write one file" in text:
            return cc_bash_calls(provider, "echo one > one.txt")
        return None

    cc = claude_code(respond)
    out = cc_done(cc.run("Write one file", "--allowedTools", "Bash"))
    assert out == "Carried on after compaction." and "too long" not in out
    chats = cc.chats()
    assert overflowed, f"the backend never got the tool results: {[cc_last(b) for b in chats]}"
    at = chats.index(overflowed[0])
    compaction = [i for i, body in enumerate(chats) if "<summary>" in cc_last(body)[1]]
    resumed = [i for i, body in enumerate(chats) if summary in json.dumps(body["messages"])]
    assert compaction and compaction[0] > at, "a compaction request follows the overflow"
    assert resumed and resumed[0] > compaction[0], "the conversation goes on from the summary"
    assert (pathlib.Path(cc.cwd) / "one.txt").read_text() == "one\n"


@pytest.mark.e2e
def test_claude_code_interactive_session_title(claude_code, provider):
    """The interactive terminal: the answer appears, and the session-title request (structured output:
    `output_config.format` json_schema) reaches the backend as its own schema-constrained request; the title it
    answers becomes the terminal title."""

    def respond(body):
        if body.get("response_format") or body.get("format"):
            return text_answer(provider, json.dumps({"title": "Proxy e2e greeting"}))
        if "hello there" in cc_last(body)[1]:
            return text_answer(provider, "Hello from the fake backend.")
        return None

    cc = claude_code(respond)
    term = cc.interactive()
    term.wait_screen("❯")
    term.type("hello there")
    term.wait_screen("hello there")
    term.press("Enter")
    term.wait_screen("Hello from the fake backend.")
    assert wait_for(lambda: "Proxy e2e greeting" in term.title(), 20), f"terminal title: {term.title()!r}"

    sent = [s["body"] for s in cc.sent if (s["body"].get("output_config") or {}).get("format")]
    assert len(sent) == 1 and sent[0]["output_config"]["format"]["type"] == "json_schema"
    schema = sent[0]["output_config"]["format"]["schema"]
    titled = [body for body in cc.chats() if body.get("response_format") or body.get("format")]
    assert len(titled) == 1
    if provider == "openai":
        assert titled[0]["response_format"]["type"] == "json_schema"
        assert titled[0]["response_format"]["json_schema"]["schema"] == schema
    else:
        assert titled[0]["format"] == schema
    assert "hello there" in cc_text(titled[0]["messages"][-1])


def cc_run(cc, claude_code_bin: str, tmp_path, claude_args: list[str], proxy_args: tuple[str, ...] = ()):
    """`python claude_proxy.py <proxy_args> run <claude_args>` with the real CLI as `claude`, offline, against the
    ClaudeCode fixture's fake backend (the proxy is the one `run` starts, not the fixture's)."""
    bin_dir = tmp_path / "run-bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "claude").exists():
        (bin_dir / "claude").symlink_to(claude_code_bin)
    env = cc.env()
    env.pop("ANTHROPIC_BASE_URL")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(tmp_path)
    args = ["--provider", cc.provider, "--base-url", cc.stack.backend_url, *proxy_args, "run", *claude_args]
    done = subprocess.run(
        [sys.executable, str(HERE / "claude_proxy.py"), *args],
        cwd=cc.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"run exited {done.returncode}; stdout: {done.stdout!r}; stderr: {done.stderr!r}"
    return done


def cc_prompt_tokens(body: dict) -> int:
    """The fake backend's own count of a prompt: characters of the messages and tools / 4."""
    return (len(json.dumps(body["messages"])) + len(json.dumps(body.get("tools") or []))) // 4


@pytest.mark.e2e
def test_claude_code_context_through_run_shows_the_true_fraction(claude_code, claude_code_bin, provider, tmp_path):
    """`run` on a 32k model: Claude Code's /context reads against the 132k it is told, with usage scaled by
    132k / 32k, so its percentage is the true fraction of the model's window."""
    cc = claude_code()
    out = cc_run(cc, claude_code_bin, tmp_path, ["-p", "/context"]).stdout
    found = re.search(r"Tokens:\*\* ([\d.]+)k / 132k \((\d+)%\)", out)
    assert found, out
    shown, percent = float(found.group(1)) * 1000, int(found.group(2))
    raw = shown * 32768 / 132000  # what the backend model holds
    assert 5000 < raw < 12000 and abs(percent - 100 * raw / 32768) <= 1.5, (raw, percent)


@pytest.mark.e2e
def test_claude_code_compacts_before_a_32k_backend_overflows(claude_code, claude_code_bin, provider, tmp_path):
    """A session through `run` that grows ~3k tokens a turn on a 32k model: Claude Code compacts on its own (no
    overflow first), the compaction request fits, and the conversation carries on from the summary."""
    window, seen = 32768, []
    summary = "E2E-SUMMARY: numbered turns of filler."

    def respond(body):
        prompt = cc_prompt_tokens(body)
        seen.append(prompt)
        if prompt >= window:
            return Reply(400, CC_OVERFLOW[provider])
        role, text = cc_last(body)
        if role == "user" and "<summary>" in text:
            answer = f"<analysis>Short.</analysis>\n<summary>{summary}</summary>"
        else:
            answer = "filler " * 1600  # ~3k tokens of history per turn
        if provider == "openai":
            return SSE(oai_text_stream(answer, usage=oai_usage(prompt, len(answer) // 4)))
        return NDJSON(ollama_text_stream(answer, prompt=prompt, completion=len(answer) // 4))

    cc = claude_code(respond)
    cc_run(cc, claude_code_bin, tmp_path, ["-p", "turn 1"])
    for turn in range(2, 9):
        cc_run(cc, claude_code_bin, tmp_path, ["-p", f"turn {turn}", "--continue"])
        if any(summary in json.dumps(body["messages"]) for body in cc.chats()):
            break
    chats = cc.chats()
    compaction = [i for i, body in enumerate(chats) if "<summary>" in cc_last(body)[1] and cc_last(body)[0] == "user"]
    assert compaction, f"no compaction; prompts: {seen}"
    assert max(seen) < window, f"the backend overflowed: {seen}"
    before = cc_prompt_tokens(chats[compaction[0] - 1])
    assert 0.70 * window < before < 0.90 * window, "compacted at about 75% of the window"
    assert any(summary in json.dumps(body["messages"]) for body in chats[compaction[0] + 1 :])


@pytest.mark.e2e
def test_claude_code_asks_for_a_backend_model_by_name(claude_code, claude_code_bin, provider, tmp_path):
    cc = claude_code()
    if provider == "openai":
        cc.stack.backend.models_openai.append({"id": "qwen3:4b", "object": "model", "max_model_len": 40960})
    else:
        cc.stack.backend.models_ollama.append({"name": "qwen3:4b", "model": "qwen3:4b", "size": 2497293918})
    done = cc_run(cc, claude_code_bin, tmp_path, ["--model", "qwen3:4b", "-p", "hi"])
    assert done.stdout.strip() == "ok"
    assert {body["model"] for body in cc.chats()} == {"qwen3:4b"}
    assert "qwen3:4b -> qwen3:4b" in done.stderr
