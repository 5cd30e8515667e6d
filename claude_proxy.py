#!/usr/bin/env python3
"""claude-proxy: Anthropic's Messages API in front of OpenAI-compatible and Ollama backends.

Run it:   pip install aiohttp && python claude_proxy.py
Then:     ANTHROPIC_BASE_URL=http://127.0.0.1:8080 ANTHROPIC_API_KEY=x claude
Or both:  python claude_proxy.py run [claude arguments...]

One file, read top to bottom (apart from the validator's recursive types, no name is used above its definition):
  1. SHARED             limits and timeouts, ids, warn_once, logging setup
  2. CONFIG             the option table (flags, environment, .env, defaults), Config, the model map, routes
  3. WIRE TYPES         Anthropic request dataclasses and their validation (errors name the field path)
  4. TOKENS             the heuristic token counter (text in any language, images)
  5. REQUEST TRANSLATION  Anthropic request -> neutral turns -> OpenAI / Ollama bodies; prompt-based tools
  6. RESPONSE TRANSLATION backend payloads -> a fold (EventBuilder) -> Anthropic events -> Message;
                        tool-argument streaming, inline <think>, tool calls written as text, stop strings,
                        backend errors -> Anthropic errors
  7. PROVIDERS          OpenAI-compatible and Ollama: paths, framing, body, model lists, what they reject
  8. STREAMING          sans-I/O framing (SSE, NDJSON), the Backend (discovery, windows, lessons, retries),
                        relays with pings, timeouts, disconnects and shutdown
  9. HTTP APP           aiohttp routes, error middleware, log line and metrics, create_app()
 10. CLI                --check, `run` (Claude Code on the proxy), main()
Only the standard library and aiohttp are needed; orjson is used when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import contextvars
import dataclasses
import difflib
import fnmatch
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import sys
import textwrap
import time
import typing
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

try:  # aiohttp is the one runtime dependency; say so plainly when it is missing.
    import aiohttp
    from aiohttp import web
except ImportError:  # pragma: no cover
    sys.stderr.write("claude-proxy needs aiohttp: pip install aiohttp\n")
    raise SystemExit(2) from None

MAX_JSON_DEPTH = 200
"""The deepest nesting of objects and arrays a request may have. The proxy's own limit, so that a request is
accepted or refused the same with and without orjson: orjson's encoder stops at 255 levels and its parser at 1024,
the stdlib's at the recursion limit (~1000). 200 leaves room for the few levels translation adds (a tool schema
sits one level deeper in an OpenAI body than in Anthropic's)."""


class JsonTooDeep(ValueError):
    """JSON nested deeper than MAX_JSON_DEPTH (or than the parser goes)."""

    def __init__(self) -> None:
        super().__init__(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")


try:  # optional speed-up; the fallback below gives the same output and rejects the same input
    import orjson as _orjson

    dumps_bytes = _orjson.dumps
    loads = _orjson.loads

    def dumps(obj: Any) -> str:
        return _orjson.dumps(obj).decode()
except ImportError:  # exercised by the tests with orjson hidden
    _orjson = None
    _encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    dumps = _encoder.encode
    # What orjson refuses, refuse here too: NaN/Infinity, numbers beyond a double, lone surrogates.
    # escapes read left to right: a whole pair, or a lone half (group 1), or any other escaped character
    _ESCAPES = re.compile(
        r"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|(u[dD][89a-fA-F][0-9a-fA-F]{2})|.)", re.S
    )

    def _no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    def _finite(text: str) -> Any:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text[:20]}... is out of range")
        return value

    def _int(text: str) -> Any:
        value = int(text)
        return value if -(1 << 63) <= value < (1 << 64) else _finite(text)  # orjson: 64-bit ints, else a double

    def loads(raw: Any) -> Any:
        text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8")  # strict: no surrogates, BOM or UTF-16
        if "\\u" in text and any(m.group(1) for m in _ESCAPES.finditer(text)):
            raise ValueError("lone surrogate in a string (\\uD800-\\uDFFF without its pair)")
        try:
            return json.loads(text, parse_constant=_no_constant, parse_float=_finite, parse_int=_int)
        except RecursionError:
            raise JsonTooDeep() from None

    def dumps_bytes(obj: Any) -> bytes:
        return _encoder.encode(obj).encode()


def loads_request(raw: bytes) -> Any:
    """loads() for a client's request body: JsonTooDeep past MAX_JSON_DEPTH, with or without orjson. The check
    walks the parsed containers level by level, once per request (never per stream chunk): 30-45 µs on Claude
    Code's 50 KB request in fixtures/, where parsing takes 80 µs with orjson and 270 µs without."""
    try:
        value = loads(raw)
    except RecursionError:
        raise JsonTooDeep() from None
    except ValueError as exc:
        if "depth limit" in str(exc) or "ecursion" in str(exc):  # orjson's parser stops at 1024 levels
            raise JsonTooDeep() from None
        raise
    if len(raw) <= 2 * MAX_JSON_DEPTH:  # too short to hold MAX_JSON_DEPTH + 1 pairs of brackets
        return value
    level = [value] if type(value) in (dict, list) else []
    for _ in range(MAX_JSON_DEPTH):
        level = [c for v in level for c in (v.values() if type(v) is dict else v) if type(c) in (dict, list)]
        if not level:
            return value
    raise JsonTooDeep()


__version__ = "0.1.0"
log = logging.getLogger("claude_proxy")


# ======================================================================================
# 1. SHARED: limits, ids, warnings, logging
# ======================================================================================
# Every limit, cache size and timeout that is not a configuration option, in one place.

MAX_LINE_BYTES = 64 << 20  # one backend stream line, or a whole JSON answer
MAX_ERROR_BODY_BYTES = 1 << 20  # a backend's error body, read to find its message
MAX_REASONING_BYTES = 4 << 20  # reasoning restored from a thinking signature (inflation cap)
MAX_IMAGE_BYTES = 20 << 20  # one image fetched with --fetch-images
MAX_IMAGE_BYTES_PER_REQUEST = 32 << 20  # all the images one request has fetched (each URL once)
MAX_ERROR_CHARS = 2000  # a backend's error message passed on to the client
MAX_SNIPPET_CHARS = 200  # raw backend bytes quoted in an error or a warning
MAX_DEBUG_CHARS = 20000  # a translated request body logged at DEBUG
CONNECTION_POOL = 1024  # open backend connections, in all and per host
KEEPALIVE_SECONDS = 30
RETRY_BACKOFF = (0.1, 2.0)  # seconds: first delay and cap, doubled per retry, jittered to 50-100%
DISCOVERY_INTERVAL = 5.0  # seconds between two on-demand model listings
PROBE_TIMEOUT = 5.0  # seconds for model lists and tokenizer endpoints
IMAGE_FETCH_TIMEOUT = 15.0
MAX_BODY_ADAPTATIONS = 6  # resends of one request adapted to what the backend said it cannot take
OUTPUT_CAP_SLACK = 8  # output tokens below the limit given that still count as reaching it
SHUTDOWN_TIMEOUT = 1.0  # after --shutdown-grace, for aiohttp to close connections (it waits twice at most)
WARN_ONCE_MEMORY = 1000  # distinct warnings remembered by warn_once
TOKEN_MEMO_SIZE = 8192  # token counts remembered (long texts, tool definitions)
BACKEND_TOKEN_CACHE_SIZE = 512  # counts from a backend tokenizer remembered
# Token overheads of a chat template, added to the counted text (fitted on Claude Code requests).
TOKENS_PER_REQUEST, TOKENS_PER_TURN, TOKENS_PER_TOOL_CALL, TOKENS_PER_TOOL = 3, 4, 6, 8

_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ids = random.Random(secrets.randbits(128))
if hasattr(os, "register_at_fork"):  # pre-forking servers (gunicorn --preload): no two workers share a sequence
    os.register_at_fork(after_in_child=lambda: _ids.seed(secrets.randbits(128)))


def new_id(prefix: str, n: int = 24) -> str:
    """msg_/toolu_/req_ ids: unique, not secret (a seeded PRNG is ~10x faster than secrets per id)."""
    return prefix + "".join(_ids.choices(_ID_ALPHABET, k=n))


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log a warning the first time it happens (a bounded memory: clients choose some of the words)."""
    if message not in _warned:
        if len(_warned) >= WARN_ONCE_MEMORY:
            _warned.clear()
        _warned.add(message)
        log.warning(message)


current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return dumps(out)


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        JsonFormatter()
        if config.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def public_url(url: str) -> str:
    """A URL safe to show in logs and errors: no user:password@."""
    return re.sub(r"//[^/@]*@", "//", url)


# ======================================================================================
# 2. CONFIG
# ======================================================================================

PROVIDERS = ("openai", "ollama")
DEFAULT_BASE_URLS = {"ollama": "http://127.0.0.1:11434", "openai": "http://127.0.0.1:8000/v1"}
SYSTEM_MESSAGE_STRATEGIES = ("reminder", "hoist", "inline")
# Ollama runs a model with the num_ctx of each request, else with its own default (4k on small machines) and
# cuts the prompt's start without an error. Claude Code's system prompt and tools alone take 11-13k tokens;
# 32k leaves ~20k for the conversation and a compaction, and costs 1.5-5 GB of KV cache on 4-32B models
# (Ollama's own choice on 24-48 GB GPUs). More: context_window in the map, or --context-window.
DEFAULT_NUM_CTX = 32768
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MODEL_MAP_KEYS = (
    "model",
    "provider",
    "base_url",
    "api_key_env",
    "max_tokens",
    "context_window",
    "reasoning_history",
    "send_user_id",
    "text_tool_calls",
    "tool_calls",
)
TOOL_CALL_MODES = ("native", "prompt")


class ConfigError(Exception):
    """Bad configuration: reported as one line on stderr, exit code 2."""


def parse_dotenv(text: str) -> dict[str, str]:
    """KEY=VALUE lines; `export`, comments, blank lines and single/double quotes are understood."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def _read_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_model_map(path: Optional[str], inline: Optional[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for source, text in (
        ("MODEL_MAP_FILE " + str(path), _read_file(path, "model map") if path else None),
        ("MODEL_MAP_JSON", inline),
    ):
        if not text:
            continue
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: must be a JSON object of model name -> backend model")
        data.pop("_comment", None)
        result.update(data)
    return result


# --- the option table: each setting once -----------------------------------------------------------


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a non-negative number, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"bad port {text!r}: must be a number 1-65535")
    return int(text)


def _port_range(value: int) -> Optional[str]:
    return None if isinstance(value, int) and 1 <= value <= 65535 else f"bad port {value}: must be 1-65535"


def _fresh(default: Any) -> Any:
    return type(default)(default) if isinstance(default, (dict, list)) else default


def _positive(value: float) -> Optional[str]:
    return None if value > 0 else f"must be positive, got {value:g}"


def parse_tokens(text: Optional[str]) -> Optional[int]:
    """'132000', '128k', '1m' -> tokens (as Claude Code reads its window variables); None if not a number."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([km]?)\s*", (text or "").lower())
    if not match:
        return None
    return int(float(match.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[match.group(2)])


def _tokens(text: str) -> int:
    value = parse_tokens(text)
    if value is None:
        raise ValueError(f"expected a number of tokens (32768, 64k), got {text!r}")
    return value


def _window(value: Optional[int]) -> Optional[str]:
    return None if value is None or value >= 1024 else f"a context window of {value} tokens is too small"


def _model_map(given: Optional[str], env: typing.Mapping[str, str]) -> dict[str, Any]:
    return load_model_map(given or env.get("MODEL_MAP_FILE") or None, env.get("MODEL_MAP_JSON"))


@dataclass(frozen=True)
class Option:
    """One setting, once: its Config field, flag, environment variables, default, parsing, check and help.
    OPTIONS drives Config (fields, defaults, validation), build_parser() (flags, --help), load_config()
    (flags, then environment, then .env, then the default) and the README's table (a test compares them).
    A new setting is one entry here (and its README row); the code reads it as config.<name>. Numbers: parse=_number,
    an int when the default is one."""

    name: str  # the Config field
    flag: Optional[str]  # None, and no env: set only through Config(...) (tests, create_app callers)
    env: tuple[str, ...]  # the first one set wins
    default: Any  # in Config's units (seconds, bytes)
    help: str
    parse: typing.Callable[[str], Any] = str  # flag/environment text -> value; ValueError: a ConfigError naming it
    choices: tuple[str, ...] = ()
    check: Optional[typing.Callable[[Any], Optional[str]]] = None  # value -> what is wrong with it, or None
    switch: bool = False  # a flag without a value (and --no-... when on by default); the environment: 1/true/yes/on
    scale: float = 1  # Config value per unit given (MiB -> bytes)
    unit: str = ""  # of the flag's value, for --help and the README
    env_scale: Optional[float] = None  # when the environment variable has its own unit (milliseconds)
    env_unit: str = ""
    shown: Optional[str] = None  # the default as --help and the README show it, when not derived from `default`
    read: Optional[typing.Callable[[Optional[str], typing.Mapping[str, str]], Any]] = None  # (flag text, env) -> value

    @property
    def where(self) -> str:
        return " / ".join(([self.flag] if self.flag else []) + list(self.env)) or self.name

    def shown_default(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.switch:
            return "on" if self.default else "off"
        if self.default is None or self.default in ("", {}):
            return "none"
        if isinstance(self.default, (int, float)):
            return f"{self.default / self.scale:g}" + (f" {self.unit}" if self.unit else "")
        return str(self.default)

    def help_text(self) -> str:
        env = ", ".join(f"{name}={0 if self.default else 1}" if self.switch else name for name in self.env)
        if env and self.env_unit:
            env += f", in {self.env_unit}"
        shown = self.shown_default()
        text = self.help + (f" [{env}]" if env else "")
        text += f" (default {shown})" if shown and not self.switch and self.default is not None else ""
        return text.replace("%", "%%")  # argparse formats help with %

    def value(self, given: Any, env: typing.Mapping[str, str]) -> Any:
        """The flag's text (None: not given), else the first environment variable set, else the default."""
        if self.read:
            return self.read(given, env)
        source, text, scale = self.flag, given, self.scale
        if given is None or given == "":  # an empty flag, like an empty variable, leaves the setting alone
            source = next((name for name in self.env if env.get(name)), None)
            if source is None:
                return _fresh(self.default)
            text = env[source]
            scale = self.env_scale or self.scale
        if self.switch:
            return given if given is not None else text.lower() in ("1", "true", "yes", "on")
        try:
            value = self.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if scale != 1:
            value *= scale
        return int(value) if type(self.default) is int else value

    def validate(self, value: Any) -> None:
        if self.choices and value not in self.choices:
            raise ConfigError(
                f"unknown {self.name.replace('_', ' ')} {value!r} ({self.where}): use one of {', '.join(self.choices)}"
            )
        problem = self.check(value) if self.check else None
        if problem:
            raise ConfigError(f"{self.where}: {problem}")


OPTIONS: tuple[Option, ...] = (  # in --help and README order; Option(name, flag, env, default, help, ...)
    Option("host", "--host", ("HOST",), "127.0.0.1", "address to listen on (anything else exposes the proxy)"),
    Option("port", "--port", ("PORT",), 8080, "port to listen on", parse=_port, check=_port_range),
    Option(
        "provider", "--provider", ("PROVIDER",), "ollama",
        "backend kind: openai (any Chat Completions server) or ollama (native /api/chat)",
        parse=str.lower, choices=PROVIDERS,
    ),
    Option(
        "base_url", "--base-url", ("PROVIDER_BASE_URL",), "",
        "backend base URL (give OpenAI-compatible URLs with their /v1)",
        shown=", ".join(f"{url} ({name})" for name, url in DEFAULT_BASE_URLS.items()),
    ),
    Option(
        "api_key", "--api-key", ("PROVIDER_API_KEY",), None,
        "key sent to the backend as 'Authorization: Bearer'; the client's own key is never forwarded",
    ),
    Option("default_model", "--model", ("DEFAULT_MODEL",), None, "backend model for names the map does not know"),
    Option(
        "model_map", "--model-map", ("MODEL_MAP_FILE", "MODEL_MAP_JSON"), {},
        "JSON file mapping client model names or glob patterns to backend models; MODEL_MAP_JSON may hold the "
        "same JSON inline",
        read=_model_map,
    ),
    Option(
        "timeout", "--timeout", ("PROVIDER_TIMEOUT_MS",), 120.0,
        "seconds to wait for the backend's first byte and between chunks",
        parse=_number, check=_positive, unit="s", env_scale=0.001, env_unit="ms",
    ),
    Option(
        "system_messages", "--system-messages", ("SYSTEM_MESSAGES",), "reminder",
        "what to do with role 'system' messages inside messages: reminder (wrap them in <system-reminder> in the "
        "neighbouring user turn), hoist (append to the system prompt), inline (keep a system message in place)",
        choices=SYSTEM_MESSAGE_STRATEGIES,
    ),
    Option(
        "retries", "--retries", ("PROVIDER_RETRIES",), 2, "retries of connection failures before any byte",
        parse=_number,
    ),
    Option(
        "max_body_bytes", "--max-body-mb", ("MAX_BODY_MB",), 32 << 20, "largest request body",
        parse=_number, scale=1 << 20, unit="MiB",
    ),
    Option(
        "auth_token", "--auth-token", ("PROXY_AUTH_TOKEN",), None,
        "require this key from clients (x-api-key or Authorization: Bearer)",
    ),
    Option(
        "log_level", "--log-level", ("LOG_LEVEL",), "INFO",
        "DEBUG, INFO, WARNING, ERROR or CRITICAL (DEBUG logs translated requests)",
        parse=str.upper, choices=LOG_LEVELS,
    ),
    Option(
        "log_format", "--log-format", ("LOG_FORMAT",), "text", "text or json (one JSON object per line)",
        parse=str.lower, choices=("text", "json"),
    ),
    Option(
        "count_tokens", "--count-tokens", ("COUNT_TOKENS",), "heuristic",
        "heuristic (no backend call) or backend: count_tokens asks the server's tokenizer (vLLM /tokenize, "
        "llama.cpp /apply-template + /tokenize), cached, falling back to the heuristic",
        parse=str.lower, choices=("heuristic", "backend"),
    ),
    Option(
        "context_window", "--context-window", ("CONTEXT_WINDOW",), None,
        "context window of models the map gives none: sent to Ollama as num_ctx (default 32768, never above a "
        "model's trained length); for other servers, used when they state none",
        parse=_tokens, check=_window, unit="tokens", shown="32768 (Ollama)",
    ),
    Option(
        "client_window", "--client-window", ("CLIENT_CONTEXT_WINDOW",), None,
        "the window Claude Code is told with CLAUDE_CODE_AUTO_COMPACT_WINDOW (`run` sets both): reported input "
        "tokens are scaled from each model's window to it, so /context shows the true fraction",
        parse=_tokens, check=_window, unit="tokens",
    ),
    Option(
        "scale_usage", "--scale-usage", ("SCALE_USAGE",), False,
        "report input tokens scaled so that Claude Code, with the window it assumes for the model name (1M or "
        "200k), compacts at 75% of the backend model's window (`run` does this by itself); reported usage is then "
        "no longer raw",
        switch=True,
    ),
    Option(
        "fetch_images", "--fetch-images", ("FETCH_IMAGES",), False,
        "for Ollama (it accepts only base64), download image URLs in requests (http/https, at most 20 MiB each); "
        "off by default: the proxy then fetches URLs chosen by its clients",
        switch=True,
    ),
    Option(
        "send_user_id", "--send-user-id", ("SEND_USER_ID",), False,
        "pass the client's metadata.user_id (Claude Code's device and session ids) to OpenAI-compatible backends "
        "as `user`; off by default (map entries may set send_user_id)",
        switch=True,
    ),
    Option(
        "shutdown_grace", "--shutdown-grace", ("SHUTDOWN_GRACE",), 3.0,
        "on SIGINT/SIGTERM, seconds that requests in flight get to finish before they are ended with an "
        "overloaded error the client retries (the proxy exits at most 2 s later)",
        parse=_number, unit="s",
    ),
    Option(
        "text_tool_calls", "--text-tool-calls", ("TEXT_TOOL_CALLS",), True,
        "turn tool calls that a model writes as text (Hermes/Qwen <tool_call>, Qwen3-Coder/GLM XML, "
        "<function_calls>, Mistral [TOOL_CALLS], a bare JSON call) into tool_use blocks; per model: map "
        "text_tool_calls",
        switch=True,
    ),
    Option(
        "check", "--check", (), False,
        "contact the backend, send a one-token request for each mapped model, print what works, exit non-zero "
        "on failure",
        switch=True, shown="",
    ),
    # set only through Config(...): no flag, no environment variable
    Option("connect_timeout", None, (), 10.0, "seconds to connect to the backend", check=_positive),
    Option("ping_interval", None, (), 10.0, "seconds without a write before a stream gets a ping", check=_positive),
    Option("discover", None, (), True, "ask the backend for its models when no map or default model applies"),
)  # fmt: skip


@dataclass(frozen=True)
class Route:
    """Where one client model name goes: a backend model on a provider, with its limits."""

    model: str
    provider: str
    base_url: str
    api_key: Optional[str] = None
    max_tokens: Optional[int] = None  # cap for the request's max_tokens
    context_window: Optional[int] = None
    reasoning_history: Optional[bool] = None  # send thinking back as reasoning_content; None: provider default
    send_user_id: bool = False  # pass metadata.user_id on as `user` (Claude Code's device and session ids)
    text_tool_calls: Optional[bool] = None  # recognise tool calls written as text; None: --text-tool-calls
    tool_calls: str = "native"  # native: the backend's `tools`; prompt: definitions in the system prompt


def _one_authorization(where: str, base_url: str, api_key: Optional[str], key_from: str) -> None:
    """A backend gets one Authorization header: aiohttp refuses both (ValueError, a 500 on every request)."""
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    if api_key and (parts.username or parts.password):
        raise ConfigError(
            f"{where} has user:password@ in it and {key_from} is set, but a backend takes only one "
            "Authorization header: use one of them (the key is sent as Bearer, user:password as Basic)"
        )


class _ConfigRules:
    """Config's behaviour; its fields (one per OPTIONS entry, and `environ`) are added by make_dataclass below."""

    def __post_init__(self) -> None:  # every check of every setting, for main(), create_app() and Config(...)
        for option in OPTIONS:
            option.validate(getattr(self, option.name))
        self.base_url = (self.base_url or DEFAULT_BASE_URLS[self.provider]).rstrip("/")
        _one_authorization("--base-url", self.base_url, self.api_key, "--api-key")
        self.routes = {name: self._route_of(name, entry) for name, entry in self.model_map.items()}

    def _route_of(self, name: str, entry: Any) -> Route:
        where = f"model map entry {name!r}"
        if isinstance(entry, str) and entry:
            return self.default_route(entry)
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise ConfigError(f'{where}: must be a backend model name or an object with a "model" string')
        unknown = set(entry) - set(MODEL_MAP_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        provider = entry.get("provider", self.provider)
        if provider not in PROVIDERS:
            raise ConfigError(f"{where}: unknown provider {provider!r}")
        for key in ("max_tokens", "context_window"):
            value = entry.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where}: {key} must be a positive integer")
        if isinstance(entry.get("context_window"), int) and _window(entry["context_window"]):
            raise ConfigError(f"{where}: {_window(entry['context_window'])} (the same check as --context-window)")
        for key in ("reasoning_history", "send_user_id", "text_tool_calls"):
            if key in entry and not isinstance(entry[key], bool):
                raise ConfigError(f"{where}: {key} must be true or false")
        if entry.get("tool_calls", "native") not in TOOL_CALL_MODES:
            raise ConfigError(f'{where}: tool_calls must be "native" or "prompt"')
        base_url = (
            entry.get("base_url") or (self.base_url if provider == self.provider else DEFAULT_BASE_URLS[provider])
        ).rstrip("/")
        api_key = self.api_key if base_url == self.base_url else None  # never the main key to another host
        if entry.get("api_key_env"):
            api_key = self.environ.get(entry["api_key_env"])
            if api_key is None:
                raise ConfigError(f"{where}: environment variable {entry['api_key_env']} is not set")
            _one_authorization(f"{where}: base_url", base_url, api_key, f"api_key_env {entry['api_key_env']}")
        return Route(
            entry["model"],
            provider,
            base_url,
            api_key,
            entry.get("max_tokens"),
            entry.get("context_window"),
            entry.get("reasoning_history"),
            entry.get("send_user_id", self.send_user_id),
            entry.get("text_tool_calls"),
            entry.get("tool_calls", "native"),
        )

    def default_route(self, model: str) -> Route:
        return Route(model, self.provider, self.base_url, self.api_key, send_user_id=self.send_user_id)


def _config_field(option: Option) -> tuple[str, str, Any]:
    default = option.default
    kind = "Optional[str]" if default is None else type(default).__name__
    if isinstance(default, (dict, list)):
        return option.name, kind, field(default_factory=lambda: _fresh(default))
    return option.name, kind, field(default=default)


Config = dataclasses.make_dataclass(
    "Config",
    [
        *(_config_field(option) for option in OPTIONS),
        # where a map entry's api_key_env is looked up (load_config passes os.environ or its environ, and .env)
        ("environ", "Mapping[str, str]", field(default_factory=dict, repr=False, compare=False)),
    ],
    bases=(_ConfigRules,),
    namespace={"__module__": __name__, "__doc__": "The settings: one field per OPTIONS entry. Raises ConfigError."},
)


_DATE_SUFFIX = re.compile(r"-\d{8}$")
_GLOB_CHARS = re.compile(r"[*?\[]")


def model_family(model: str) -> str:
    lowered = model.lower()
    for family in ("haiku", "sonnet", "opus"):
        if family in lowered:
            return family
    return "*"


def resolve_route(
    config: Config,
    model: str,
    discovered: Optional[dict[str, str]] = None,
    backend_models: Union[list[str], set[str], tuple[str, ...]] = (),
) -> Optional[Route]:
    """Client model name -> Route. An exact map key first; then a backend model by its own name (one the
    map sends somewhere, with that entry's settings, or one the backend lists, as is); then the first
    matching pattern, the default model, and last the zero-config pick. None: nothing maps it."""
    routes = config.routes
    for name in (model, _DATE_SUFFIX.sub("", model)):
        if name in routes and not _GLOB_CHARS.search(name):
            return routes[name]
    for route in routes.values():
        if route.model == model:
            return route
    if model in backend_models:
        return config.default_route(model)
    for pattern, route in routes.items():
        if _GLOB_CHARS.search(pattern) and fnmatch.fnmatchcase(model, pattern):
            return route
    if config.default_model:
        return config.default_route(config.default_model)
    if discovered:
        pick = discovered.get(model_family(model)) or discovered.get("*")
        if pick:
            return config.default_route(pick)
    return None


def pick_models(models: list[dict[str, Any]]) -> dict[str, str]:
    """Zero-config choice among the backend's models: haiku-class requests get the smallest model,
    the rest the first one the backend lists (Ollama lists the most recently pulled first)."""
    names = [m["name"] for m in models if m.get("name")]
    if not names:
        return {}
    sized = [(m.get("size") or 0, m["name"]) for m in models if m.get("name")]
    smallest = min(sized)[1] if all(size for size, _ in sized) else names[0]
    return {"*": names[0], "opus": names[0], "sonnet": names[0], "haiku": smallest}


def base_url_hint(provider: str, base_url: str, status: Optional[int]) -> str:
    """What a wrong base URL most likely is, from the provider and the status of its model list ("" if nothing)."""
    root, v1 = re.sub(r"/v1/?$", "", base_url), re.search(r"/v1/?$", base_url) is not None
    if status == 200:
        return ""
    if provider == "ollama" and v1:
        return f"the ollama provider takes the server's root: --base-url {root} (a /v1 URL is for --provider openai)"
    if status != 404:
        return ""
    if provider == "openai" and not v1:
        return (
            f"OpenAI-compatible servers answer under /v1: try --base-url {base_url}/v1 (or --provider ollama if "
            "this is Ollama's own API)"
        )
    if provider == "ollama":
        return "this is not Ollama's API (no /api/tags): for an OpenAI-compatible server use --provider openai"
    return "is this the server's OpenAI-compatible URL? (it has no /models)"


_CLAUDE_NAME = re.compile(r"claude-(?:\d+(?:-\d+)*-)?(?:opus|sonnet|haiku)(?:-\d+)*(?:-\d{8})?(?:\[1m\])?")


_CLAUDE_FAMILIES = ("opus", "sonnet", "haiku")


def unlikely_claude_keys(names: list[str]) -> dict[str, str]:
    """Model-map keys that look like Claude names but match nothing Claude Code sends (`claude-opus-5.5`,
    `claude-sonnet_4`, `Claude-Opus-5`, `claude-opsu-5-5`) -> the name most likely meant ("" if unclear)."""
    out = {}
    for name in names:
        if not name.lower().startswith("claude") or _GLOB_CHARS.search(name) or _CLAUDE_NAME.fullmatch(name):
            continue
        guess = re.sub(r"[._ ]", "-", name.lower())
        words = [
            (difflib.get_close_matches(w, _CLAUDE_FAMILIES, 1, 0.6) or [w])[0] if w.isalpha() else w
            for w in guess.split("-")
        ]
        guess = "-".join(words)
        out[name] = guess if _CLAUDE_NAME.fullmatch(guess) else ""
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="claude_proxy.py",
        description="Serve Anthropic's Messages API (for Claude Code and the Anthropic SDKs) on top of an "
        "OpenAI-compatible or Ollama backend. Each option can also be set by the environment "
        "variable in brackets, or in a .env file in the working directory (flags win, then the "
        "environment, then .env, then the defaults). `claude_proxy.py [options] run [claude arguments...]` "
        "starts Claude Code on the proxy (see README: Context windows).",
    )
    for option in OPTIONS:
        if option.switch and option.flag:  # a switch that is on by default also gets --no-...
            action = argparse.BooleanOptionalAction if option.default else "store_true"
            p.add_argument(option.flag, dest=option.name, action=action, default=None, help=option.help_text())
        elif option.flag:
            p.add_argument(
                option.flag,
                dest=option.name,
                metavar=option.flag[2:].upper().replace("-", "_"),
                help=option.help_text(),
            )
    p.add_argument("--version", action="version", version=f"claude-proxy {__version__}")
    return p


def load_config(
    argv: Optional[list[str]] = None, environ: Optional[typing.Mapping[str, str]] = None, dotenv_path: str = ".env"
) -> Config:
    """Flags, then environment (default: os.environ), then .env, then defaults. Raises ConfigError on bad values."""
    given = vars(build_parser().parse_args(argv))
    env = dict(os.environ if environ is None else environ)
    if dotenv_path and os.path.isfile(dotenv_path):
        for key, value in parse_dotenv(_read_file(dotenv_path, "environment file")).items():
            env.setdefault(key, value)
    return Config(**{option.name: option.value(given.get(option.name), env) for option in OPTIONS}, environ=env)


# ======================================================================================
# 3. WIRE TYPES AND VALIDATION
# ======================================================================================
# Requests are parsed into dataclasses by one generic function, `parse_as`, driven by the
# field types. Unknown fields are ignored (clients send new betas all the time); a missing or
# mistyped field is a 400 whose message names the path, e.g. `messages.1.content.0.source`.

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}


class ApiError(Exception):
    """An error the client sees in Anthropic's shape: an HTTP error, or `event: error` mid-stream.
    `kind` names a failure that is not the client's own mistake (the backend's, the network's, the
    proxy's): `unreachable`, `connect_timeout`, `no_answer`, `stalled`, `connection_lost`, `malformed`,
    `truncated`, `oversized`, `stream_error`, `too_long`, `http_<backend status>`, `shutdown`, `internal`. Metrics
    and logs read it; None for requests the client got wrong (validation, auth, unknown model)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: Optional[str] = None,
        retry: Optional[bool] = None,
        retry_after: Optional[str] = None,
        kind: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = error_type or ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.retry = retry  # -> x-should-retry; None leaves the decision to the client's policy
        self.retry_after = retry_after
        self.kind = kind

    def body(self, request_id: Optional[str] = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "error", "error": {"type": self.type, "message": self.message}}
        if request_id:
            out["request_id"] = request_id
        return out

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry is not None:
            headers["x-should-retry"] = "true" if self.retry else "false"
        if self.retry_after:
            headers["retry-after"] = self.retry_after
        return headers


def too_deep(exc: BaseException) -> bool:
    """JSON nested deeper than the encoder goes (orjson stops at 255 levels, json at the recursion limit)."""
    return isinstance(exc, RecursionError) or "ecursion" in str(exc)


TOO_DEEP = ApiError(
    400, f"the request nests JSON too deeply (objects and arrays deeper than {MAX_JSON_DEPTH} levels)", retry=False
)


def invalid(path: str, message: str) -> ApiError:
    return ApiError(400, f"{path}: {message}" if path else message, retry=False)


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


_PARSERS: dict[Any, Any] = {}


def parse_as(tp: Any, value: Any, path: str) -> Any:
    """Validate `value` against the type `tp` and build it. Raises ApiError(400) naming `path`."""
    return _parser(tp)(value, path)


def _parser(tp: Any) -> Any:
    parser = _PARSERS.get(tp)
    if parser is None:
        parser = _PARSERS[tp] = _compile(tp)
    return parser


def _compile(tp: Any) -> Any:
    """A type -> a function (value, path) -> parsed value; built once per type from its hints."""
    if tp is Any:
        return lambda value, path: value
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = [
            (
                f.name,
                f.metadata.get("parse") or _parser(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(tp)
            if f.init
        ]
        has_check = hasattr(tp, "check")

        def parse_dataclass(value: Any, path: str) -> Any:
            if not isinstance(value, dict):
                raise invalid(path, f"expected an object, got {_kind(value)}")
            kwargs = {}
            for name, parse, required in fields:
                if name in value:
                    kwargs[name] = parse(value[name], f"{path}.{name}" if path else name)
                elif required:
                    raise invalid(f"{path}.{name}" if path else name, "field required")
            obj = tp(**kwargs)
            if has_check:
                obj.check(path)
            return obj

        return parse_dataclass
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        inner = _parser(next(a for a in args if a is not type(None)))
        return lambda value, path: None if value is None else inner(value, path)
    if origin is list:
        item = _parser(args[0])

        def parse_list(value: Any, path: str) -> list[Any]:
            if not isinstance(value, list):
                raise invalid(path, f"expected a list, got {_kind(value)}")
            return [item(v, f"{path}.{i}") for i, v in enumerate(value)]

        return parse_list
    if origin is Literal:

        def parse_literal(value: Any, path: str) -> Any:
            if value not in args:
                raise invalid(path, f"expected one of {', '.join(map(repr, args))}, got {value!r}"[:300])
            return value

        return parse_literal
    kinds = {
        dict: (dict, "an object"),
        bool: (bool, "a boolean"),
        int: (int, "an integer"),
        float: ((int, float), "a number"),
        str: (str, "a string"),
    }
    accepted, name = kinds[origin or tp]

    def parse_value(value: Any, path: str) -> Any:
        if not isinstance(value, accepted) or (isinstance(value, bool) and tp in (int, float)):
            raise invalid(path, f"expected {name}, got {_kind(value)}")
        return float(value) if tp is float else value

    return parse_value


IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


@dataclass
class TextBlock:
    text: str
    type: str = "text"


@dataclass
class ImageSource:
    type: Literal["base64", "url", "file"]
    media_type: Optional[str] = None
    data: Optional[str] = None
    url: Optional[str] = None
    file_id: Optional[str] = None

    def check(self, path: str) -> None:
        if self.type == "base64":
            if self.media_type not in IMAGE_MEDIA_TYPES:
                raise invalid(
                    f"{path}.media_type", f"expected one of {', '.join(IMAGE_MEDIA_TYPES)}, got {self.media_type!r}"
                )
            if not isinstance(self.data, str) or not self.data:
                raise invalid(f"{path}.data", "field required (base64 image data)")
        elif self.type == "url" and not self.url:
            raise invalid(f"{path}.url", "field required")
        elif self.type == "file":
            raise invalid(
                f"{path}",
                "file sources need Anthropic's Files API, which this proxy does not have; "
                "send the image as base64 or url",
            )


@dataclass
class ImageBlock:
    source: ImageSource
    type: str = "image"


def _parse_document_content(value: Any, path: str) -> Any:
    if isinstance(value, str):
        return [TextBlock(value)]
    return parse_blocks(value, path, USER_BLOCKS)


@dataclass
class DocumentSource:
    type: Literal["base64", "text", "content", "url", "file"]
    media_type: Optional[str] = None
    data: Optional[str] = None
    url: Optional[str] = None
    content: Any = field(default=None, metadata={"parse": _parse_document_content})

    def check(self, path: str) -> None:
        if self.type == "text" and not isinstance(self.data, str):
            raise invalid(f"{path}.data", "field required (the document's text)")
        if self.type == "content" and self.content is None:
            raise invalid(f"{path}.content", "field required")
        if self.type in ("base64", "url", "file"):
            what = "PDF" if self.type != "base64" or self.media_type == "application/pdf" else repr(self.media_type)
            raise invalid(
                path,
                f"{what} documents ({self.type} source) cannot be read by the backend model: "
                "the proxy passes documents on as text only; send the document's text "
                '(source type "text" or "content")',
            )


@dataclass
class DocumentBlock:
    source: DocumentSource
    title: Optional[str] = None
    context: Optional[str] = None
    type: str = "document"


@dataclass
class SearchResultBlock:
    source: str
    title: str
    content: list[TextBlock]
    type: str = "search_result"


@dataclass
class ToolUseBlock:
    id: str
    name: str
    input: dict[str, Any]
    type: str = "tool_use"


@dataclass
class ToolReferenceBlock:
    tool_name: str
    type: str = "tool_reference"


def _parse_tool_result_content(value: Any, path: str) -> list[Any]:
    if isinstance(value, str):
        return [TextBlock(value)] if value else []
    return parse_blocks(value, path, TOOL_RESULT_BLOCKS)


@dataclass
class ToolResultBlock:
    tool_use_id: str
    content: list[Any] = field(default_factory=list, metadata={"parse": _parse_tool_result_content})
    is_error: Optional[bool] = None
    type: str = "tool_result"


@dataclass
class ThinkingBlock:
    thinking: str
    signature: Optional[str] = None
    type: str = "thinking"


@dataclass
class RedactedThinkingBlock:
    data: str
    type: str = "redacted_thinking"


@dataclass
class OpaqueBlock:
    """Anthropic-only history blocks (server tool calls and results, compaction, ...): the backend
    cannot use them, so they reach it as a short text note, never silently."""

    type: str
    raw: dict[str, Any] = field(default_factory=dict)


SERVER_BLOCK_TYPES = ("server_tool_use", "mcp_tool_use", "mcp_tool_result", "container_upload", "compaction")
USER_BLOCKS = {
    "text": TextBlock,
    "image": ImageBlock,
    "document": DocumentBlock,
    "tool_result": ToolResultBlock,
    "search_result": SearchResultBlock,
}
ASSISTANT_BLOCKS = {
    "text": TextBlock,
    "tool_use": ToolUseBlock,
    "thinking": ThinkingBlock,
    "redacted_thinking": RedactedThinkingBlock,
}
SYSTEM_BLOCKS = {"text": TextBlock}
TOOL_RESULT_BLOCKS = {
    "text": TextBlock,
    "image": ImageBlock,
    "document": DocumentBlock,
    "search_result": SearchResultBlock,
    "tool_reference": ToolReferenceBlock,
}


def parse_blocks(value: Any, path: str, allowed: dict[str, type]) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(path, f"expected a string or a list of content blocks, got {_kind(value)}")
    blocks = []
    for i, item in enumerate(value):
        sub = f"{path}.{i}"
        if not isinstance(item, dict):
            raise invalid(sub, f"expected a content block object, got {_kind(item)}")
        kind = item.get("type")
        if not isinstance(kind, str):
            raise invalid(f"{sub}.type", "field required")
        cls = allowed.get(kind)
        if cls is not None:
            blocks.append(parse_as(cls, item, sub))
        elif kind in SERVER_BLOCK_TYPES or kind.endswith("_tool_result") and kind != "tool_result":
            blocks.append(OpaqueBlock(kind, item))
        else:
            raise invalid(
                f"{sub}.type", f"block type {kind!r} is not allowed here; expected one of {', '.join(sorted(allowed))}"
            )
    return blocks


@dataclass
class Message:
    role: Literal["user", "assistant", "system"]
    content: Any

    @classmethod
    def parse(cls, value: Any, path: str) -> Message:
        if not isinstance(value, dict):
            raise invalid(path, f"expected a message object, got {_kind(value)}")
        role = parse_as(Literal["user", "assistant", "system"], value.get("role"), f"{path}.role")
        if "content" not in value:
            raise invalid(f"{path}.content", "field required")
        content = value["content"]
        if isinstance(content, str):
            blocks = [TextBlock(content)]
        else:
            allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS if role == "assistant" else SYSTEM_BLOCKS
            blocks = parse_blocks(content, f"{path}.content", allowed)
        return cls(role, blocks)


def _parse_messages(value: Any, path: str) -> list[Message]:
    if not isinstance(value, list):
        raise invalid(path, f"expected a list, got {_kind(value)}")
    if not value:
        raise invalid(path, "at least one message is required")
    return [Message.parse(item, f"{path}.{i}") for i, item in enumerate(value)]


def _parse_system(value: Any, path: str) -> list[TextBlock]:
    if value is None:
        return []
    if isinstance(value, str):
        return [TextBlock(value)] if value else []
    return parse_blocks(value, path, SYSTEM_BLOCKS)


@dataclass
class Tool:
    name: str
    description: Optional[str] = None
    input_schema: Optional[dict[str, Any]] = None
    type: Optional[str] = None
    defer_loading: Optional[bool] = None
    strict: Optional[bool] = None

    def check(self, path: str) -> None:
        if not self.name:
            raise invalid(f"{path}.name", "must not be empty")
        if self.is_custom and self.input_schema is None:
            raise invalid(f"{path}.input_schema", "field required")

    @property
    def is_custom(self) -> bool:
        return self.type in (None, "custom")


@dataclass
class ToolChoice:
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = None
    disable_parallel_tool_use: Optional[bool] = None

    def check(self, path: str) -> None:
        if self.type == "tool" and not self.name:
            raise invalid(f"{path}.name", 'field required when type is "tool"')


@dataclass
class Thinking:
    type: str
    budget_tokens: Optional[int] = None
    display: Optional[str] = None

    def check(self, path: str) -> None:
        if self.budget_tokens is not None and self.budget_tokens < 0:
            raise invalid(f"{path}.budget_tokens", "must be >= 0")


@dataclass
class OutputConfig:
    effort: Optional[str] = None
    format: Optional[dict[str, Any]] = None


@dataclass
class Metadata:
    user_id: Optional[str] = None


@dataclass
class MessagesRequest:
    """POST /v1/messages (and count_tokens, which has no max_tokens)."""

    model: str
    messages: list[Message] = field(metadata={"parse": _parse_messages})
    max_tokens: Optional[int] = None
    system: list[TextBlock] = field(default_factory=list, metadata={"parse": _parse_system})
    stream: Optional[bool] = None
    stop_sequences: Optional[list[str]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    metadata: Optional[Metadata] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    thinking: Optional[Thinking] = None
    output_config: Optional[OutputConfig] = None

    def check(self, path: str) -> None:
        if not self.model.strip():
            raise invalid("model", "must not be empty")
        if len(self.model) > 256 or any(ord(c) < 32 for c in self.model):
            raise invalid("model", "must be a model name of at most 256 printable characters")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise invalid("max_tokens", "must be >= 0")
        if self.top_k is not None and self.top_k < 0:
            raise invalid("top_k", "must be >= 0")


def parse_request(body: Any, *, count_only: bool = False) -> MessagesRequest:
    if not isinstance(body, dict):
        raise invalid("", f"request body must be a JSON object, got {_kind(body)}")
    req = parse_as(MessagesRequest, body, "")
    if not count_only and req.max_tokens is None:
        raise invalid("max_tokens", "field required")
    return req


# ======================================================================================
# 4. TOKENS
# ======================================================================================
# A heuristic counter (no tokenizer download, no backend call), calibrated against a BPE
# tokenizer (cl100k). count_request_tokens (end of section 4) counts what the backend receives.

# ---------------------------------------------------------------------------
# Token estimation (pure stdlib, no tokenizer download).
#
# count_text_tokens() approximates the cl100k_base token count of a text.
# cl100k first splits text into "pieces" with a regex (a word with an optional
# one-character prefix, digit groups of <= 3, punctuation runs, whitespace
# runs) and then BPE-encodes each piece.  Nearly every piece is exactly one
# token; the exceptions are long/rare words, random-looking mixed-case strings
# and non-Latin scripts.  We count those pieces without a per-character Python
# loop: bytes.translate() maps every character to a byte of class bits, the
# result is read as one big int, neighbour tests ("letter preceded by a
# non-letter") become shifts and ANDs of that int, and int.bit_count() counts
# the hits: ~3.5 ms per 200 KB (7-9 ms in other languages).  Other languages: non-ASCII characters are
# counted per script from their UTF-8 lead byte (a second translate()), a few
# scripts that share a lead byte by a 2-byte prefix; Latin-script text that is
# not English (told by how rarely "th" occurs) pays for its consonant clusters,
# since cl100k splits its words more.  Three small tables read from cl100k's
# vocabulary (bench/cl100k_tables.mjs) tell the one-token CJK ideographs and
# Hangul syllables (the common ones) and accented Latin words ("contraseña")
# from the rest, which cost more.  The weights in _TOKEN_WEIGHTS were fitted
# (bench/fit_token_weights.py) against tiktoken's cl100k_base on
# fixtures/token_corpus.json (prose, code, JSON, shell output, CJK, base64/hex
# noise) and fixtures/token_corpus_i18n.json (21 languages, mixed text).
# ---------------------------------------------------------------------------
# Class bits of the per-character byte ("lanes" of the big int below).
_L, _U, _D, _S, _N, _P, _PS, _V = 1, 2, 4, 8, 16, 32, 64, 128
# _PS: punctuation or space; _V: vowel (or non-ASCII letter), i.e. not a consonant


def _char_class(i: int) -> int:
    """Class bits for an ASCII byte or a UTF-8 lead byte."""
    if 65 <= i <= 90:
        return _L | _U | (_V if chr(i) in "AEIOUY" else 0)  # A-Z
    if 97 <= i <= 122:
        return _L | (_V if chr(i) in "aeiouy" else 0)  # a-z
    if 48 <= i <= 57:
        return _D
    if i in (9, 11, 12, 32):
        return _S | _PS  # horizontal whitespace
    if i in (10, 13):
        return _N
    if i < 128 or i == 0xE2 or i == 0xC2:
        return _P | _PS  # ASCII punctuation; U+2000-2FFF quotes, dashes, arrows; U+0080-00BF: « » ° NBSP
    if 0xC3 <= i <= 0xDF:
        return _L | _V  # 2-byte chars: accented Latin, Cyrillic, Greek, Arabic...
    return 0  # CJK, kana, Hangul, Indic, emoji (counted separately)


def _wide_class(i: int) -> int:
    """Second table, for non-ASCII text only: the script of a UTF-8 lead byte (one letter per script)."""
    if 0xC3 <= i <= 0xCB:
        return ord("a")  # accented Latin (U+00C0-02FF)
    if 0xCC <= i <= 0xCD:
        return ord("m")  # combining diacritics (decomposed accents)
    if 0xCE <= i <= 0xCF:
        return ord("g")  # Greek
    if 0xD0 <= i <= 0xD4:
        return ord("y")  # Cyrillic
    if 0xD6 <= i <= 0xD7:
        return ord("h")  # Hebrew
    if 0xD8 <= i <= 0xDB:
        return ord("r")  # Arabic
    if i == 0xE3:
        return ord("k")  # kana, CJK punctuation
    if 0xE4 <= i <= 0xE9:
        return ord("c")  # CJK ideographs
    if 0xEA <= i <= 0xED:
        return ord("K")  # Hangul syllables
    if 0xD5 <= i <= 0xDF:
        return ord("o")  # Armenian, Syriac, Thaana, ... (2 bytes)
    if i in (0xE0, 0xE1, 0xEE, 0xEF):
        return ord("x")  # Indic, Thai, Georgian, fullwidth forms, ... (3 bytes; Devanagari and Thai also below)
    return ord(".")  # ASCII, U+2000-2FFF punctuation (0xE2), emoji (0xF0, counted apart)


# Two-byte prefixes (lead + first continuation byte) of a few scripts whose lead byte they share with others.
_DEVANAGARI = (b"\xe0\xa4", b"\xe0\xa5")  # U+0900-097F
_THAI = (b"\xe0\xb8", b"\xe0\xb9")  # U+0E00-0E7F
_VIETNAMESE = (b"\xe1\xba", b"\xe1\xbb")  # U+1E80-1EFF: ạ ả ấ ầ ẩ ẫ ậ ... ỹ
_UKRAINIAN = ("і", "ї", "є", "І")  # letters that Russian lacks: Ukrainian words split more
_DOUBLE_VOWELS = ("aa", "ee", "oo", "uu")  # Dutch/German-looking letter groups, in non-English text

# Vocabulary tables read from cl100k's ranks (bench/cl100k_tables.mjs, packed by fit_token_weights.py --tables).
# A bitmap of the CJK ideographs (U+4E00-9FFF) and Hangul syllables (U+AC00-D7A3) that are one token: the
# common ones (~80% of the ideographs of real text); any other costs 2-3 byte tokens.
_CL100K_ONE_CHAR = (
    "c-pmAy>1jS5T2QHA``Cgo`MunO@QKrDDD9$oNxsaR8%PsiGm7=H*nAup*vBfjCckfAfn_+cnmyV?~ga@>?Uj`%I(@-kLUa5o7p}8q7TgrHHXLG"
    "ECARuqjyKJh4&Vh=6Xp0dnog~T==U44cgC%G06rF_a^=~=8_R;znP0auvr1Mrso#iGdMV@{D@u55NgK^*K$#GawT5CmYy%vt5ek5?+9NB?4>*b"
    "=>NEif-pVbcH-%^bkAEq+yo?us$SBS!|<!h!J@rp+YWbZm7_(qnN`=%XgkN?_$jRS!BRYAVV(G<09~#$-l5(2@aGBgGY9Un4M6QVj*CnGG{MTa"
    "fN&WT?9XFYp>Yk5+~{C{`8OrSI=HZcgQH`yZ!JK|mXtHzOjcst89V#Ce7ulg$U7jpITj#RhX_@VW<}EY+|ND%<)iaL1?Oi>`<QZzE4ty}9WqP9"
    ">jC-eS~MIYi427}RT)Y}oesB65V2<6jllRuxCr+)-4BV{iprS7aq@Nb!?8$*qw?bVsY72-!w5{mx<NY1>zBJg^Dx(4YKiw{Lc`~za#V{;LKoRH"
    "^+CQq+$}U|-ItNQJErkk)aCS#6jW4U2jffA)XIoTOigveRh<+OJeawO{h2hs8Q_j0<PRRH+#)8b7{i)x`nX;I^QWs_lJFc`e;LR`&^(5N%)80%"
    "WcxvUozC6~;2FX8QFoKATM1_g`9%+x*+!$jUXu3Xq(o|seKe5;`K~}XY&qFft)qoX4HCtkXF48u?GEeczZ>xsHZDH}D3iQ9!U#F0-(;}W8*qB4"
    "nCV5M3z-`)g!wd4O+n_7BHtIM=`toMt<@0M607O|TCXR$KlM23i&;D*GpioG49R{9mJo>Qj#H%(Z{ej+0V|w1ap^?_X8My#MK@gI6DJ#r70i;V"
    "T9hNqLdn+cL-rVRpGBPbSTn3T7@%iTD-g|XJqt${!aoruPW="
)
# Words with an accented Latin letter that are one token ("contraseña", "número", "für"), lowercased, >= 3 letters:
# their accented letters do not cost the extra that rarer words pay.
_CL100K_ACCENTED = (
    "c-l=^%W~s37X20c8bm@8ED~S?q}<jrk4nw5YgS#Uscy&ahdfax9rdUjTeE`P|KUHGbMA$lY|gm^LEr+oFVN0>=f|=&wrPCX2XLj>54L<Uwsn2E"
    "&c@EmF&TSt`ca@Uwp)}3bnN<a0G4eJJbih3XKZiBa-YcMO9Yi|@{Kh%w23o?P`0iT1`g|T8(MI=?uehzbLj9v)nrKJGrA3B4}3M1ov~>wyJqSz"
    "b}H9|9ll8?Xq#R60y(o+X2a-09cN5-UA7oQmJ3)A_X5ddtnu`{vC|l_-tk3%9=!{rV*|h2uv7U|ZlchCxdNF|mI~lA_GM<V6EhdeVKlR=(@%h>"
    "?*yWmaYJY2L+gNBYy;?!01x@q<XUTHr?;)Z#yer``t14PI+zCMumvXDj1KG0R4}7KRcb6IsVCVi*>m~)_z%<gaV+l*+f9AB%H@N>A-nR)oX?tE"
    "wj(&W*V-)xY@2Rs6Lb01G(19r9eoTUwSq30W^;OLnsVI$ww-{Vf%dImL~>938WzM+fP+0h;>cSyuoj1ToH+{RooQXuajBw9>r(LLb8?XKF!3l`"
    "cS0vW=bk7foYmh%oX%elBExVh`3^#Ib+=m2RaUZXOjV4gjnz`y$l0c+qrtgwquX+eZnVy}Y-iI*Y6SQ>X{xkNURvga3mipDe*p{vFle%jBhuP+"
    "ad;8_Cb?b~NP{Qv3+$T1IbnB=>s&J?EXOwy57-sgJ-spN!DmOn05laRo<^)sJL6I{BbQ(nq*YgLL2&T}sO(3Bt+(<ni^(Y2%CV#1nzEZi7~z|O"
    "L5SnR3^5*U(M>51RPgn{@BrnUnPX%D7}h*76jZW4|0TI9MrkY`*tdLKt=L|UW<J$*LeSOBCz#S4W{DG@mk$ZB!>4q)IpY)|!^2^K3&K($DUPII"
    "#5fl=HQf1yTjJvp3=J0^t68LoIRss$0A~Ei<X;*#W4VBXfOLnt3o5ig6cAt!p=3Kq2fo7WOFQGdOXu;~(r1P(rR33E-ovGqG)BNEfaNSDIQe>{"
    "Vz2~j{5e{9-6-#1(tiFDaYd{><{m2fUQ&dI87*AkpkW?Uf9|diH5mFJU5UwMKCf~3esS)M0FKuT+dgYcW&=&a(>MsD(fLNYgkS5+&3S~)SvQ4G"
    "J`nZcbMK7C2tjcckuVPTSVp*robn=0NfOZoJ$hvcu*~}_vsy}wS}mU+wv!PTASAQmz7vvFa!UB5>@NX_E)W%htBkV%Zvgj52ur&TrW51tBxebt"
    "$vYgbAd=q_((~g_lflH$1(@>)+EU&j6q16opg-jOesCMmAsZy&mFbWzyy+!h_qN8(9`?(m&}+u*B}4X-4|{tRYa`q_fFlB1hi@V_hM;2Sh1j87"
    "CnJFc@Y*A^_vHqi%5B>$v2+NbqGQKf!bc?fo*AR(N_s{+!csA|PK4NUu<dI`vA*2(Y~2L`o#)UjM|WnvI4oq(&ce!h4*ZY>SbOy4*ma`EF;w-A"
    "Ig_6sfA%I|6OKv72)6vk1lPcLu|m`Z0d}w(Oz=Sp9_%HPeDK(p5TAZ-ybv;cm{{rHgYy0ga6{>qBN8(e4cvu5j}PS|VasXGY>|y1@7eIsI~hqh"
    "o2dCZHs#Jl#+5lpTDo>ZR*GF*@bqFgsh31p#KOdY9BkrH+j7~@%-QVYrG?JAfWc<E1VT6hqaYlnel;MEu-JMLEF`rfaHh2ntV9%fbORlyHv^20"
    "@TVC%)J{nFLu|#yhPXodLy#Y!=5DOSV;Ulq`&tPq#9U((C3SL0sP2#r%>V~i!yYtW4Jpn#i2;z>sb=<p!A6V7fgzaC2x>!SkPyMQRon{<f-r4+"
    "7B~fBwiX}2Kg@uT=-~~L#DM=!fQOktCo57RnpczUG`Ll1Ya|vDX09>Gbv43K(zPb1YF4IpNmra$%84BS1_6()XI<7QBJpsc6JKswASJpSfpr^r"
    "h;T+_<W!x9lh{dk>c%tMQC>}%wC6|r%b+N^1CrpeS($7l0c3=j_rUT1pUxI0nqe{r#ZU=vocL6BY3+G}XCYI<u@P_Bthqu;wCu;J?o_6UWsj;e"
    "_i%<B(Y%%E2Q~IQV8h||V4S(2#|9yD^2!1FKtK%uJdP&AW@sn*3eU77gn$`}K{6aUi!R*MR7s8zBI_=0YnECDwC~vSe!;oR{YvN&@ceKS%xG7P"
    "r(?Y!foGDPD6lRZS&dl`c6DTSUy`<jyPnAObiU4v3FReUCgiD6%zRWc0Nvq%N{?JVArM&@Dh*4N`jiuZW0yPjxEtBH8+pZIU^G)T$g@w?C^J=`"
    "oS0^&v(-+>cu6;O(xS~wdD37y)h<uRD}ixk)-FlqRe1^`>VdC4DqqD|DTAryT7u!ayvGaP90_y*+$Q;e7`sM{b-*n}<V?j_DVs|vr!GBoCv1ps"
    "1sX+nVJ^$<QUDi-mI6k+<c<(9<RuHLD?1>OUh&3vRgNpOX)iF)#y$OD^rEnt)Hyc12yRY4wnhp>KoY<m+ei^7XI*U$G&5p%TDrp78Ar}FSPeW_"
    "H4=YaJBa;Ig#bnXGCjL6<*^f%Kv0?Q!xaI+8>i!}B8O&KsRt&=rp%Vik0eqnW#wqJ(k<6(R|$Hs=q<mX8n+}&{R_+rH3DmGNsI&)Ic}{R%I%yF"
    "3%*!(0@AwVf^ZH1E)u|J0gerDitNFy1UN-$38t1Ja)t!9NKDlj!K#_C5paT15tQ4t^u_l^F6}U`<%DI*rK5c8P|ZPuj{+R~Q~ePF0lnm+0$drn"
    "*hq9!FQ_GR`AkJwY!Ud}I{}J;Vp8BU_wMtUDzaq_neJX=8}FMT_GE-7BR5wh0JMP?w$q{*BJQYyp5IeNiDD#gG)5p6Y2RLM&ziFlsAP1Sj$ByE"
    "_SNJE!#j(B1VRW6f&0qLD8GPA{Sl-=^5xnm!lWHvP4Y}#6K75`L1rUuWSen1+tGT}3xbdis)h*CK}PxXwI9*Q8WKT6Oi>7{VUQz;$PN9KzPGc%"
    "$i<p}2&`Z<S^(95PD<?1@_i@0STON#jH$n5%*(HtTG`ZS%F2a%Ed@;ZjjQ-gCYPcch<7Y6rK+z#PLNEX6Mvq_&EA@N!PlB!?|}LX3$>#xcTYu_"
    "qsv!X)mN^bIRix)B(b@}d@djxc@Sqfq=Co9n=S4U1UkfFEsea`mivG&@2T#e9Ici(lH&oG_<{ZiV9lf)&x|iw%$i!-o-13Ve;q@Ybp8XTKY=7@"
    "5~$vBA;_4(+c|-`0)@Tw<jl3U2e$%_$PuVFfL)TrgIer^g8*jZP&o^@u8nDK>J_0JH~i#(=zsbiGoIdj`~CUxrZK0tD{oE=;-@bSG5{`K9iS5t"
    "#|dZ!RD@-L^d)b6r!QF^PVYd-BQ4<)fNb#e-Lx=IKS1NBf5J7SN+&pAN3p*G1U|oWE5PW{>l%lTq}rHozkj=irquIaUa3CbG)j1UetZ)a{|BLn"
    "U77"
)


def _unpack_one_char(data: str) -> tuple:
    bits = zlib.decompress(base64.b85decode(data))
    chars = [[], []]
    for n, (lo, hi) in enumerate(((0x4E00, 0x9FFF), (0xAC00, 0xD7A3))):
        start = 0 if n == 0 else (0x9FFF - 0x4E00 + 8) // 8
        for j, b in enumerate(bits[start : start + (hi - lo + 8) // 8]):
            if b:
                chars[n] += [chr(lo + 8 * j + k) for k in range(8) if b >> k & 1]
    return tuple(re.compile("[" + "".join(c) + "]") for c in chars)


_CJK_ONE_TOKEN, _HANGUL_ONE_TOKEN = _unpack_one_char(_CL100K_ONE_CHAR)
_ACCENTED_WORDS = frozenset(zlib.decompress(base64.b85decode(_CL100K_ACCENTED)).decode().split())
_WORD_PUNCT = ".,;:!?()[]{}\"'«»“”‘’-/…*%<>"  # stripped from a whitespace-separated word before the lookup


# UTF-8 lead byte -> class; continuation bytes (0x80-0xBF) are deleted so that
# there is exactly one class byte per character.
_CLASS_TABLE = bytes(_char_class(i) for i in range(256))
_WIDE_TABLE = bytes(_wide_class(i) for i in range(256))
_UTF8_CONT = bytes(range(0x80, 0xC0))
_ASCII_AND_CONT = bytes(range(0xC0))
_LANE_MASKS: dict[int, tuple] = {}  # padded length (a power of two) -> lane masks
_CHUNK = 16384  # chars per big-int pass

# Weight of each feature returned by _token_features (fitted, then rounded: bench/fit_token_weights.py).
_TOKEN_WEIGHTS = (
    0.99,  # pieces: pre-tokenizer pieces that are ~always 1 token (words, digit groups, ...)
    0.0,  # words that swallowed a punctuation prefix (".append", "_name")
    -0.24,  # words preceded by a space (" the" is the cheapest kind of word)
    0.06,  # letters beyond the 8th in a word (long / rare words split)
    1.58,  # lower->Upper switches that do not start a camelCase hump (base64)
    0.0,  # consonants preceded by two consonants ("rwxr", hex, "strncpy")
    0.19,  # letters beyond the 5th in a word
    0.31,  # words ending in a vowel
    1.13,  # foreign Latin: consonant clusters (German, Dutch, Polish, Czech: "schr", "przy")
    1.47,  # foreign Latin: "ij" (Dutch)
    1.36,  # accented Latin letters
    1.84,  # combining diacritics
    0.81,  # Greek
    0.23,  # Cyrillic
    2.6,  # Ukrainian-only letters, on top of Cyrillic
    0.91,  # Hebrew
    0.58,  # Arabic
    0.21,  # Devanagari, on top of "other 3-byte"
    -0.05,  # Thai, on top of "other 3-byte"
    -0.37,  # Vietnamese letters with two accents, on top of "other 3-byte"
    0.9,  # kana, CJK punctuation
    0.77,  # CJK ideographs
    0.89,  # Hangul
    0.9,  # other 2-byte letters (Armenian, Syriac, ...)
    1.0,  # other 3-byte characters (Indic, Thai, Georgian, fullwidth, ...)
    5.48,  # 4-byte characters (emoji)
    1.62,  # CJK ideographs that are not one token (on top of CJK)
    0.83,  # Hangul syllables that are not one token (on top of Hangul)
    -2.69,  # words with an accented letter that are one token (their accents cost nothing extra)
    0.84,  # Latin Extended-A letters (Polish, Czech, Turkish...), on top of accented Latin
    1.99,  # foreign Latin: doubled vowels (Dutch, German, Finnish)
    0.77,  # foreign Latin: capitalised words at the start of a line
)
_FOREIGN_TH = 0.008  # "th" per ASCII letter below which Latin-script text is taken for not English


def _chunk_features(text: str) -> tuple:
    ascii_only = text.isascii()
    raw = text.encode("ascii" if ascii_only else "utf-8", "surrogatepass")
    cls = raw.translate(_CLASS_TABLE, b"" if ascii_only else _UTF8_CONT)
    n = len(cls)
    if not n:
        return (0,) * len(_TOKEN_WEIGHTS)
    # Pad to a power of two with class-0 bytes (no class bits: they add no feature), so that a few
    # cached lane masks serve every length.
    size = 1 << max(6, (n - 1).bit_length())
    cls += bytes(size - n)
    masks = _LANE_MASKS.get(size)
    if masks is None:
        m0 = int.from_bytes(b"\x01" * size, "little")
        masks = _LANE_MASKS[size] = (m0, m0 << 1, m0 << 2, m0 << 3, m0 << 4, m0 << 5, m0 | (m0 << 2), m0 << 7)
    M0, M1, M2, M3, M4, M5, M02, M7 = masks
    pc = int.bit_count
    # Character i is byte i of X (bits 8i..8i+7, one bit per class).  A left
    # shift by 8 puts the previous character on each position, a right shift
    # the next one; shifting by 8 +/- k also moves a class bit k lanes.  Every
    # result is finally ANDed with one lane, so the other lanes may hold junk.
    X = int.from_bytes(cls, "little")
    Xp = X << 8
    Xn = X >> 8
    same = X & Xp  # char has the same class bit as the previous one
    starts = X ^ same  # first char of each run, per class
    Lst = starts & M0  # first letter of each word
    # A word swallows a 1-char punctuation prefix unless that char follows a
    # space or other punctuation: punct at j, letter at j+1, no P/S at j-1.
    X7 = X << 7  # lane 4/5: previous char is punct / P-or-S
    pre = X & M5 & (X >> 3)
    pre ^= pre & X7
    # Whitespace pieces: the last newline of a run (lane 4), unless glued to
    # the punctuation before it ("):\n"); a run of >= 2 spaces (lane 3:
    # indentation, column alignment); a space right before a digit.
    nl = X & M4
    nl ^= nl & (Xn | X7)
    ws = X & M3 & ((starts & Xn) | (X >> 7))
    # Numbers: cl100k splits digits into groups of 3; count the 4th digit of
    # a run (lane 2) as one more piece.
    a = same & (same << 16)  # >= 3 same-class chars before (letters/digits)
    a4 = a & (X << 32)  # >= 4 before
    pieces = pc((starts & M02) | (starts & M5 ^ pre) | nl | ws | (a ^ a4) & M2)
    # Long words: letters with >= 8 letters before them (lane 0).
    long_tail = pc(a & (a4 << 32) & M0)
    # lower->Upper not followed by two lowers (lane 1): frequent in base64,
    # rare in prose and camelCase ("getElement" splits cheaply, "aZkQ" not).
    low = (X << 1) ^ X  # lane 1: lowercase letter
    case = X & M1 & (low << 8)
    noise_case = pc(case ^ (case & (low >> 8) & (low >> 16)))
    space_words = pc(Lst & (X << 5))  # words right after a space
    # Consonant clusters (lane 0): "lrwxrwxrwx", hex, abbreviations split into
    # short tokens; count consonants preceded by two more consonants.
    cons = X & M0
    cons ^= cons & (X >> 7)
    c3 = pc(cons & (cons << 8) & (cons << 16))
    # Letters beyond the 5th in a word; words ending in a vowel (lane 7: vowel, next char no letter).
    long5 = pc(a & (a << 16) & M0)
    word_end = X & M0
    word_end ^= word_end & Xn
    vowel_end = pc(X & M7 & (word_end << 7))
    letters = pc(X & M0)
    lower = letters - pc(X & M1)
    # Non-English Latin-script text costs more per word: cl100k learnt its merges mostly on English.  English
    # (and code, which borrows English words) is told apart by its "th" (~2% of letters, ~0.1% elsewhere).
    vocab = [0, 0, 0, 0]  # rare CJK ideographs, rare Hangul syllables, one-token accented words, Latin Extended-A
    if ascii_only:
        scripts = (0,) * 16
        ascii_letters = letters
    else:
        # Non-ASCII extras: keep only the UTF-8 lead bytes (short for mostly-ASCII text), then classify them.
        leads = raw.translate(None, _ASCII_AND_CONT)
        wide = leads.translate(_WIDE_TABLE)
        counts = [wide.count(c) for c in b"amgy"]
        counts.append(sum(text.count(c) for c in _UKRAINIAN) if counts[3] else 0)
        counts += [wide.count(c) for c in b"hr"]
        other3 = wide.count(b"x")
        counts += [
            sum(raw.count(p) for p in prefixes) if other3 else 0 for prefixes in (_DEVANAGARI, _THAI, _VIETNAMESE)
        ]
        counts += [wide.count(c) for c in b"kcKo"]
        counts.append(other3)
        counts.append(leads.count(b"\xf0"))
        scripts = tuple(counts)
        ascii_letters = letters - sum(counts[:4]) - counts[5] - counts[6] - counts[13]
        if counts[11]:
            vocab[0] = counts[11] - len(_CJK_ONE_TOKEN.findall(text))
        if counts[12]:
            vocab[1] = counts[12] - len(_HANGUL_ONE_TOKEN.findall(text))
        if counts[0]:
            vocab[3] = leads.count(b"\xc4") + leads.count(b"\xc5")  # U+0100-017F: ą ę ł ś ż č ř ş ğ ı ...
            accented = [w for w in text.split() if not w.isascii()]
            stripped = map(str.strip, accented, [_WORD_PUNCT] * len(accented))
            vocab[2] = sum(map(_ACCENTED_WORDS.__contains__, map(str.lower, stripped)))
    foreign = 0.0
    if ascii_letters > 0:
        th = text.count("th") + text.count("Th")
        foreign = max(0.0, 1.0 - th / (ascii_letters * _FOREIGN_TH)) * lower / letters
    doubled = sum(map(text.count, _DOUBLE_VOWELS)) * foreign if foreign else 0
    # Capitalised words at the start of a line (lists of names, UI strings): without the space, rarer tokens.
    line_caps = pc(Lst & (X >> 1) & (Xp >> 4)) * foreign
    return (
        (
            pieces,
            pc(pre),
            space_words,
            long_tail,
            noise_case,
            c3,
            long5,
            vowel_end,
            c3 * foreign,
            text.count("ij") * foreign,
        )
        + scripts
        + (*vocab, doubled, line_caps)
    )


def _token_features(text: str) -> tuple:
    """Counts of the cl100k-like features weighted by _TOKEN_WEIGHTS."""
    n = len(text)
    if n <= _CHUNK:
        return _chunk_features(text)
    # Long texts go in chunks cut at a newline (or space): the big ints then
    # stay small enough for the CPU cache and the malloc heap, ~1.5x faster
    # than one huge int; a cut costs at most a piece or so.
    total = [0] * len(_TOKEN_WEIGHTS)
    start = 0
    while start < n:
        end = start + _CHUNK
        if end < n:
            cut = text.rfind("\n", end - _CHUNK // 4, end)
            if cut < 0:
                cut = text.rfind(" ", end - _CHUNK // 4, end)
            if cut >= 0:
                end = cut + 1
        for i, v in enumerate(_chunk_features(text[start:end])):
            total[i] += v
        start = end
    return tuple(total)


def count_text_tokens(text: str) -> int:
    """Estimate the cl100k_base token count of text (within ~10%, fast)."""
    if not text:
        return 0
    est = sum(w * f for w, f in zip(_TOKEN_WEIGHTS, _token_features(text)))
    return max(1, round(est))


# ---------------------------------------------------------------------------
# Image tokens: Anthropic documents tokens ~= width * height / 750, after the
# image has been scaled down (aspect ratio kept) so that its long edge is at
# most 1568 px and it is at most ~1.15 megapixels (~1600 tokens).
# ---------------------------------------------------------------------------
_IMAGE_MAX_EDGE = 1568
_IMAGE_MAX_TOKENS = 1600
# Used when the size cannot be read: the most an image can cost after
# Anthropic's downscaling, so the estimate errs on the safe (high) side.
IMAGE_FALLBACK_TOKENS = 1600


def _b64_bytes(b64: str, start: int, size: int) -> bytes:
    """Decode bytes [start, start+size) of base64 text without decoding it all."""
    q = start // 3  # 3 bytes per 4 base64 chars
    chunk = b64[4 * q : 4 * (q + (size + 5) // 3 + 1)]
    chunk = chunk[: len(chunk) - len(chunk) % 4]
    try:
        data = base64.b64decode(chunk)
    except (binascii.Error, ValueError):
        return b""
    return data[start - 3 * q :][:size]


def _jpeg_size(b64: str):
    pos = 2  # after the FFD8 start-of-image marker
    for _ in range(200):  # bounded walk over segment headers
        seg = _b64_bytes(b64, pos, 9)
        if len(seg) < 4 or seg[0] != 0xFF:
            return None
        marker = seg[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2  # markers without a length field
            continue
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if len(seg) < 9:
                return None
            return int.from_bytes(seg[7:9], "big"), int.from_bytes(seg[5:7], "big")
        if marker == 0xDA:  # start of scan before any SOF
            return None
        pos += 2 + int.from_bytes(seg[2:4], "big")
    return None


def _image_size(b64: str):
    """(width, height) read from the image header, or None."""
    head = _b64_bytes(b64, 0, 32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(b64)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        kind = head[12:16]
        if kind == b"VP8 ":  # lossy: frame header after a 3-byte tag + start code
            return (int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF)
        if kind == b"VP8L":  # lossless: 14-bit width-1 / height-1
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8X":  # extended: 24-bit canvas width-1 / height-1
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def image_tokens(media_type: str, b64data: str) -> int:
    """Anthropic's image token estimate, from the header of base64 image data.

    The format is detected from the data itself (media_type is only a hint
    and may be wrong); only a few hundred bytes are decoded."""
    b64 = b64data or ""
    if b64.startswith("data:"):  # tolerate a data: URL
        b64 = b64.partition(",")[2]
    if any(c in b64[:4096] for c in "\r\n \t"):
        b64 = "".join(b64.split())  # wrapped base64 (rare): make offsets exact
    try:
        size = _image_size(b64)
    except (ValueError, IndexError):
        size = None
    if not size or size[0] <= 0 or size[1] <= 0:
        return IMAGE_FALLBACK_TOKENS
    w, h = float(size[0]), float(size[1])
    if max(w, h) > _IMAGE_MAX_EDGE:
        s = _IMAGE_MAX_EDGE / max(w, h)
        w, h = w * s, h * s
    return max(1, min(_IMAGE_MAX_TOKENS, math.ceil(w * h / 750)))


# ======================================================================================
# 5. REQUEST TRANSLATION (pure functions: no I/O, no globals that change the output)
# ======================================================================================
# Anthropic request -> a neutral conversation (`Turn`s) -> each provider's body. Deterministic, so that turn
# N's backend prompt is a byte prefix of turn N+1's (the backend's prompt cache keeps working). Also here:
# thinking signatures (they carry hidden reasoning to the next turn), prompt-based tool calling for models
# without native tool calls, and the token count of what the backend receives.

BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"


SIGNATURE_PREFIX = "cpx1."


def thinking_signature(text: str, keep_text: bool) -> str:
    """A non-empty signature the proxy can read back. With display "omitted" the client never sees
    the reasoning, so the signature carries it (compressed) to restore it exactly next turn."""
    if keep_text:
        return SIGNATURE_PREFIX
    return SIGNATURE_PREFIX + base64.urlsafe_b64encode(zlib.compress(text.encode(), 6)).decode()


def reasoning_from_signature(signature: Optional[str]) -> str:
    if not signature or not signature.startswith(SIGNATURE_PREFIX) or len(signature) == len(SIGNATURE_PREFIX):
        return ""
    try:
        inflate = zlib.decompressobj()
        text = inflate.decompress(base64.urlsafe_b64decode(signature[len(SIGNATURE_PREFIX) :]), MAX_REASONING_BYTES)
        return "" if inflate.unconsumed_tail else text.decode()  # larger than any real reasoning: not ours
    except (ValueError, zlib.error, UnicodeDecodeError):
        return ""


@dataclass
class Turn:
    """One backend chat message, before it takes a provider's shape."""

    role: str  # system | user | assistant | tool
    parts: list[tuple[str, Any]] = field(default_factory=list)  # ("text", str) | ("image", ImageSource)
    tool_calls: list[ToolUseBlock] = field(default_factory=list)
    reasoning: Optional[str] = None  # assistant: earlier thinking, for backends that want it back
    tool_call_id: Optional[str] = None
    tool_results: bool = False  # user: sent with tool results (the tool loop goes on), not a new question

    @property
    def text(self) -> str:
        return "\n\n".join(p[1] for p in self.parts if p[0] == "text")

    @property
    def images(self) -> list[ImageSource]:
        return [p[1] for p in self.parts if p[0] == "image"]


@dataclass
class Conversation:
    system: str
    turns: list[Turn]
    tools: list[Tool]


def _without_encrypted(value: Any) -> Any:
    """Anthropic-encrypted fields mean nothing to another model: drop them at any depth."""
    if isinstance(value, dict):
        return {k: _without_encrypted(v) for k, v in value.items() if "encrypted" not in k}
    if isinstance(value, list):
        return [_without_encrypted(v) for v in value]
    return value


def render_block_text(block: Any) -> str:
    """Text for blocks a chat backend has no type for: documents, search results, server-tool blocks."""
    if isinstance(block, OpaqueBlock):
        raw = {k: v for k, v in block.raw.items() if k not in ("type", "cache_control")}
        return f"[{block.type}: {dumps(_without_encrypted(raw))[:MAX_ERROR_CHARS]}]"
    if block.type == "document":
        src = block.source
        body = (
            src.data
            if src.type == "text"
            else "\n\n".join(b.text if b.type == "text" else "[image]" for b in src.content)
        )
        attrs = f' title="{block.title}"' if block.title else ""
        context = f"{block.context}\n" if block.context else ""
        return f"<document{attrs}>\n{context}{body}\n</document>"
    if block.type == "search_result":
        body = "\n".join(b.text for b in block.content)
        return f'<search_result source="{block.source}" title="{block.title}">\n{body}\n</search_result>'
    if block.type == "tool_reference":
        return f"Tool {block.tool_name} is now available."
    return getattr(block, "text", "")


def system_text(blocks: list[TextBlock]) -> str:
    """Join the system blocks, without Claude Code's per-version billing pseudo-header."""
    return "\n\n".join(b.text for b in blocks if not b.text.startswith(BILLING_HEADER_PREFIX))


def _assistant_turn(blocks: list[Any]) -> Turn:
    turn = Turn("assistant")
    reasoning = []
    for block in blocks:
        kind = block.type
        if kind == "text":
            if block.text:
                turn.parts.append(("text", block.text))
        elif kind == "tool_use":
            turn.tool_calls.append(block)
        elif kind == "thinking":
            text = block.thinking or reasoning_from_signature(block.signature)
            if text:
                reasoning.append(text)
        elif kind != "redacted_thinking":  # redacted thinking is Anthropic-encrypted: nothing to send
            turn.parts.append(("text", render_block_text(block)))
    turn.reasoning = "\n\n".join(reasoning) if reasoning else None
    return turn


def _user_turns(blocks: list[Any]) -> list[Turn]:
    """A user message -> [tool turns, in call order] + [one user turn with everything else]."""
    turns: list[Turn] = []
    user = Turn("user")
    tool_images: list[ImageSource] = []
    for block in blocks:
        if block.type == "tool_result":
            texts, images = [], 0
            for inner in block.content:
                if inner.type == "image":
                    tool_images.append(inner.source)
                    images += 1
                else:
                    texts.append(render_block_text(inner))
            if images:
                texts.append(f"[{images} image(s) from this tool result follow in the next user message]")
            text = "\n".join(t for t in texts if t)
            if block.is_error:
                text = f"Error: {text}" if text else "Error"
            turns.append(Turn("tool", [("text", text)], tool_call_id=block.tool_use_id))
        elif block.type == "image":
            user.parts.append(("image", block.source))
        else:
            text = render_block_text(block)
            if text:
                user.parts.append(("text", text))
    if tool_images:
        user.parts[:0] = [("text", "Image(s) returned by the tool call(s) above:")] + [
            ("image", src) for src in tool_images
        ]
    if user.parts or not turns:
        user.tool_results = bool(turns)  # sent along with tool results: still the same tool loop
        turns.append(user)
    return turns


def visible_tools(req: MessagesRequest) -> list[Tool]:
    """Client tools the backend model may see: typed/server tools are dropped (the backend cannot run
    them), deferred tools stay hidden until a tool_result reveals them with a tool_reference block."""
    tools = req.tools or []
    revealed = set()
    if any(t.defer_loading for t in tools):
        for message in req.messages:
            for block in message.content:
                if block.type == "tool_result":
                    revealed.update(b.tool_name for b in block.content if b.type == "tool_reference")
    out = []
    for tool in tools:
        if not tool.is_custom:
            warn_once(
                f"dropping tool {tool.name!r} of type {tool.type!r}: it runs on Anthropic's servers "
                "or needs a built-in schema, and the backend model cannot use it"
            )
        elif not tool.defer_loading or tool.name in revealed:
            out.append(tool)
    return out


def build_conversation(req: MessagesRequest, system_messages: str = "reminder") -> Conversation:
    """Anthropic messages -> neutral turns. Deterministic: turn N's output is a prefix of turn N+1's.

    `role: "system"` messages inside `messages` follow the strategy: `reminder` (default) keeps the
    text in place as a <system-reminder> in the neighbouring user turn (stable prefix, any template);
    `hoist` appends it to the leading system prompt; `inline` keeps a system message in place."""
    system = system_text(req.system)
    merged: list[Message] = []
    for message in req.messages:
        role, content = message.role, message.content
        if role == "system":
            text = "\n\n".join(b.text for b in content if b.text)
            if not text:
                continue
            if system_messages == "hoist":
                system = f"{system}\n\n{text}" if system else text
                continue
            if system_messages == "reminder":
                role, content = "user", [TextBlock(f"<system-reminder>\n{text}\n</system-reminder>")]
        if merged and merged[-1].role == role and role != "system":
            merged[-1] = Message(role, merged[-1].content + content)
        else:
            merged.append(Message(role, list(content)))
    turns: list[Turn] = []
    for message in merged:
        if message.role == "assistant":
            turns.append(_assistant_turn(message.content))
        elif message.role == "system":
            turns.append(Turn("system", [("text", "\n\n".join(b.text for b in message.content))]))
        else:
            turns.extend(_user_turns(message.content))
    return Conversation(system, turns, visible_tools(req))


def tool_parameters(schema: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The tool's JSON schema as is, minus the `$schema` meta key; an object schema always has properties."""
    params = {k: v for k, v in (schema or {}).items() if k != "$schema"}
    if params.get("type", "object") == "object":
        params.setdefault("type", "object")
        params.setdefault("properties", {})
    return params


def effective_max_tokens(req: MessagesRequest, route: Route) -> int:
    value = req.max_tokens or 0
    return min(value, route.max_tokens) if route.max_tokens else value


def reasoning_effort(req: MessagesRequest) -> Optional[str]:
    """Anthropic thinking/effort -> a low/medium/high style level, or None to leave the backend's default."""
    thinking = req.thinking
    if thinking is None or thinking.type == "disabled":
        return None
    effort = req.output_config.effort if req.output_config else None
    if effort:
        return effort
    if thinking.type == "enabled" and thinking.budget_tokens:
        budget = thinking.budget_tokens
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    return None


_OPENAI_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def sampling(req: MessagesRequest) -> dict[str, Any]:
    """temperature, top_p, top_k: the names are the same in Chat Completions and Ollama options. Stop
    sequences are not sent: the proxy watches for them itself (StopStrings), because llama.cpp and Ollama
    stop on them without saying which one matched."""
    values = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
    return {k: v for k, v in values.items() if v is not None}


def function_tools(tools: list[Tool], name: Any = lambda n: n) -> list[dict[str, Any]]:
    """Tools in the `{"type": "function", "function": {...}}` shape both backends take."""
    return [
        {
            "type": "function",
            "function": {
                "name": name(t.name),
                "description": t.description or "",
                "parameters": tool_parameters(t.input_schema),
            },
        }
        for t in tools
    ]


def output_schema(req: MessagesRequest) -> Optional[dict[str, Any]]:
    """output_config.format {"type": "json_schema", "schema": ...} -> the schema (structured output)."""
    fmt = req.output_config.format if req.output_config else None
    if fmt and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        return fmt["schema"]
    return None


def openai_tool_name(name: str) -> str:
    """OpenAI function names are [A-Za-z0-9_-]{1,64}; longer or odd names get a stable short alias."""
    if _OPENAI_NAME.match(name):
        return name
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:55]
    return f"{clean}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def current_loop_start(turns: list[Turn]) -> int:
    """Index of the first turn after the last user turn with text of its own: the current tool loop."""
    for i in range(len(turns) - 1, -1, -1):
        turn = turns[i]
        if turn.role == "user" and not turn.tool_results and turn.text:
            return i + 1
    return 0


def image_url(src: ImageSource) -> str:
    return src.url if src.type == "url" else f"data:{src.media_type};base64,{src.data}"


def openai_messages(conv: Conversation, reasoning_history: Optional[bool] = False) -> list[dict[str, Any]]:
    """The Chat Completions `messages`. Tool ids are passed byte for byte. reasoning_history: True sends
    earlier reasoning back for every assistant turn, None only for those of the current tool loop (since the
    last user message with text, as Qwen3's template renders it), False never."""
    messages: list[dict[str, Any]] = []
    if conv.system:
        messages.append({"role": "system", "content": conv.system})
    loop_start = current_loop_start(conv.turns) if reasoning_history is None else 0
    for i, turn in enumerate(conv.turns):
        if turn.role == "tool":
            messages.append({"role": "tool", "tool_call_id": turn.tool_call_id, "content": turn.text})
        elif turn.role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": turn.text}
            if turn.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": openai_tool_name(c.name), "arguments": dumps(c.input)},
                    }
                    for c in turn.tool_calls
                ]
            if reasoning_history and (turn.reasoning or turn.tool_calls):
                msg["reasoning_content"] = turn.reasoning or ""
            elif reasoning_history is None and turn.reasoning and i >= loop_start:
                msg["reasoning_content"] = turn.reasoning
            messages.append(msg)
        elif turn.images:
            parts = [
                {"type": "text", "text": value}
                if kind == "text"
                else {"type": "image_url", "image_url": {"url": image_url(value)}}
                for kind, value in turn.parts
            ]
            messages.append({"role": turn.role, "content": parts})
        else:
            messages.append({"role": turn.role, "content": turn.text})
    return messages


def openai_request(
    conv: Conversation,
    req: MessagesRequest,
    route: Route,
    *,
    official: bool = False,
    reasoning_history: Optional[bool] = False,
) -> dict[str, Any]:
    """Chat Completions body. The backend is always streamed: the timeout then bounds silence, not the length
    of an answer, for non-streaming clients too."""
    messages = openai_messages(conv, reasoning_history)
    body: dict[str, Any] = {
        "model": route.model,
        "messages": messages,
        "max_tokens": effective_max_tokens(req, route),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(sampling(req))
    if official:  # OpenAI's own API rejects top_k, and its reasoning models take only max_completion_tokens
        body.pop("top_k", None)
        body["max_completion_tokens"] = body.pop("max_tokens")
    if route.send_user_id and req.metadata and req.metadata.user_id:  # off by default: a device and session id
        body["user"] = req.metadata.user_id
    effort = reasoning_effort(req)
    if effort:
        body["reasoning_effort"] = effort
    if conv.tools:
        body["tools"] = function_tools(conv.tools, openai_tool_name)
        choice = req.tool_choice
        if choice:
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type) or {
                "type": "function",
                "function": {"name": openai_tool_name(choice.name or "")},
            }
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
    schema = output_schema(req)
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    return body


# --- prompt-based tool calling (models and servers without native tool calling) --------------------

PROMPT_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
PROMPT_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call>"
)


def prompt_tools_text(tools: list[Tool], choice: Optional[ToolChoice]) -> str:
    """The tool definitions and the call format for the system prompt, as Qwen2.5's chat template writes them
    (Hermes format): one compact JSON line per tool, in request order, so the prompt prefix stays cache-stable."""
    lines = "\n".join(dumps(tool) for tool in function_tools(tools))
    text = PROMPT_TOOLS_HEAD + lines + PROMPT_TOOLS_TAIL
    if choice and choice.type == "any":
        text += "\n\nAnswer with at least one function call."
    elif choice and choice.type == "tool" and choice.name:
        text += f"\n\nAnswer with a call of the function {choice.name}."
    return text


def prompt_tool_call(call: ToolUseBlock) -> str:
    return "<tool_call>\n" + dumps({"name": call.name, "arguments": call.input}) + "\n</tool_call>"


def prompt_tools_conversation(conv: Conversation, req: MessagesRequest) -> Conversation:
    """The conversation for a backend that takes no `tools`: the definitions go into the system prompt,
    assistant tool calls become <tool_call> text, tool results user text in <tool_response> tags (one user
    turn for the results of one assistant turn, with what the user sent alongside); answers are read by
    TextCalls. Deterministic, so each turn's prompt is a prefix of the next one's."""
    tools_text = prompt_tools_text(conv.tools, req.tool_choice)
    system = f"{conv.system}\n\n{tools_text}" if conv.system else tools_text
    turns: list[Turn] = []
    for turn in conv.turns:
        last = turns[-1] if turns else None
        if turn.role == "assistant" and turn.tool_calls:
            parts = turn.parts + [("text", "\n".join(prompt_tool_call(call) for call in turn.tool_calls))]
            turns.append(Turn("assistant", parts, reasoning=turn.reasoning))
        elif turn.role == "tool":
            part = ("text", f"<tool_response>\n{turn.text}\n</tool_response>")
            if last is not None and last.role == "user" and last.tool_results:
                last.parts.append(part)
            else:
                turns.append(Turn("user", [part], tool_results=True))
        elif turn.role == "user" and last is not None and last.role == "user" and last.tool_results:
            last.parts.extend(turn.parts)
        else:
            turns.append(turn)
    return Conversation(system, turns, [])


def ollama_request(conv: Conversation, req: MessagesRequest, route: Route) -> dict[str, Any]:
    """Ollama /api/chat body: string content, raw base64 images, object tool arguments, options."""
    messages: list[dict[str, Any]] = []
    if conv.system:
        messages.append({"role": "system", "content": conv.system})
    names = {c.id: c.name for t in conv.turns for c in t.tool_calls}
    for turn in conv.turns:
        msg: dict[str, Any] = {"role": turn.role, "content": turn.text}
        if turn.role == "tool":
            msg["tool_call_id"] = turn.tool_call_id
            if turn.tool_call_id in names:
                msg["tool_name"] = names[turn.tool_call_id]
        if turn.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "function": {"index": i, "name": c.name, "arguments": c.input}}
                for i, c in enumerate(turn.tool_calls)
            ]
        if turn.reasoning and route.reasoning_history is not False:
            msg["thinking"] = turn.reasoning  # Ollama's docs: send thinking back with tool-calling turns
        images = turn.images
        if images:
            for src in images:
                if src.type != "base64":
                    raise invalid(
                        "messages",
                        "Ollama accepts only base64 images and this request has an image "
                        "url: send base64, or start the proxy with --fetch-images",
                    )
            msg["images"] = [src.data for src in images]
        messages.append(msg)
    options: dict[str, Any] = {"num_predict": effective_max_tokens(req, route), **sampling(req)}
    options["num_ctx"] = route.context_window or DEFAULT_NUM_CTX  # Ollama's own default silently cuts prompts
    body: dict[str, Any] = {
        "model": route.model,
        "messages": messages,
        "stream": True,
        "options": options,
        "truncate": False,  # an error instead of a prompt cut from the front (Ollamas without it ignore it)
    }
    if conv.tools and not (req.tool_choice and req.tool_choice.type == "none"):
        body["tools"] = function_tools(conv.tools)
    if req.thinking:  # a model without thinking answers 400, and the proxy then drops `think` for it
        body["think"] = req.thinking.type != "disabled"
    schema = output_schema(req)
    if schema is not None:
        body["format"] = schema
    return body


# --- token count of what the backend receives ----------------------------------------------


_COUNTS: dict[Any, int] = {}  # (hash, length) of a long text, or a tool's key -> its count; keeps no text alive


def _memo(key: Any, count: Any) -> int:
    value = _COUNTS.get(key)
    if value is None:
        if len(_COUNTS) >= TOKEN_MEMO_SIZE:
            _COUNTS.clear()
        value = _COUNTS[key] = count()
    return value


def _cached_count(text: str) -> int:
    return _memo((hash(text), len(text)), lambda: count_text_tokens(text))


def _tool_tokens(tool: Tool) -> int:
    """A tool definition's tokens. Claude Code sends the same dozen tools every turn: they are counted
    once, keyed by name and description (a schema that changes under the same description is not
    noticed: it is an estimate)."""
    return _memo(
        ("tool", tool.name, hash(tool.description), len(tool.description or "")),
        lambda: count_text_tokens(
            f"{tool.name}\n{tool.description or ''}\n{dumps(tool_parameters(tool.input_schema))}"
        ),
    )


def count_request_tokens(req: MessagesRequest, conv: Optional[Conversation] = None) -> int:
    """Estimate of the prompt the backend sees, counted on the translated conversation: the system
    prompt, every turn with its role overhead, tool calls, images, and the visible tool definitions."""
    conv = conv or build_conversation(req)
    texts: list[str] = [conv.system]
    total = TOKENS_PER_REQUEST
    for turn in conv.turns:
        total += TOKENS_PER_TURN  # role markers of the chat template
        texts.append(turn.text)
        if turn.reasoning:
            texts.append(turn.reasoning)
        for call in turn.tool_calls:
            texts.append(call.name)
            texts.append(dumps(call.input))
            total += TOKENS_PER_TOOL_CALL
        for src in turn.images:
            total += image_tokens(src.media_type or "", src.data) if src.data else IMAGE_FALLBACK_TOKENS
    total += sum(_tool_tokens(tool) + TOKENS_PER_TOOL for tool in conv.tools)
    small = [t for t in texts if len(t) < 256]
    big = sum(_cached_count(t) for t in texts if len(t) >= 256)  # the system prompt and history repeat each turn
    return total + big + count_text_tokens("\n".join(small))


# ======================================================================================
# 6. RESPONSE TRANSLATION (pure: backend deltas -> Anthropic events, a fold)
# ======================================================================================
# Backend payloads drive `EventBuilder`, a fold that emits Anthropic stream events; `fold_events` turns
# those events into the non-streaming Message, so one path serves both. Its parts: tool-argument streaming
# and repair (JsonPrefix, ToolCall, ToolCalls), inline <think> (ThinkTags), tool calls written as text
# (TextCalls), stop strings the backend does not report (StopStrings); then backend errors, and the two
# provider decoders.


# --- tool arguments: stream only what the client can parse, repair what small models break ----

_STR_STOP = re.compile(r'["\\\x00-\x1f]')
_LITERAL = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_LITERAL_CHARS = frozenset("0123456789+-.eEtrufalsn")
_HEX = frozenset("0123456789abcdefABCDEF")
# JsonPrefix's states: where the parser stands after the last character it read.
_EXPECT_VALUE = 0  # a value may begin (top level: only `{`)
_EXPECT_KEY_OR_CLOSE = 1  # just after `{`: a key or `}`
_EXPECT_KEY = 2  # after a comma in an object: a key
_EXPECT_COLON = 3  # after a key: `:`
_AFTER_VALUE = 4  # a value ended: `,`, the closer of the open container, or (top level) the end
_IN_STRING = 5  # inside a string (a key when `in_key`)
_IN_ESCAPE = 6  # after a backslash inside a string
_IN_UNICODE = 7  # inside a \uXXXX escape (`uni` hex digits read so far)
_IN_LITERAL = 8  # inside a number, true, false or null (`lit` so far)
_EXPECT_ITEM_OR_CLOSE = 9  # just after `[`: a value or `]`
_BROKEN = 10  # the text is not a prefix of a JSON object: nothing after `safe` is ever streamed


class JsonPrefix:
    """Incremental check that text is a prefix of one JSON object, for streaming tool arguments.

    Invariant: everything before `safe` is a prefix that the client's partial-JSON parser accepts and
    never has to take back; so a half-read literal (`tr`), escape (`\\u00`), surrogate pair, a key whose
    value has not begun, and a comma with nothing after it are held back until they prove sound.
    `is_whole` is True once the object has closed. Strings are skipped with one regex search, so long
    arguments are cheap."""

    __slots__ = (
        "stack",
        "state",
        "in_key",
        "held",
        "lit",
        "safe",
        "fed",
        "uni",
        "code",
        "high_at",
        "comma",
        "key_start",
    )

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.state, self.in_key, self.held, self.lit, self.safe, self.fed, self.uni = (
            _EXPECT_VALUE,
            False,
            0,
            "",
            0,
            0,
            0,
        )
        self.comma = -1  # a comma with nothing after it yet is held back: `{"a": 1,` may end there
        self.key_start = 0  # where the current member began: a key is held back until its value is sound
        self.code, self.high_at = 0, -1  # a \uD8xx high surrogate waits for its low half (the SDK rejects halves)

    @property
    def is_whole(self) -> bool:
        return self.state == _AFTER_VALUE and not self.stack

    @property
    def broken(self) -> bool:
        return self.state == _BROKEN

    def feed(self, s: str) -> int:
        """Consume s; return the new `safe` length (of everything fed so far)."""
        i, n, base, st = 0, len(s), self.fed, self.state
        if st == _BROKEN:
            self.fed += n
            return self.safe
        while i < n:
            st = self.state
            if st == _IN_STRING:
                i = self._string(s, i, base)
                if self.state == _BROKEN:
                    break
                continue
            c = s[i]
            if st == _IN_ESCAPE:
                self._escape(c)
            elif st == _IN_UNICODE:
                self._unicode(c)
            else:
                if st == _IN_LITERAL:
                    if c in _LITERAL_CHARS:
                        self.lit += c
                        i += 1
                        continue
                    if not _LITERAL.fullmatch(self.lit):
                        self.state = _BROKEN
                        break
                    self.state = st = _AFTER_VALUE
                    self.lit = ""
                if c in " \t\r\n":
                    i += 1
                    continue
                self._structure(st, c, base + i)
                if self.state != _BROKEN:
                    self.comma = base + i if c == "," else -1
            if self.state == _BROKEN:
                break
            i += 1
        self.fed = base + n
        self._hold_back(st, base + i)
        return self.safe

    def _string(self, s: str, i: int, base: int) -> int:
        """Inside a string: skip to its next quote, backslash or control character; the index to go on from."""
        m = _STR_STOP.search(s, i)
        if m is None:
            return len(s)
        if self.high_at >= 0 and (m.start() != i or m.group() != "\\"):
            self.state = _BROKEN  # a high surrogate escape not followed by its low half
            return i
        i = m.start()
        c = s[i]
        if c == '"':
            self.state = _EXPECT_COLON if self.in_key else _AFTER_VALUE
        elif c == "\\":
            self.state, self.held = _IN_ESCAPE, base + i
        else:
            self.state = _BROKEN  # a raw control character
            return i
        return i + 1

    def _escape(self, c: str) -> None:
        if c == "u":
            self.state, self.uni, self.code = _IN_UNICODE, 0, 0
        elif c in '"\\/bfnrt' and self.high_at < 0:
            self.state = _IN_STRING
        else:
            self.state = _BROKEN

    def _unicode(self, c: str) -> None:
        if c not in _HEX:
            self.state = _BROKEN
            return
        self.uni += 1
        self.code = self.code * 16 + int(c, 16)
        if self.uni < 4:
            return
        self.state = _IN_STRING
        if 0xD800 <= self.code <= 0xDBFF and self.high_at < 0:
            self.high_at = self.held
        elif 0xDC00 <= self.code <= 0xDFFF and self.high_at >= 0:
            self.high_at = -1
        elif 0xD800 <= self.code <= 0xDFFF or self.high_at >= 0:
            self.state = _BROKEN  # half a surrogate pair

    def _structure(self, st: int, c: str, at: int) -> None:
        """A character outside strings and literals (not white space), at position `at`."""
        if st in (_EXPECT_VALUE, _EXPECT_ITEM_OR_CLOSE):
            if st == _EXPECT_ITEM_OR_CLOSE and c == "]":
                self.stack.pop()
                self.state = _AFTER_VALUE
            elif not self.stack and c != "{":
                self.state = _BROKEN  # the top level must be an object
            elif c == "{":
                self.stack.append("}")
                self.state = _EXPECT_KEY_OR_CLOSE
            elif c == "[":
                self.stack.append("]")
                self.state = _EXPECT_ITEM_OR_CLOSE
            elif c == '"':
                self.state, self.in_key = _IN_STRING, False
            elif c in _LITERAL_CHARS:  # held from the comma before it, if any: `[1,` may end there
                self.state, self.lit, self.held = _IN_LITERAL, c, self.comma if self.comma >= 0 else at
            else:
                self.state = _BROKEN
        elif st in (_EXPECT_KEY_OR_CLOSE, _EXPECT_KEY):
            if c == '"':  # the member begins at its comma, if any: `{"a": 1, "b` may end there
                self.state, self.in_key = _IN_STRING, True
                self.key_start = self.comma if self.comma >= 0 else at
            elif c == "}" and st == _EXPECT_KEY_OR_CLOSE:
                self.stack.pop()
                self.state = _AFTER_VALUE
            else:
                self.state = _BROKEN
        elif st == _EXPECT_COLON:
            self.state = _EXPECT_VALUE if c == ":" else _BROKEN
        elif st == _AFTER_VALUE:
            if not self.stack:
                self.state = _BROKEN  # trailing text after the object
            elif c == ",":
                self.state = _EXPECT_KEY if self.stack[-1] == "}" else _EXPECT_VALUE
            elif c == self.stack[-1]:
                self.stack.pop()
            else:
                self.state = _BROKEN

    def _hold_back(self, st: int, stopped_at: int) -> None:
        """Set `safe` (the invariant above): `st` is the state before the last character read."""
        if self.state in (_IN_LITERAL, _IN_ESCAPE, _IN_UNICODE) or (
            self.state == _BROKEN and st in (_IN_LITERAL, _IN_ESCAPE, _IN_UNICODE)
        ):
            self.safe = self.held  # a literal or escape not yet known to be valid is held back
        elif self.state == _BROKEN:
            self.safe = stopped_at
        else:
            self.safe = self.fed
        if self.comma >= 0:
            self.safe = min(self.safe, self.comma)
        if self._in_member(st if self.state == _BROKEN else self.state):
            self.safe = min(self.safe, self.key_start)
        if self.high_at >= 0:
            self.safe = min(self.safe, self.high_at)

    def _in_member(self, state: int) -> bool:
        """Inside an object member whose value has not begun soundly: its key may not be sent yet."""
        return (
            bool(self.stack)
            and self.stack[-1] == "}"
            and (
                state in (_EXPECT_COLON, _EXPECT_VALUE, _IN_LITERAL)
                or (state in (_IN_STRING, _IN_ESCAPE, _IN_UNICODE) and self.in_key)
            )
        )

    def made_whole(self, text: str) -> str:
        """The fed text (not broken) made into a whole object without inventing anything: an
        unfinished member or element is dropped, an open value string is closed, brackets closed."""
        if self.state == _EXPECT_VALUE and not self.stack:
            return "{}"
        state, closers = self.state, "".join(reversed(self.stack))
        if self._in_member(state) and not (state == _IN_LITERAL and _LITERAL.fullmatch(self.lit)):
            text = text[: self.key_start]  # `{"a": 1, "b` / `{"a": tru` -> drop the member
        elif state in (_IN_STRING, _IN_ESCAPE, _IN_UNICODE):  # a value string: closed, without half an escape or pair
            cut = self.high_at if self.high_at >= 0 else self.held if state != _IN_STRING else len(text)
            return text[:cut] + '"' + closers
        elif state == _IN_LITERAL and not _LITERAL.fullmatch(self.lit):
            text = text[: self.held]  # `[1, tr` -> `[1`
        stripped = text.rstrip()
        if stripped.endswith(","):
            text = stripped[:-1]
        return text + closers


_JSON_WORDS = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\b(true|false|null)\b""")
_PY_WORDS = {"true": "True", "false": "False", "null": "None"}
_FENCE = re.compile(r"^\s*```[a-zA-Z]*\s*\n?(.*?)\n?```\s*$", re.S)


def _is_object(text: str) -> bool:
    try:
        return isinstance(loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _breaks(text: str) -> bool:
    check = JsonPrefix()
    check.feed(text)
    return check.broken


def repair_arguments(text: str) -> Optional[str]:
    """Arguments as the model wrote them -> JSON text of an object, or None when beyond repair.
    Handles: empty, code fences, trailing text, a double-encoded string, missing closing braces,
    single quotes / Python literals. Every answer passes the same strict parser the client uses."""
    s = text.strip()
    if not s:
        return "{}"
    fence = _FENCE.match(s)
    if fence:
        s = fence.group(1).strip()
    if _is_object(s):
        return s
    try:
        inner = loads(s)  # a JSON string holding the object
    except (ValueError, RecursionError):
        inner = None
    if isinstance(inner, str) and _is_object(inner.strip()):
        return inner.strip()
    start = s.find("{")
    if start >= 0:
        try:
            end = json.JSONDecoder().raw_decode(s, start)[1]  # the object, then trailing text
            if _is_object(s[start:end]):
                return s[start:end]
        except (ValueError, RecursionError):
            pass
        checker = JsonPrefix()
        checker.feed(s[start:])
        if not checker.broken and _is_object(checker.made_whole(s[start:])):
            return checker.made_whole(s[start:])
    try:
        import ast

        value = ast.literal_eval(_JSON_WORDS.sub(lambda m: _PY_WORDS[m.group(1)] if m.group(1) else m.group(), s))
        candidate = dumps(value) if isinstance(value, dict) else None
        if candidate and _is_object(candidate):
            return candidate
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        pass
    return None


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


class ToolCall:
    """One tool call being received. `raw` is the backend's argument text; `args` what the client gets
    (raw control characters inside strings escaped: small models emit real newlines in file contents);
    `sent` how much of `args` has been streamed. state: pending -> open (its block streams) -> done.
    Both texts are kept as lists of pieces, joined only when needed: long arguments arrive in thousands of
    small fragments, and appending to one string would copy it each time."""

    __slots__ = (
        "key",
        "id",
        "name",
        "pieces",
        "raw_pieces",
        "raw_len",
        "unfed",
        "held",
        "sent",
        "checker",
        "state",
        "in_string",
        "escaped",
        "snapshots",
    )

    def __init__(self, key: Any) -> None:
        self.key, self.id, self.name, self.sent = key, "", "", 0
        self.pieces: list[str] = []  # args
        self.raw_pieces: list[str] = []  # raw
        self.raw_len = 0
        self.unfed: list[str] = []  # args not yet read by the checker
        self.held: list[str] = []  # args read by the checker but not yet safe to stream
        self.checker = JsonPrefix()
        self.state = "pending"
        self.in_string = self.escaped = self.snapshots = False

    @property
    def args(self) -> str:
        if len(self.pieces) > 1:
            self.pieces = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    @property
    def raw(self) -> str:
        if len(self.raw_pieces) > 1:
            self.raw_pieces = ["".join(self.raw_pieces)]
        return self.raw_pieces[0] if self.raw_pieces else ""

    def _resends(self, fragment: str) -> bool:
        """Is the fragment the whole argument text so far, resent (cumulative snapshots), not a delta?"""
        if len(fragment) < self.raw_len or not fragment.startswith(self.raw):
            return False
        if self.snapshots:
            return True
        # A delta never repeats everything before it in practice; the one exception kept: the fragment read as
        # a snapshot breaks the JSON and read as a delta does not (`{"a":` then `{"a":1}}`, a nested object).
        return not _breaks(fragment) or _breaks(self.raw + fragment)

    def add(self, fragment: str) -> None:
        if not self.raw_len:
            fragment = fragment.lstrip()  # a whitespace-only first piece is no JSON value yet
            self.raw_pieces, self.raw_len = [fragment], len(fragment)
        elif self._resends(fragment):
            self.snapshots = True  # a server that sends cumulative snapshots
            self.raw_pieces, self.raw_len, fragment = [fragment], len(fragment), fragment[self.raw_len :]
        else:
            self.raw_pieces.append(fragment)
            self.raw_len += len(fragment)
        if not fragment:
            return
        if not _STR_STOP.search(fragment):
            self._append(fragment)
            self.escaped = False  # a pending escape applied to this first character
            return
        out, last = [], 0
        escaped_at = 0 if self.escaped else -1  # the character after a backslash inside a string
        for match in _STR_STOP.finditer(fragment):
            pos, c = match.start(), match.group()
            if pos == escaped_at:
                continue
            if c == "\\":
                if self.in_string:
                    escaped_at = pos + 1
            elif c == '"':
                self.in_string = not self.in_string
            elif self.in_string:
                out.append(fragment[last:pos])
                out.append(_CONTROL_ESCAPES.get(c, f"\\u{ord(c):04x}"))
                last = pos + 1
        out.append(fragment[last:])
        self._append("".join(out))
        self.escaped = escaped_at == len(fragment)

    def _append(self, text: str) -> None:
        self.pieces.append(text)
        self.unfed.append(text)

    def take_safe(self) -> str:
        """The arguments that became safe to stream since the last call (see JsonPrefix)."""
        if not self.unfed:
            return ""
        new = self.unfed[0] if len(self.unfed) == 1 else "".join(self.unfed)
        self.unfed = []
        safe = self.checker.feed(new)
        if safe <= self.sent:
            if not self.checker.broken:  # once broken nothing more becomes safe
                self.held.append(new)
            return ""
        text = "".join(self.held) + new if self.held else new  # args[sent:fed]
        piece, rest = text[: safe - self.sent], text[safe - self.sent :]
        self.held = [rest] if rest and not self.checker.broken else []
        self.sent = safe
        return piece

    def close(self) -> list[str]:
        """The call ends: the last safe piece, then what makes the streamed text a whole object (the
        rest of the repaired arguments, or the streamed part closed as it is, or `{}`)."""
        self.state = "done"
        pieces = [self.take_safe()]
        sent = self.args[: self.sent]
        if self.checker.is_whole and self.sent >= len(self.args.rstrip()):
            return [p for p in pieces if p]
        repaired = repair_arguments(self.args)
        if repaired is None:
            log.warning(
                "tool %s: arguments are not valid JSON and could not be repaired; delivering what was valid", self.name
            )
        if repaired is not None and repaired.startswith(sent):
            pieces.append(repaired[len(sent) :])
        else:
            check = JsonPrefix()
            check.feed(sent)
            pieces.append(check.made_whole(sent)[len(sent) :])  # the streamed part never ends inside a member
            if repaired is not None:
                log.warning(
                    "tool %s: repaired arguments differ from what was streamed; closed the streamed part", self.name
                )
        return [p for p in pieces if p]


class ToolCalls:
    """Tool-call fragments in, calls out, whatever way the backend numbers them. Shapes real servers send:

    - OpenAI: `index` on every fragment, the id and name on the first one (canonical);
    - the id repeated on every fragment (LM Studio, some proxies), or a fresh id on every fragment of the
      same index (older vLLM): the first id of an index wins;
    - no `index` at all: a fragment with a new id starts a new call, one without an id continues the last;
    - the same index used again for a new call after the old one closed (some llama.cpp builds);
    - whole calls, in order, each in one piece (Ollama; non-streaming bodies): `whole()`;
    - arguments before the name, and cumulative snapshots instead of deltas (handled by ToolCall).

    One call streams at a time (`active`); a call that begins while another is open waits and is sent
    whole when the open one is done (`pending`). Ids are kept byte for byte unless missing, short or
    already used, when a `toolu_` id replaces them."""

    def __init__(self) -> None:
        self.calls: dict[Any, ToolCall] = {}
        self.active: Optional[ToolCall] = None
        self.last_key: Any = None
        self.ids: set[str] = set()

    def fragment(self, index: Optional[int], call_id: Optional[str], name: Optional[str], arguments: Any) -> ToolCall:
        key: Any = index
        if key is None:
            last = self.calls.get(self.last_key)
            key = self.last_key if self.last_key is not None else 0
            if call_id and last is not None and last.id and call_id != last.id:
                key = ("auto", len(self.calls))
        call = self.calls.get(key)
        if call is None or call.state == "done" and (call_id and call_id != call.id):
            if call is not None:  # the same index reused for a new call after the old one closed
                key = (key, len(self.calls))
            call = self.calls[key] = ToolCall(key)
        self.last_key = key
        return self._update(call, call_id, name, arguments)

    def whole(self, call_id: Optional[str], name: Optional[str], arguments: Any) -> ToolCall:
        key = ("whole", len(self.calls))
        call = self.calls[key] = ToolCall(key)
        return self._update(call, call_id, name, arguments if arguments is not None else {})

    def _update(self, call: ToolCall, call_id: Optional[str], name: Optional[str], arguments: Any) -> ToolCall:
        if call_id and not call.id:
            call.id = call_id
        if name and not call.name:
            call.name = name
        if arguments is not None and not isinstance(arguments, str):
            arguments = dumps(arguments)
        if arguments:
            call.add(arguments)
            if call.state == "done":
                warn_once("tool call arguments arrived after the call's block was closed; ignored")
        return call

    def may_open(self, call: ToolCall) -> bool:
        """A pending call with a name may open its block when no other call is streaming an unfinished object."""
        return call.state == "pending" and bool(call.name) and (self.active is None or self.active.checker.is_whole)

    def open(self, call: ToolCall) -> None:
        if not call.id or call.id in self.ids or len(call.id) < 8:
            call.id = new_id("toolu_")
        self.ids.add(call.id)
        call.state = "open"
        self.active = call

    def pending(self) -> list[ToolCall]:
        return [call for call in self.calls.values() if call.state == "pending"]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag` (a tag split across chunks)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkTags:
    """Reasoning that a model writes inline as <think>...</think> at the very start of its answer (servers
    without a reasoning parser). Text in, ("thinking" | "text", piece) out; a tag may be split across
    chunks at any byte, and only what could still be a tag is held back. state: start -> inside -> after (the
    whitespace after </think> is dropped, whatever the chunking) -> off."""

    __slots__ = ("state", "held")

    def __init__(self) -> None:
        self.state, self.held = "start", ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        if self.state == "off":
            return [("text", text)]
        if self.state == "after":
            text = text.lstrip()
            if not text:
                return []
            self.state = "off"
            return [("text", text)]
        out: list[tuple[str, str]] = []
        self.held += text
        if self.state == "start":
            head = self.held.lstrip()
            if head.startswith(THINK_OPEN):
                self.held, self.state = head[len(THINK_OPEN) :], "inside"
            elif THINK_OPEN.startswith(head):
                return out  # could still become <think>: wait for more
            else:
                return self.flush()
        end = self.held.find(THINK_CLOSE)
        if end >= 0:
            out.append(("thinking", self.held[:end]))
            rest = self.held[end + len(THINK_CLOSE) :].lstrip()
            self.held, self.state = "", "off" if rest else "after"
            return out + [("text", rest)] if rest else out
        keep = len(self.held) - _partial_suffix(self.held, THINK_CLOSE)
        out.append(("thinking", self.held[:keep]))
        self.held = self.held[keep:]
        return out

    def flush(self) -> list[tuple[str, str]]:
        """Whatever is held, as what it is now; no tags are looked for after this."""
        held, kind = self.held, "thinking" if self.state == "inside" else "text"
        self.held, self.state = "", "off"
        return [(kind, held)] if held else []


# --- tool calls written as text (a model or server without a tool-call parser) ----------------------
# The formats models really emit; each is checked against its chat template or its server's parser in the tests.

_CALL_MARKERS = ("<tool_call>", "<function=", "<function_calls>", "<minimax:tool_call>", "[TOOL_CALLS]")
_CODE_FENCE = "```"
_MARK_OR_CODE_FENCE = re.compile("|".join(re.escape(m) for m in _CALL_MARKERS + (_CODE_FENCE,)))
_FENCE_ONLY = re.compile(re.escape(_CODE_FENCE))
_CALL_ENDS = {
    "<tool_call>": "</tool_call>",
    "<function=": "</function>",
    "<function_calls>": "</function_calls>",
    "<minimax:tool_call>": "</minimax:tool_call>",
}
_WATCH_CHAR = re.compile(r"[<\[`]")
_LONGEST_MARKER = max(len(m) for m in _CALL_MARKERS)
# a marker or a fence, or the beginning of one at the very end of a piece: anything else is plain text
_MAYBE_MARKER = re.compile(
    "|".join(
        [re.escape(m) for m in _CALL_MARKERS + (_CODE_FENCE,)]
        + [re.escape(m[:n]) + r"\Z" for m in _CALL_MARKERS + (_CODE_FENCE,) for n in range(1, len(m))]
    )
)
_FUNCTION_XML = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|\Z)", re.S)
_PARAMETER_XML = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|\Z)", re.S)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)(?:</arg_value>|\Z)", re.S)
_INVOKE = re.compile(r'<invoke name="([^"]*)">(.*?)(?:</invoke>|\Z)', re.S)
_INVOKE_PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)(?:</parameter>|\Z)', re.S)
_JSON_CALL_HEAD = re.compile(r'\s*\{\s*"([^"\\]*)"\s*:\s*(?:"([^"\\]*)")?')
_JSON_CALL_KEYS = frozenset(("name", "arguments", "parameters", "id", "type"))  # Mistral adds an id
_DECODER = json.JSONDecoder()


def _trim_newline(value: str) -> str:
    """An XML value as the templates write it (`>\\nVALUE\\n<`): one surrounding newline removed."""
    if value.startswith("\n"):
        value = value[1:]
    return value[:-1] if value.endswith("\n") else value


def typed_value(value: str, schema: Any) -> Any:
    """A parameter written as XML text -> the type its input_schema gives (string kept verbatim, minus the
    surrounding newline; number, integer, boolean, object, array parsed as JSON; unparseable: the text)."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind in (None, "string"):
        return _trim_newline(value)
    text = value.strip()
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return loads(text)
    except (ValueError, RecursionError):
        return _trim_newline(value)


def _xml_arguments(pairs: list[tuple[str, str]], schema: Any) -> dict[str, Any]:
    props = (schema or {}).get("properties") if isinstance(schema, dict) else None
    props = props if isinstance(props, dict) else {}
    return {key.strip(): typed_value(value, props.get(key.strip())) for key, value in pairs}


def _json_call(obj: Any) -> Optional[tuple[str, Any]]:
    """{"name": ..., "arguments" | "parameters": {...} or a JSON string} -> (name, arguments)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not set(obj) <= _JSON_CALL_KEYS:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return obj["name"], args  # ToolCall repairs it, or closes it as it can
    return (obj["name"], args) if isinstance(args, dict) else None


def _json_or_raw(text: str) -> Any:
    """The JSON value that is the whole text, or None."""
    try:
        return loads(text)
    except (ValueError, RecursionError):
        return None


def parse_text_calls(marker: str, body: str, tools: dict[str, Any], whole: bool) -> Optional[list[tuple[str, Any]]]:
    """The text after `marker` up to its closing tag (whole) or up to where the answer was cut off ->
    [(tool name, arguments dict | raw JSON text)], or None when it is not a call of an offered tool."""
    calls: list[tuple[str, Any]] = []
    if marker in ("<tool_call>", "<function="):
        text = body.strip() if marker == "<tool_call>" else "<function=" + body
        if text.startswith("{"):  # Hermes / Qwen2.5 / Qwen3: JSON
            obj = _json_or_raw(text)
            if obj is None and not whole:
                head = _JSON_CALL_HEAD.match(text)
                name = head.group(2) if head and head.group(1) == "name" else None
                raw = re.search(r'"(?:arguments|parameters)"\s*:\s*', text)
                if name and raw:
                    calls.append((name, text[raw.end() :]))
            elif obj is not None and _json_call(obj):
                calls.append(_json_call(obj))  # type: ignore[arg-type]
        elif text.startswith("<function="):  # Qwen3-Coder XML
            for match in _FUNCTION_XML.finditer(text):
                name = match.group(1).strip()
                calls.append((name, _xml_arguments(_PARAMETER_XML.findall(match.group(2)), tools.get(name))))
        else:  # GLM-4.5+: NAME then <arg_key>/<arg_value> pairs
            name = re.split(r"<arg_key>|\n", text, maxsplit=1)[0].strip()
            calls.append((name, _xml_arguments(_GLM_ARG.findall(text), tools.get(name))))
    elif marker in ("<function_calls>", "<minimax:tool_call>"):  # Anthropic-style XML; MiniMax-M2's own tag
        for match in _INVOKE.finditer(body):
            name = match.group(1).strip()
            calls.append((name, _xml_arguments(_INVOKE_PARAMETER.findall(match.group(2)), tools.get(name))))
    elif marker == "[TOOL_CALLS]":
        text = body.lstrip()
        if text.startswith("["):  # Mistral, JSON list
            items = _json_or_raw(text)
            if isinstance(items, list):
                calls.extend(c for c in map(_json_call, items) if c)
                if len(calls) < len(items):
                    return None
        elif "[ARGS]" in text:  # Mistral v11+: NAME[ARGS]{...}
            name, _, args = text.partition("[ARGS]")
            obj = _json_or_raw(args)
            calls.append((name.strip(), obj if isinstance(obj, dict) else args))
    elif marker == "{":  # a bare JSON object as the whole answer
        obj = _json_or_raw(body)
        if obj is not None and _json_call(obj):
            calls.append(_json_call(obj))  # type: ignore[arg-type]
    if not calls or any(name not in tools for name, _ in calls):
        return None
    return calls


def _split_name(head: str) -> tuple[str, bool]:
    """GLM: the tool name that opens a <tool_call>, and whether it is complete (a newline or `<` follows)."""
    for i, c in enumerate(head):
        if c in "\n<":
            return head[:i], True
    return head, False


def _json_end(text: str, final: bool) -> Optional[int]:
    """Where the JSON value at the start of `text` (after whitespace) ends, once it has; at the end of the
    answer a value cut off is taken as it is (its arguments are repaired like a cut-off native call)."""
    start = len(text) - len(text.lstrip())
    if text.rstrip()[-1:] in ("}", "]"):
        try:
            return _DECODER.raw_decode(text, start)[1]
        except ValueError:
            pass
    return len(text) if final else None


class TextCalls:
    """Tool calls that a model writes in its text (servers without a matching tool-call parser). Text in,
    ("text", piece) | ("call", (marker, name, arguments)) out; like ThinkTags, a marker may be split across
    chunks at any byte, and only what could still be a marker (or a call in progress) is held back: it is
    released unchanged the moment it cannot be a call of an offered tool. Markers inside a ``` fence are text.
    mode: start (only whitespace yet) -> text | call (after a marker) | bare (an answer that opens with `{`)."""

    __slots__ = ("tools", "held", "fence", "mode", "marker", "quiet", "searched", "more", "tail", "closed", "json")

    def __init__(self, tools: dict[str, Any]) -> None:
        self.tools = tools  # offered name -> input_schema
        self.held, self.fence, self.mode, self.marker = "", False, "start", ""
        self.quiet = False  # nothing held and no call in progress: a piece without <, [ or ` is plain text
        self.searched = 0  # how much of a call in progress was searched for its closing tag (long arguments)
        self.more: list[str] = []  # pieces of a long call's arguments, after `held`, not yet joined to it
        self.tail = ""  # the last characters of held + more: a closing tag may begin there
        self.closed = False  # the last non-blank character held is `}` or `]`: a JSON value may end there
        self.json: Optional[JsonPrefix] = None  # bare mode: the answer's JSON so far, checked piece by piece

    def plain(self, text: str) -> bool:
        """Nothing held, no call in progress, and nothing in this piece can begin a marker or a fence."""
        return self.quiet and (
            ("<" not in text and "[" not in text and "`" not in text) or _MAYBE_MARKER.search(text) is None
        )

    def feed(self, text: str) -> list[tuple[str, Any]]:
        if self.plain(text):
            return [("text", text)]
        if self._waits(text):  # pieces of a long call are kept apart until it may end (linear time)
            self.more.append(text)
            return []
        self.held += self.take_held() + text if self.more else text
        out = self._scan(False)
        self.quiet = self.mode == "text" and not self.held
        self.tail = self.held[-_LONGEST_MARKER:]
        self.closed = self.held.rstrip()[-1:] in ("}", "]")
        return out

    def _waits(self, text: str) -> bool:
        """Would this piece leave a long call in progress undecided, whatever it holds? A call with a closing tag
        whose head was judged on earlier chunks (the same test as in _call) waits for the tag; a JSON call (bare
        or Mistral's) long past its head can only end at a `}` or `]`."""
        if self.mode == "call" and self.marker in _CALL_ENDS:
            if self.searched <= len(self.marker) + 256:
                return False
            close = _CALL_ENDS[self.marker]
            window = self.tail + text
            self.tail = window[-(len(close) - 1) :]
            return close not in window
        if self.mode == "bare" and self.json is not None:  # it may end only once its JSON is whole (or broken)
            self.json.feed(text)  # fed every piece; past its head (judged early by _bare), it need not be rescanned
            return len(self.held) > 512 and not (self.json.is_whole or self.json.broken)
        if self.mode == "call" and self.marker == "[TOOL_CALLS]":
            return len(self.held) > 512 and not self.closed and "}" not in text and "]" not in text
        return False

    def take_held(self) -> str:
        """The pieces kept apart, joined (`held` is then all that is held)."""
        more, self.more = "".join(self.more), []
        return more

    def flush(self) -> list[tuple[str, Any]]:
        """The answer ended: a call in progress is closed as it is (cut off), anything else is text."""
        self.held += self.take_held()
        out = self._scan(True)
        if self.held:
            out.append(("text", self.held))
        self.held, self.mode, self.quiet = "", "text", True
        return out

    def _scan(self, final: bool) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        while self.held:
            if self.mode == "start":
                head = self.held.lstrip()
                if not head:
                    break
                self.mode = "bare" if head[0] == "{" else "text"
                if self.mode == "bare":
                    self.json = JsonPrefix()
                    self.json.feed(self.held)
            if self.mode == "bare":
                if not self._bare(final, out):
                    break
            elif self.mode == "text":
                match = (_FENCE_ONLY if self.fence else _MARK_OR_CODE_FENCE).search(self.held)
                if match is None:
                    keep = 0 if final else self._partial()
                    if len(self.held) > keep:
                        out.append(("text", self.held[: len(self.held) - keep]))
                        self.held = self.held[len(self.held) - keep :]
                    break
                if match.group() == _CODE_FENCE:
                    self.fence = not self.fence
                    out.append(("text", self.held[: match.end()]))
                    self.held = self.held[match.end() :]
                    continue
                if match.start():
                    out.append(("text", self.held[: match.start()]))
                    self.held = self.held[match.start() :]
                self.mode, self.marker, self.searched = "call", match.group(), 0
            elif not self._call(final, out):
                break
        return out

    def _partial(self) -> int:
        """Length of the held text's end that could still begin a marker (or a fence)."""
        tokens = (_CODE_FENCE,) if self.fence else _CALL_MARKERS + (_CODE_FENCE,)
        tail = self.held[-_LONGEST_MARKER + 1 :]
        for match in _WATCH_CHAR.finditer(tail):  # earliest first: the longest candidate
            rest = tail[match.start() :]
            if any(token.startswith(rest) for token in tokens):
                return len(rest)
        return 0

    def _as_text(self, n: int, out: list[tuple[str, Any]]) -> bool:
        """The first n held characters cannot begin a call: text; go on looking after them."""
        out.append(("text", self.held[:n]))
        self.held, self.mode = self.held[n:], "text"
        return True

    def _call(self, final: bool, out: list[tuple[str, Any]]) -> bool:
        """After a marker: True when the held text was decided (a call, or text), False to wait for more."""
        marker = self.marker
        if marker == "[TOOL_CALLS]":
            return self._mistral(self.held[len(marker) :], final, out)
        close = _CALL_ENDS[marker]
        searched, self.searched = self.searched, len(self.held)  # long arguments are searched once, not per chunk
        end = self.held.find(close, max(len(marker), searched - len(close)))
        if end < 0:
            if not final:
                if searched > len(marker) + 256:  # the head was judged on earlier chunks: a call is being written
                    return False
                head = self.held[len(marker) :]
                return self._plausible(marker, head) is False and self._as_text(len(marker), out)
            body = self.held[len(marker) :]
            calls = parse_text_calls(marker, body, self.tools, whole=False)
            if calls is None:
                return self._as_text(len(marker), out)
            self.held = ""
        else:
            calls = parse_text_calls(marker, self.held[len(marker) : end], self.tools, whole=True)
            if calls is None:
                return self._as_text(len(marker), out)
            self.held = self.held[end + len(close) :]
        out.extend(("call", (marker, name, args)) for name, args in calls)
        self.mode = "text"
        return True

    def _plausible(self, marker: str, body: str) -> Optional[bool]:
        """Can the text after a marker still become a call of an offered tool? None: cannot tell yet."""
        if marker in ("<function_calls>", "<minimax:tool_call>"):
            head = body.lstrip()
            probe = '<invoke name="'
            if len(head) < len(probe):
                return None if probe.startswith(head) else False
            if not head.startswith(probe):
                return False
            name, quote, _ = head[len(probe) :].partition('"')
            return self._name(name, bool(quote))
        if marker == "<function=":
            name, close, _ = body.partition(">")
            return self._name(name.strip(), bool(close))
        head = body.lstrip()  # <tool_call>
        if not head:
            return None
        if head[0] == "{":
            found = _JSON_CALL_HEAD.match(head)
            if found is None:
                return None if len(head) < 12 else False
            if found.group(1) not in _JSON_CALL_KEYS:
                return False
            if found.group(1) == "name" and found.group(2) is not None:
                return found.group(2) in self.tools
            return None
        if head.startswith("<"):
            if "<function=".startswith(head[:10]):
                return None if len(head) < 10 else self._plausible("<function=", head[10:])
            return False
        name, complete = _split_name(head)  # GLM: NAME, then a newline or <arg_key>
        return self._name(name.strip(), complete)

    def _name(self, name: str, complete: bool) -> Optional[bool]:
        if complete:
            return name in self.tools
        return None if any(t.startswith(name) for t in self.tools) else False

    def _mistral(self, body: str, final: bool, out: list[tuple[str, Any]]) -> bool:
        head = body.lstrip()
        skipped = len(body) - len(head)
        if not head:
            return final and self._as_text(len(self.marker), out)
        if head[0] == "[":
            end = _json_end(head, final)
        else:
            name, args_tag, rest = head.partition("[ARGS]")
            if not args_tag:
                name = name[: len(name) - _partial_suffix(name, "[ARGS]")]
                if final or self._name(name.strip(), False) is False:
                    return self._as_text(len(self.marker), out)
                return False
            if name.strip() not in self.tools:
                return self._as_text(len(self.marker), out)
            end = _json_end(rest, final)
            end = None if end is None else len(name) + len(args_tag) + end
        if end is None:
            return False
        calls = parse_text_calls(self.marker, head[:end], self.tools, whole=True)
        if calls is None:
            return self._as_text(len(self.marker), out)
        self.held = self.held[len(self.marker) + skipped + end :]
        out.extend(("call", (self.marker, name, args)) for name, args in calls)
        self.mode = "text"
        return True

    def _bare(self, final: bool, out: list[tuple[str, Any]]) -> bool:
        found = _JSON_CALL_HEAD.match(self.held)
        if found is not None and (
            found.group(1) not in _JSON_CALL_KEYS or (found.group(2) is not None and found.group(2) not in self.tools)
        ):
            self.mode = "text"
            return True
        if found is None and len(self.held.lstrip()) > 12:
            self.mode = "text"
            return True
        end = _json_end(self.held, final)
        if end is None:
            return False
        calls = parse_text_calls("{", self.held[:end], self.tools, whole=True)
        if calls is None or self.held[end:].strip():  # a call only as the whole answer
            self.mode = "text"
            return True
        if not final:
            return False  # whitespace after it so far: wait for the end of the answer
        self.held = ""
        out.extend(("call", ("{", name, args)) for name, args in calls)
        self.mode = "text"
        return True


class StopStrings:
    """The request's stop_sequences, watched in the answer's text by the proxy itself (llama.cpp and Ollama
    stop on `stop` but do not say which string matched). Text in, (text before any match, the match) out;
    only what could be the start of a stop string is held back."""

    __slots__ = ("stops", "held", "first")

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self.first = re.compile("[" + "".join(sorted({re.escape(s[0]) for s in self.stops})) + "]")  # a match begins

    def plain(self, text: str) -> bool:
        """Nothing held, and nothing in this piece can begin a stop string."""
        return not self.held and self.first.search(text) is None

    def feed(self, text: str) -> tuple[str, Optional[str]]:
        if self.plain(text):
            return text, None
        return self._feed(text)

    def _feed(self, text: str) -> tuple[str, Optional[str]]:
        text = self.held + text
        first: Optional[tuple[int, str]] = None
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.held = ""
            return text[: first[0]], first[1]
        keep = max(_partial_suffix(text, stop) for stop in self.stops)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
    "end_turn": "end_turn",
    "max_tokens": "max_tokens",
}


@dataclass
class Outcome:
    """How an answer ended: what the final message_delta says, and what the log line and metrics read."""

    stop_reason: str
    stop_sequence: Optional[str]
    usage: dict[str, int]


class EventBuilder:
    """Backend deltas in, Anthropic stream events out: a pure fold (no I/O), the block grammar only.

    Call start_message(), then text()/content()/thinking()/tool_fragment()/tool_call()/usage()/
    backend_stop() as the backend's data arrives, then end_message(), which sets `outcome`; after each
    call `take()` returns the events produced so far as (name, payload). One block is open at a time;
    indexes count up across thinking, text and tool_use blocks. Inline <think> tags are split off by
    ThinkTags, tool-call fragments assembled by ToolCalls; with text_calls, calls written as text are found by
    TextCalls (and sent as whole calls unless native ones come); with stop_sequences, StopStrings cuts the text at
    the first match (`cut`: the relay then closes the backend stream)."""

    def __init__(
        self,
        msg_id: str,
        model: str,
        input_estimate: int,
        *,
        tool_names: Optional[dict[str, str]] = None,
        show_thinking: bool = True,
        usage_scale: float = 1.0,
        text_calls: Optional[TextCalls] = None,
        stop_sequences: Optional[list[str]] = None,
    ) -> None:
        self.msg_id, self.model = msg_id, model
        self.usage_scale = usage_scale  # 1.0 reports the backend's raw counts
        self.input_estimate = round(input_estimate * usage_scale)
        self.tool_names = tool_names or {}
        self.show_thinking = show_thinking
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.index = -1
        self.open: Optional[str] = None  # "text" | "thinking" | "tool"
        self.thinking_parts: list[str] = []
        self.held_back: list[tuple[str, str]] = []  # text and reasoning that came while a call's arguments streamed
        self.think = ThinkTags()
        self.tools = ToolCalls()
        self.text_calls = text_calls  # None: tool calls written as text stay text
        self.recovered: list[tuple[str, str, Any]] = []  # calls found in the text, sent unless native ones come
        self.stops = StopStrings(stop_sequences) if stop_sequences and any(stop_sequences) else None
        self.cut = False  # a stop sequence matched: the rest of the answer is not wanted
        self.reasoning_field: Optional[str] = None  # the field the backend sent its reasoning in
        self.tool_blocks = 0
        self.out_chars = 0
        self.stop_reason: Optional[str] = None  # the backend's, mapped; None until it says it stopped
        self.stop_sequence: Optional[str] = None
        self.backend_stopped = False  # the backend said it was done (finish_reason / done)
        self.usage_in: Optional[int] = None
        self.usage_out: Optional[int] = None
        self.cache_read = 0
        self.outcome: Optional[Outcome] = None  # set by end_message()

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        events, self.events = self.events, []
        return events

    def start_message(self) -> None:
        usage = {
            "input_tokens": self.input_estimate,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 1,
        }
        self.events.append(
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": self.msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": self.model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": usage,
                    },
                },
            )
        )

    # -- blocks --
    def _open(self, kind: str, block: dict[str, Any]) -> None:
        self._close()
        self._close()  # text held back during a tool call came out after it, in its own block
        self.index += 1
        self.open = kind
        self.events.append(
            ("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block})
        )

    def _delta(self, delta: dict[str, Any]) -> None:
        self.events.append(
            ("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})
        )

    def _args(self, piece: str) -> None:
        self.out_chars += len(piece)
        self._delta({"type": "input_json_delta", "partial_json": piece})

    def _close(self) -> None:
        if self.open is None:
            return
        if self.open == "thinking":
            text = "".join(self.thinking_parts)
            self.thinking_parts = []
            self._delta({"type": "signature_delta", "signature": thinking_signature(text, self.show_thinking)})
        elif self.open == "tool" and self.tools.active is not None:
            call, self.tools.active = self.tools.active, None
            for piece in call.close():
                self._args(piece)
        self.events.append(("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        self.open = None
        held, self.held_back = self.held_back, []
        if any(piece.strip() for _, piece in held):  # white space alone is dropped
            for kind, piece in held:
                self._stream(kind, piece)  # may leave a text or thinking block open

    def content(self, text: str) -> None:
        """Backend content: text, except inline <think>...</think> reasoning at the answer's start, tool calls
        written as text (when text_calls is given) and what follows a matched stop sequence."""
        if self.think.state != "off":
            return self._pieces(self.think.feed(text))
        if self.cut:
            return None
        stops, watcher = self.stops, self.text_calls
        if (stops is None or stops.plain(text)) and (watcher is None or (not self.recovered and watcher.plain(text))):
            return self.text(text)  # the hot path: nothing here can begin a stop string, a call marker or a fence
        return self._answer(text)

    def _pieces(self, pieces: list[tuple[str, str]]) -> None:
        for kind, piece in pieces:
            self.thinking(piece) if kind == "thinking" else self._answer(piece)

    def _answer(self, text: str) -> None:
        """The answer's text (after <think>): stop sequences, then tool calls written as text."""
        if self.cut:
            return
        matched = None
        if self.stops is not None:
            text, matched = self.stops.feed(text)
        self._watch(text)
        if matched is not None:
            self.cut, self.backend_stopped = True, True
            self.stop_reason, self.stop_sequence = "stop_sequence", matched

    def _watch(self, text: str) -> None:
        if self.text_calls is None:
            self.text(text)
        elif text:
            self._found(self.text_calls.feed(text))

    def _found(self, items: list[tuple[str, Any]]) -> None:
        for kind, value in items:
            if kind == "call":
                self.recovered.append(value)
            elif not self.recovered:
                self.text(value)
            elif value.strip():  # text after a recovered call: the call goes first
                self._send_recovered()
                self.text(value)

    def _send_recovered(self) -> None:
        calls, self.recovered = self.recovered, []
        for marker, name, arguments in calls:
            log.info("recovered a tool call written as text (%s...): %s", marker, self.tool_names.get(name, name))
            self._advance(self.tools.whole(None, name, arguments))

    def _native_calls(self) -> None:
        """Native tool_calls win over calls written as text: those are dropped, and text is text again."""
        watcher, self.text_calls = self.text_calls, None
        if watcher is None:
            return
        if self.recovered:
            log.info(
                "the backend sent native tool calls too: dropping %d call(s) found in the text", len(self.recovered)
            )
            self.recovered = []
        held = watcher.held + watcher.take_held()
        if held.strip():
            self.text(held)
        watcher.held = ""

    def text(self, text: str) -> None:
        if text and self.open == "text":  # the hot path: a piece more of the open text block
            self.out_chars += len(text)
            self._delta({"type": "text_delta", "text": text})
        elif text:
            self._stream("text", text)

    def thinking(self, text: str) -> None:
        if text and not self.cut:
            self._stream("thinking", text)

    def _stream(self, kind: str, text: str) -> None:
        """Text or reasoning into its block. While a tool call's arguments are still streaming (not yet a
        whole object; some servers interleave content), it is held back and sent after the call's block: closing
        the call now would cut its arguments short."""
        active = self.tools.active
        if self.open == "tool" and active is not None and not active.checker.is_whole:
            self.held_back.append((kind, text))
            return
        if self.open == "tool":
            self._close()  # may send held-back text, leaving its block open: this text joins it
        if self.open != kind:
            block = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            self._open(kind, block)
        self.out_chars += len(text)
        if kind == "text":
            self._delta({"type": "text_delta", "text": text})
        elif self.show_thinking:
            self._delta({"type": "thinking_delta", "thinking": text})
        else:  # hidden from the client: kept for the signature, which carries it
            self.thinking_parts.append(text)

    # -- tool calls --
    def tool_fragment(self, index: Optional[int], call_id: Optional[str], name: Optional[str], arguments: Any) -> None:
        """A piece of a streamed tool call; index None when the backend gives none."""
        if self.cut:
            return
        self._before_call()
        self._native_calls()
        self._advance(self.tools.fragment(index, call_id, name, arguments))

    def tool_call(self, call_id: Optional[str], name: Optional[str], arguments: Any) -> None:
        """A whole tool call in one piece."""
        if self.cut:
            return
        self._before_call()
        self._native_calls()
        self._advance(self.tools.whole(call_id, name, arguments))

    def _before_call(self) -> None:
        if self.think.state == "start":  # text held back in case it began a <think>: it precedes the call
            self._pieces([(kind, piece) for kind, piece in self.think.flush() if piece.strip()])

    def _advance(self, call: ToolCall) -> None:
        if call is self.tools.active:
            piece = call.take_safe()
            if piece:
                self._args(piece)
        elif self.tools.may_open(call):
            self._open_call(call)

    def _open_call(self, call: ToolCall) -> None:
        self._close()
        self.tools.open(call)
        name = self.tool_names.get(call.name, call.name)
        self._open("tool", {"type": "tool_use", "id": call.id, "name": name, "input": {}})
        self.tool_blocks += 1
        piece = call.take_safe()
        if piece:
            self._args(piece)

    # -- the end --
    def backend_stop(self, reason: Optional[str], stop_sequence: Optional[str] = None) -> None:
        """The backend says it stopped (finish_reason, done), and why."""
        if self.cut:  # the proxy matched a stop sequence itself
            return
        self.backend_stopped = True
        if reason:
            self.stop_reason = STOP_REASONS.get(reason, "end_turn")
        if stop_sequence:
            self.stop_reason, self.stop_sequence = "stop_sequence", stop_sequence

    def usage(self, input_tokens: Optional[int], output_tokens: Optional[int], cache_read: int = 0) -> None:
        if input_tokens is not None:
            self.usage_in = round(max(0, input_tokens - cache_read) * self.usage_scale)
            self.cache_read = round(cache_read * self.usage_scale)
        if output_tokens is not None:
            self.usage_out = output_tokens

    def end_message(self) -> None:
        self._pieces(self.think.flush())  # an unfinished "<thi" or an unclosed <think> at the very end
        if self.stops is not None and not self.cut:
            self._watch(self.stops.flush())
        if self.text_calls is not None:
            self._found(self.text_calls.flush())  # a call cut off (max_tokens) is closed like a native one
        if self.recovered:
            self._send_recovered()
        self._close()
        self._close()  # text held back during the last tool call
        for call in self.tools.pending():  # calls that could not stream live go out whole, in order
            if not call.name:
                log.warning("dropping a tool call without a name (arguments %r)", call.args[:MAX_SNIPPET_CHARS])
                continue
            self._open_call(call)
            self._close()
        stop = self.stop_reason or "end_turn"
        if self.tool_blocks and stop != "max_tokens":
            stop = "tool_use"
        stop_sequence = self.stop_sequence if stop == "stop_sequence" else None  # only with that reason
        usage = {
            "input_tokens": self.usage_in if self.usage_in is not None else self.input_estimate,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": self.usage_out if self.usage_out is not None else max(1, self.out_chars // 4),
        }
        self.outcome = Outcome(stop, stop_sequence, usage)
        delta = {"stop_reason": stop, "stop_sequence": stop_sequence}
        self.events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        self.events.append(("message_stop", {"type": "message_stop"}))


def fold_events(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Anthropic stream events -> the Message they describe (what the SDK's accumulator does)."""
    message: dict[str, Any] = {}
    parts: list[list[str]] = []
    for name, data in events:
        if name == "message_start":
            message = dict(data["message"], content=[])
            message["usage"] = dict(message["usage"])
        elif name == "content_block_start":
            message["content"].append(dict(data["content_block"]))
            parts.append([])
        elif name == "content_block_delta":
            delta = data["delta"]
            kind = delta["type"]
            if kind == "signature_delta":
                message["content"][data["index"]]["signature"] = delta["signature"]
            else:
                parts[data["index"]].append(delta.get("text") or delta.get("thinking") or delta.get("partial_json", ""))
        elif name == "content_block_stop":
            block = message["content"][data["index"]]
            joined = "".join(parts[data["index"]])
            if block["type"] == "text":
                block["text"] = joined
            elif block["type"] == "thinking":
                block["thinking"] = joined
            elif block["type"] == "tool_use":
                try:
                    block["input"] = loads(joined) if joined else {}
                except (ValueError, RecursionError):  # cannot happen with EventBuilder's output; never a 500 if it does
                    log.error(
                        "tool %s: streamed arguments are not valid JSON: %r",
                        block.get("name"),
                        joined[:MAX_SNIPPET_CHARS],
                    )
                    block["input"] = {}
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"].update(data["usage"])
    return message


_DELTA_FIELDS = {
    "text_delta": "text",
    "thinking_delta": "thinking",
    "input_json_delta": "partial_json",
    "signature_delta": "signature",
}


def sse(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    """Events -> SSE bytes, each with its `event:` line. Deltas (most events) are formatted directly:
    the same compact JSON as dumps() would give, without building and walking two dicts."""
    out = []
    for name, data in events:
        delta = data.get("delta") if name == "content_block_delta" else None
        field_name = _DELTA_FIELDS.get(delta["type"]) if delta else None
        if field_name and len(delta) == 2:
            out.append(
                f'event: content_block_delta\ndata: {{"type":"content_block_delta","index":{data["index"]},'
                f'"delta":{{"type":"{delta["type"]}","{field_name}":{dumps(delta[field_name])}}}}}\n\n'
            )
        else:
            out.append(f"event: {name}\ndata: {dumps(data)}\n\n")
    return "".join(out).encode()


# --- backend errors -> Anthropic errors (HTTP statuses, error bodies, context overflows) ------------


_LIMIT_PATTERNS = [  # what backends say when prompt + max_tokens do not fit (numbers by name)
    re.compile(r"maximum context length is (?P<ctx>\d+) tokens.{0,120}?\((?P<prompt>\d+) in the messages", re.S | re.I),
    re.compile(
        r"maximum context length is (?P<ctx>\d+) tokens(?: and|\. However,) your request has (?P<prompt>\d+) input",
        re.I,
    ),
    re.compile(
        r"maximum context length is (?P<ctx>\d+) tokens.{0,80}?your prompt contains at least (?P<prompt>\d+) "
        r"input tokens",
        re.S | re.I,
    ),
    re.compile(
        r"maximum context length is (?P<ctx>\d+) tokens.{0,60}?(?:resulted in|requested) (?P<prompt>\d+) tok",
        re.S | re.I,
    ),
    re.compile(r"n_prompt_tokens=(?P<prompt>\d+), n_ctx=(?P<ctx>\d+)"),  # llama.cpp (fields of its error)
    re.compile(r"\((?P<prompt>\d+) tokens\) exceeds the available context size \((?P<ctx>\d+) tokens\)", re.I),
    re.compile(  # LM Studio
        r"keep the first (?P<prompt>\d+) tokens when context the overflows.{0,80}?context length of only "
        r"(?P<ctx>\d+) tokens",
        re.S | re.I,
    ),
    re.compile(r"input \((?P<prompt>\d+) tokens\) is longer than the model's context length \((?P<ctx>\d+) tok", re.I),
    re.compile(r"prompt contains (?P<prompt>\d+) tokens.{0,40}?model with (?P<ctx>\d+) maximum context length", re.I),
    re.compile(r"supports at most (?P<cap>\d+) completion tokens", re.I),
]


_OVER_BY = re.compile(r"exceeded max context length by (\d+) tokens", re.I)  # Ollama


_OVERFLOW_WORDS = (  # context overflows that carry no usable numbers
    "context_length_exceeded",
    "exceeds the available context",
    "input length exceeds the context length",  # Ollama with truncate: false (HTTP 400; 500 in some versions)
    "prompt too long; exceeded",  # Ollama
    "prompt is longer than the context length",
    "exceed_context_size_error",
    "maximum context length",
    "is longer than the model's context length",
    "when context the overflows",  # LM Studio
    "greater than the context length",  # LM Studio
)


def context_limits(message: str) -> tuple[Optional[int], Optional[int], Optional[int]]:
    """(context window, prompt tokens, max completion tokens) from a backend's 400 text, where given."""
    for pattern in _LIMIT_PATTERNS:
        match = pattern.search(message)
        if match:
            found = match.groupdict()
            return tuple(int(found[k]) if found.get(k) else None for k in ("ctx", "prompt", "cap"))  # type: ignore
    return None, None, None


def backend_error_text(raw: bytes) -> str:
    """The backend's own error message from whatever body it sent (OpenAI, vLLM, Ollama, HTML, text)."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
        text = title.group(1) if title else re.sub(r"<[^>]+>", " ", text)
        return " ".join(text.split())[:500] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or dumps(error))[:MAX_ERROR_CHARS]
            if "n_prompt_tokens" in error and "n_ctx" in error:
                message += f" (n_prompt_tokens={error['n_prompt_tokens']}, n_ctx={error['n_ctx']})"
            return message
        return str(error)[:MAX_ERROR_CHARS]
    return text[:500]


def too_long(prompt: int, window: int) -> ApiError:
    """The error on which Claude Code compacts the conversation (it parses both numbers)."""
    return ApiError(400, f"prompt is too long: {prompt} tokens > {window} maximum", retry=False, kind="too_long")


def check_fits(estimate: int, route: Route) -> None:
    """Answer a request over the known window before the backend (which may cut it silently). No margin: the
    estimate counts Claude Code's requests ~10% low against Qwen's tokenizer with its chat template (README),
    so a request it puts over is over; a wrong refusal would only bring a due compaction a little earlier."""
    window = route.context_window
    if window and estimate > window:
        raise too_long(estimate, window)


_MODEL_MISSING = re.compile(r"model.{0,200}(?:not found|does not exist|not exist|unknown|no such)", re.I | re.S)


def map_backend_error(
    status: int,
    message: str,
    retry_after: Optional[str] = None,
    estimate: Optional[int] = None,
    window: Optional[int] = None,
    model: Optional[str] = None,
    listed: Union[list[str], tuple[str, ...]] = (),
) -> ApiError:
    """A backend HTTP error -> the Anthropic error the client sees (type, status, retry hint). A context
    overflow becomes `prompt is too long: N tokens > M maximum`, with the backend's numbers where it gives
    them, else with the proxy's estimate and the window it knows (Ollama's wordings carry no numbers)."""
    lowered = message.lower()
    if status in (400, 413, 422, 500):
        ctx, prompt, _ = context_limits(message)
        over = _OVER_BY.search(message)
        if over and window:
            ctx, prompt = window, window + int(over.group(1))
        if ctx and prompt and prompt >= ctx:  # Claude Code compacts on exactly this wording
            return too_long(prompt, ctx)
        if not (ctx and prompt) and any(w in lowered for w in _OVERFLOW_WORDS):
            ctx = ctx or window
            if ctx:
                return too_long(max(prompt or estimate or 0, ctx + 1), ctx)
            return ApiError(400, f"prompt is too long: {message}", retry=False, kind="too_long")
    text = f"backend returned HTTP {status}: {message}"
    kind = f"http_{status}"
    if model and status in (400, 404) and _MODEL_MISSING.search(message) or status == 404 and model:
        close = difflib.get_close_matches(model, listed, 3, 0.4) or list(listed[:8])
        text = f"the backend has no model {model!r} (HTTP {status}: {message}): check the model map or --model" + (
            f"; it lists {', '.join(close)}" if close else ""
        )
    if status == 401:
        return ApiError(
            401, f"the backend rejected the proxy's API key (PROVIDER_API_KEY): {message}", retry=False, kind=kind
        )
    if status in (400, 403, 404, 413):
        return ApiError(status, text, retry=False, kind=kind)
    if status == 422:
        return ApiError(400, text, retry=False, kind=kind)
    if status == 429:
        return ApiError(429, text, retry=True, retry_after=retry_after, kind=kind)
    if status in (503, 529):
        return ApiError(529, text, retry=True, retry_after=retry_after, kind=kind)
    if status in (408, 504):
        return ApiError(504, text, retry=True, kind=kind)
    if status >= 500:
        return ApiError(502, text, retry=True, kind=kind) if status == 502 else ApiError(500, text, kind=kind)
    return ApiError(400, text, retry=False, kind=kind)


# --- backend payloads -> builder calls (one function per provider, both pure) ---------------------


def stream_error(error: Any) -> ApiError:
    """An error object inside a backend stream -> the ApiError for `event: error`."""
    if isinstance(error, dict):
        message = str(error.get("message") or error)
        kind = str(error.get("type") or "")
    else:
        message, kind = str(error), ""
    if any(w in message.lower() for w in _OVERFLOW_WORDS):  # an Ollama that sends its overflow after a 200
        return map_backend_error(400, message)
    overloaded = any(w in (message + kind).lower() for w in ("overload", "capacity", "queue", "unavailable"))
    return ApiError(
        529 if overloaded else 500, f"backend error during the stream: {message}"[:MAX_ERROR_CHARS], kind="stream_error"
    )


def _parts_text(parts: Any) -> str:
    """Content given as a list of parts (some servers): its text."""
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict)) if isinstance(parts, list) else ""


def openai_decode(obj: dict[str, Any], ev: EventBuilder) -> None:
    """One Chat Completions object (a stream chunk, or a whole non-streaming response)."""
    error = obj.get("error")
    if error:
        raise stream_error(error)
    usage = obj.get("usage")
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        ev.usage(usage.get("prompt_tokens"), usage.get("completion_tokens"), details.get("cached_tokens") or 0)
    for choice in obj.get("choices") or ():
        if choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta") or choice.get("message") or {}
        content = delta.get("content")
        if len(delta) == 1 and content:  # the common chunk: one piece of text
            ev.content(content if isinstance(content, str) else _parts_text(content))
            if choice.get("finish_reason"):
                ev.backend_stop(choice["finish_reason"])
            continue
        reasoning = delta.get("reasoning_content")
        if not reasoning and delta.get("reasoning"):
            reasoning = delta["reasoning"]
            ev.reasoning_field = "reasoning"
        elif reasoning:
            ev.reasoning_field = "reasoning_content"
        if not reasoning and delta.get("reasoning_details"):
            reasoning = "".join(
                d.get("text") or d.get("summary") or "" for d in delta["reasoning_details"] if isinstance(d, dict)
            )
        if reasoning:
            ev.thinking(reasoning)
        if content:
            ev.content(content if isinstance(content, str) else _parts_text(content))
        for i, call in enumerate(delta.get("tool_calls") or ()):
            fn = call.get("function") or {}
            index = call.get("index", None if "delta" in choice else i)
            ev.tool_fragment(index, call.get("id"), fn.get("name"), fn.get("arguments"))
        finish = choice.get("finish_reason")
        if finish:
            stop = choice.get("stop_reason")  # vLLM: the stop string that matched
            ev.backend_stop(finish, stop if isinstance(stop, str) and finish == "stop" else None)


def ollama_decode(obj: dict[str, Any], ev: EventBuilder) -> None:
    """One /api/chat object (an NDJSON line, or the whole non-streaming response)."""
    error = obj.get("error")
    if error:
        raise stream_error(error)
    message = obj.get("message") or {}
    if message.get("thinking"):
        ev.thinking(message["thinking"])
    if message.get("content"):
        ev.content(message["content"])
    for call in message.get("tool_calls") or ():  # Ollama sends each call whole
        fn = call.get("function") or {}
        ev.tool_call(call.get("id"), fn.get("name"), fn.get("arguments"))
    if obj.get("done"):
        ev.usage(obj.get("prompt_eval_count"), obj.get("eval_count"))
        ev.backend_stop(obj.get("done_reason") or "stop")


# ======================================================================================
# 7. PROVIDERS
# ======================================================================================
# A provider is small: where to POST, how the stream is framed, which pure functions build
# the body and decode the answer, and how to list models. All I/O is shared (section 6).


def _positive_int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class Provider:
    chat_path: str
    models_path: str
    framing: str  # "sse" or "ndjson"
    decode: Any  # staticmethod (backend JSON object, EventBuilder) -> None, in section 4

    def body(self, conv: Conversation, req: MessagesRequest, route: Route) -> tuple[dict[str, Any], dict[str, str]]:
        """-> (backend body, backend tool name -> client tool name for names the backend renamed)."""
        raise NotImplementedError

    def models(self, data: Any) -> list[dict[str, Any]]:
        raise NotImplementedError


class OpenAIProvider(Provider):
    chat_path, models_path, framing = "/chat/completions", "/models", "sse"
    decode = staticmethod(openai_decode)

    def body(self, conv: Conversation, req: MessagesRequest, route: Route) -> tuple[dict[str, Any], dict[str, str]]:
        official = "openai.com" in route.base_url or "openai.azure.com" in route.base_url
        history = route.reasoning_history
        if history is None and ("deepseek" in route.base_url or "deepseek" in route.model.lower()):
            history = True  # DeepSeek's thinking mode rejects tool turns without their reasoning
        # else None: the current tool loop's reasoning goes back (Qwen3, MiniMax-M2, Kimi-K2, GLM-4.6, gpt-oss)
        body = openai_request(conv, req, route, official=official, reasoning_history=history)
        renamed = {openai_tool_name(t.name): t.name for t in conv.tools if openai_tool_name(t.name) != t.name}
        return body, renamed

    def models(self, data: Any) -> list[dict[str, Any]]:
        """vLLM states max_model_len; llama.cpp's meta.n_ctx is its running context (its /props is more exact)."""
        models = []
        for m in (data or {}).get("data") or ():
            if isinstance(m, dict) and m.get("id"):
                meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
                window, source = _positive_int(m.get("max_model_len")), "max_model_len in /v1/models"
                if not window and _positive_int(meta.get("n_ctx")):
                    window, source = meta["n_ctx"], "llama.cpp n_ctx in /v1/models"
                models.append({"name": m["id"], "context_window": window, "source": source})
        return models


class OllamaProvider(Provider):
    chat_path, models_path, framing = "/api/chat", "/api/tags", "ndjson"
    decode = staticmethod(ollama_decode)

    def body(self, conv: Conversation, req: MessagesRequest, route: Route) -> tuple[dict[str, Any], dict[str, str]]:
        return ollama_request(conv, req, route), {}

    def models(self, data: Any) -> list[dict[str, Any]]:
        return [
            {"name": m["name"], "size": m.get("size")}
            for m in (data or {}).get("models") or ()
            if isinstance(m, dict) and m.get("name")
        ]


PROVIDER_IMPLS: dict[str, Provider] = {"openai": OpenAIProvider(), "ollama": OllamaProvider()}


def trained_context(show: Any) -> Optional[int]:
    """Ollama /api/show -> the context length the model was trained for (model_info.<arch>.context_length)."""
    info = (show or {}).get("model_info") if isinstance(show, dict) else None
    if not isinstance(info, dict):
        return None
    arch = info.get("general.architecture")
    found = _positive_int(info.get(f"{arch}.context_length"))
    return found or next(
        (_positive_int(v) for k, v in info.items() if k.endswith(".context_length") and _positive_int(v)), None
    )


# Fields a backend may reject for a model; on a 400 that names one, it is dropped (and remembered).
OPTIONAL_FIELDS = (
    "reasoning_effort",
    "response_format",
    "top_k",
    "parallel_tool_calls",
    "user",
    "think",
    "format",
    "stream_options",
)


REASONING_HISTORY_FIELD = "reasoning_content"  # as built; renamed to `reasoning` for backends that use that one
# What servers answer when a model or server cannot take `tools` (Ollama, vLLM, llama.cpp without --jinja, others).
_NO_TOOLS = re.compile(
    r"does not support tools|auto.? tool choice requires|--enable-auto-tool-choice|requires --jinja|"
    r"tools? (?:is|are) not supported|does not support (?:tool|function)[ _-]?call|tool use is not supported",
    re.I,
)


def native_tools_fix(message: str, provider: str) -> str:
    """The server's own fix for a model that takes no `tools`, for the WARNING."""
    lowered = message.lower()
    if "auto-tool-choice" in lowered or "tool-call-parser" in lowered or 'auto" tool choice' in lowered:
        return (
            "start vLLM with --enable-auto-tool-choice --tool-call-parser PARSER (hermes for Qwen2.5/Qwen3, "
            "qwen3_coder for Qwen3-Coder, glm45 for GLM-4.5+, mistral, llama3_json, ...)"
        )
    if "jinja" in lowered:
        return "start llama-server with --jinja (and --chat-template-file if the model's template has no tools)"
    if provider == "ollama" or "does not support tools" in lowered:  # Ollama's wording, on both its APIs
        return "use a model whose template supports tools (`ollama show MODEL` lists `tools` under Capabilities)"
    return "enable tool calling on the server for this model"


_WANTS_COMPLETION_TOKENS = re.compile(r"use .?max_completion_tokens.? instead|max_tokens.? is not supported", re.I)


# ======================================================================================
# 8. STREAMING AND BACKEND I/O
# ======================================================================================


_EMBEDS_IPV4 = tuple(  # IPv6 prefixes whose last 32 bits are an IPv4 address: NAT64 (well-known, local), SIIT,
    ipaddress.ip_network(n)
    for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96")  # IPv4-compatible
)


def _public_address(address: str) -> bool:
    """--fetch-images: an address on the public internet (not one of the private IPv4 inside IPv6 forms)?"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    inner = None
    if ip.version == 6:
        embedded = any(ip in net for net in _EMBEDS_IPV4)
        inner = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if embedded else None)
    return ip.is_global and (inner is None or inner.is_global)


class NotPublic(Exception):
    """--fetch-images: an image URL's host is not on the public internet."""


class PublicResolver(aiohttp.abc.AbstractResolver):
    """--fetch-images: the image connector's resolver. It looks a name up once and refuses it if any address is
    not public, so the connection goes to an address that was checked (no second lookup that a DNS-rebinding
    name could answer differently). Address literals never reach a resolver: Backend.fetch_image checks them."""

    def __init__(self, inner: aiohttp.abc.AbstractResolver) -> None:
        self.inner = inner

    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> Any:
        hosts = await self.inner.resolve(host, port, family)
        if not hosts or not all(_public_address(h["host"]) for h in hosts):
            raise NotPublic(host)
        return hosts

    async def close(self) -> None:
        await self.inner.close()


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return dumps_bytes(body)
    except (TypeError, ValueError, RecursionError) as exc:
        if not too_deep(exc):
            raise
        raise TOO_DEEP from None


_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", ())  # aiohttp >= 3.10 tells connecting apart


def _max_tokens_slot(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Where a backend body keeps its output limit: (the dict, the key)."""
    holder = body.get("options", body)
    return holder, next(f for f in ("num_predict", "max_completion_tokens", "max_tokens") if f in holder)


def _names_field(message: str, name: str) -> bool:
    """Does a backend's 400 text name this request field as the problem (not merely contain the word)?"""
    if name == "think" and "does not support thinking" in message:
        return True
    return (
        re.search(
            rf"""['"`]{name}['"`]|(?:argument|parameter|field|property|key)s?(?: supplied)?:? {name}\b""", message, re.I
        )
        is not None
    )


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """A body, read to its end or to `limit` bytes (then one byte more, so the caller can tell)."""
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


class ClientGone(Exception):
    """The client closed its connection: stop, close the backend request, log one INFO line."""


# --- backend stream framing: bytes in, JSON payloads out (sans-I/O, like h11) ----------------------


class LineFrames:
    """NDJSON (Ollama): every non-blank line is one payload. `feed` takes bytes split anywhere and returns
    the payloads completed by them; `flush` returns a last line that had no newline. A line longer than
    MAX_LINE_BYTES is an error. `done` is True when the framing itself said the answer is complete."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        end = data.rfind(b"\n")  # only the new bytes can hold a new line end
        if end < 0:
            if len(buf) > MAX_LINE_BYTES:
                raise ApiError(502, f"backend sent a line longer than {MAX_LINE_BYTES >> 20} MiB", kind="oversized")
            return []
        end += len(buf) - len(data)
        lines = bytes(buf[:end]).split(b"\n")
        del buf[: end + 1]
        return self.payloads(lines)

    def flush(self) -> list[bytes]:
        tail, self.buf = bytes(self.buf), bytearray()
        return self.payloads([tail])

    def payloads(self, lines: list[bytes]) -> list[bytes]:
        return [line for line in lines if line.strip()]


class SSEFrames(LineFrames):
    """Server-sent events (OpenAI-compatible servers): the payloads are the `data:` fields, one per line as
    every such server sends them; comments (`: keep-alive`), `event:`/`id:`/`retry:` fields and blank
    lines are skipped, CRLF line ends are accepted, and `data: [DONE]` ends the answer (`done`)."""

    def payloads(self, lines: list[bytes]) -> list[bytes]:
        out = []
        for line in lines:
            if line.startswith(b"data:") and not self.done:
                line = line[5:].strip()
                if line == b"[DONE]":
                    self.done = True
                elif line:
                    out.append(line)
        return out


class WholeBody:
    """A server that ignored `stream` and answered with one JSON body: that body is the one payload,
    complete by definition once the response ends."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        if len(self.buf) > MAX_LINE_BYTES:
            raise ApiError(502, f"backend answer is larger than {MAX_LINE_BYTES >> 20} MiB", kind="oversized")
        return []

    def flush(self) -> list[bytes]:
        self.done = True
        return [bytes(self.buf)]


def frames_for(content_type: str, provider: Provider) -> Union[LineFrames, WholeBody]:
    """The decoder for a backend response, from its content type and the provider's stream format."""
    if "json" in content_type and "ndjson" not in content_type:
        return WholeBody()
    return SSEFrames() if provider.framing == "sse" else LineFrames()


# --- one request's relay ---------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What one request's log line and metrics report, filled in as the request goes."""

    model: Optional[str] = None  # as the client named it
    backend_model: Optional[str] = None
    provider: Optional[str] = None
    stream: Optional[bool] = None
    first_event: Optional[float] = None  # monotonic time of the first streamed event
    retries: int = 0
    outcome: Optional[Outcome] = None
    error: Optional[str] = None
    error_kind: Optional[str] = None  # set for failures that are not the client's own mistakes
    counted: Optional[int] = None  # count_tokens: the answer

    def failed(self, error: ApiError) -> None:
        self.error, self.error_kind = error.message, error.kind


@dataclass
class Exchange:
    """One client request translated for its backend, and the fold its answer goes through (the parsed
    request itself is not kept: a stream holds only what it needs)."""

    prewarm: bool  # max_tokens 0: no backend call, an empty answer
    stream: bool
    input_estimate: int  # heuristic prompt tokens (unscaled), for clamping max_tokens
    route: Route
    provider: Provider
    body: dict[str, Any]
    builder: EventBuilder
    request_id: str
    record: RequestRecord
    sent_max_tokens: int = 0  # the output limit the backend was given, after the lessons it taught
    prompt_tools: Optional[typing.Callable[[], dict[str, Any]]] = None  # the body with tools in the system prompt
    text_calls: Optional[TextCalls] = None  # the watcher for tool calls written as text, on or off


# Claude Code compacts when a conversation comes within ~33k tokens (20k for the answer, 13k of margin) of the
# window it assumes for the model name: 1M for its default claude-opus-5-5 and for names it does not know.
CLIENT_COMPACT_BUFFER = 33_000
CLIENT_WINDOW_FLOOR = 100_000  # Claude Code reads a CLAUDE_CODE_AUTO_COMPACT_WINDOW under this as this
CLIENT_MIN_WINDOW = 132_000  # told to Claude Code by `run` for smaller models: it compacts at 75% of theirs
_CLAUDE_200K = re.compile(r"claude-(?:[a-z]+-)?[34](?:[-.]|$)")  # claude-sonnet-4-5, claude-3-5-haiku-…


def client_believed_window(model: str) -> int:
    """The context window Claude Code 2.1.332 assumes for a model name it sends (without env overrides)."""
    if "[1m]" not in model.lower() and _CLAUDE_200K.match(model.lower()):
        return 200_000
    return 1_000_000  # claude-*-5 models, and names it does not know (with a warning)


def compaction_point(window: int) -> int:
    """Prompt size at which a conversation should be compacted: leave 33k (Claude Code's own reserve for the
    answer and the summary), but at least a quarter of a small window."""
    return window - min(CLIENT_COMPACT_BUFFER, window // 4)


def usage_scale(client_window: int, window: int) -> float:
    """Factor for reported input tokens so that Claude Code, which compacts at client_window - 33k, does so
    when the real prompt reaches compaction_point(window). With client_window = max(window, 132k) (what `run`
    tells it) the factor is client_window / window: /context then shows the true fraction of the window."""
    client_window = max(client_window, CLIENT_WINDOW_FLOOR)  # Claude Code reads smaller windows as 100k
    return max(1.0, (client_window - CLIENT_COMPACT_BUFFER) / compaction_point(window))


class Backend:
    """The shared HTTP client, model discovery, and what each backend model was seen to reject."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.session: Optional[aiohttp.ClientSession] = None
        self.images: Optional[aiohttp.ClientSession] = None  # --fetch-images: public addresses only
        self.image_resolver: Optional[PublicResolver] = None
        self.rejected: dict[tuple[str, str], set[str]] = {}
        self.limits: dict[tuple[str, str], tuple[Optional[int], Optional[int]]] = {}  # (context, max output)
        self.discovered: dict[str, str] = {}  # family -> backend model (zero-config)
        self.backend_models: list[str] = []
        self.windows: dict[str, tuple[int, str]] = {}  # backend model -> (running context, where it was read)
        self.trained: dict[str, Optional[int]] = {}  # Ollama model -> trained context length (/api/show)
        self.token_cache: dict[str, int] = {}
        self.capped: set[str] = set()  # models warned about for their own output cap
        self.in_flight: set[Any] = set()  # the Watch of every request at work (shutdown ends them)
        self.at_work = 0  # /v1/messages requests being handled, from their first byte (shutdown waits for them)
        self.stopping = False  # the shutdown grace is over: work that starts now ends at once
        self._discovered_at = 0.0
        self.list_problem: Optional[str] = None  # why the model list failed, with the likely fix
        self.prompt_tools: set[tuple[str, str]] = set()  # models that take no `tools`: tools go in the prompt
        self.reasoning_fields: dict[tuple[str, str], str] = {}  # the field a model sends its reasoning in

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=CONNECTION_POOL, limit_per_host=CONNECTION_POOL, keepalive_timeout=KEEPALIVE_SECONDS
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, timeout=self.timeout(), json_serialize=dumps
        )
        if self.config.fetch_images:
            self.image_resolver = PublicResolver(aiohttp.DefaultResolver())
            self.images = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=self.image_resolver, use_dns_cache=False),
                timeout=aiohttp.ClientTimeout(total=IMAGE_FETCH_TIMEOUT),
            )

    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self.config.connect_timeout, sock_read=self.config.timeout
        )

    async def close(self) -> None:
        for session in (self.session, self.images):
            if session is not None:
                await session.close()
        self.session = self.images = None

    def headers(self, route: Route, request_id: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        if route.api_key:
            headers["authorization"] = f"Bearer {route.api_key}"
        return headers

    async def discover(self, *, force: bool = False) -> None:
        """Zero-config: ask the backend which models it has (at start, and on demand when a
        request maps to nothing; at most every DISCOVERY_INTERVAL)."""
        if not force and time.monotonic() - self._discovered_at < DISCOVERY_INTERVAL:
            return
        self._discovered_at = time.monotonic()
        config = self.config
        provider = PROVIDER_IMPLS[config.provider]
        url = config.base_url + provider.models_path
        assert self.session is not None
        try:
            async with self.session.get(
                url,
                headers=self.headers(config.default_route(""), new_id("req_")),
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            ) as resp:
                if resp.status != 200:
                    hint = base_url_hint(config.provider, config.base_url, resp.status)
                    self.list_problem = f"HTTP {resp.status} from {public_url(url)}" + (f": {hint}" if hint else "")
                    log.warning("backend model list failed: %s", self.list_problem)
                    return
                models = provider.models(await resp.json(content_type=None, loads=loads))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            hint = base_url_hint(config.provider, config.base_url, None)
            self.list_problem = f"is it running at {public_url(config.base_url)}? ({type(exc).__name__})" + (
                f"; {hint}" if hint else ""
            )
            log.warning("backend unreachable: %s; the proxy is up and will retry on demand", self.list_problem)
            return
        self.list_problem = None
        self.backend_models = [m["name"] for m in models]
        self.windows = {m["name"]: (m["context_window"], m["source"]) for m in models if m.get("context_window")}
        if config.provider == "openai":
            await self._server_windows()
        else:
            mapped = [r.model for r in config.routes.values() if r.base_url == config.base_url]
            await self._show([config.default_model or "", *self.backend_models[:40], *mapped])
        self.discovered = pick_models(models)
        if self.discovered:
            log.info(
                "backend models: %s; unmapped Claude models go to %s (haiku-class: %s)",
                ", ".join(self.backend_models[:20]),
                self.discovered["*"],
                self.discovered["haiku"],
            )
        else:
            log.warning("backend %s lists no models", public_url(config.base_url))
        for warning in self.map_warnings():
            warn_once(warning)
        self.log_windows()

    async def _get_json(self, url: str, body: Any = None, route: Optional[Route] = None) -> Any:
        """GET (or POST body) -> the JSON object answered, None on any failure (probes of optional endpoints)."""
        assert self.session is not None
        route = route or self.config.default_route("")
        try:
            async with self.session.request(
                "POST" if body is not None else "GET",
                url,
                data=None if body is None else dumps(body),
                headers=self.headers(route, new_id("req_")),
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
            ) as resp:
                data = await resp.json(content_type=None, loads=loads) if resp.status == 200 else None
                return data if isinstance(data, dict) else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    async def _server_windows(self) -> None:
        """OpenAI-compatible servers that state the context a request may use: llama.cpp's /props (the
        context of one slot: what a request gets), LM Studio's /api/v0/models (each loaded model's context)."""
        root = re.sub(r"/v1$", "", self.config.base_url)
        llama = any(src.startswith("llama.cpp") for _, src in self.windows.values())
        if len(self.backend_models) == 1 and (llama or not self.windows):
            props = await self._get_json(root + "/props")
            settings = (props or {}).get("default_generation_settings")
            n_ctx = _positive_int(settings.get("n_ctx")) if isinstance(settings, dict) else None
            if n_ctx:
                self.windows[self.backend_models[0]] = (n_ctx, "llama.cpp /props n_ctx")
        if any(name not in self.windows for name in self.backend_models):
            studio = await self._get_json(root + "/api/v0/models")
            for m in (studio or {}).get("data") or ():
                if isinstance(m, dict) and m.get("id") in self.backend_models and m.get("state") == "loaded":
                    loaded = _positive_int(m.get("loaded_context_length"))
                    if loaded:
                        self.windows[m["id"]] = (loaded, "LM Studio loaded_context_length")

    async def _show(self, names: list[str]) -> None:
        """Ollama: the trained context length of each model (/api/show), which caps the num_ctx sent."""
        todo = [n for n in dict.fromkeys(names) if n and n not in self.trained]
        shows = await asyncio.gather(*(self._get_json(self.config.base_url + "/api/show", {"model": n}) for n in todo))
        for name, show in zip(todo, shows):
            self.trained[name] = trained_context(show)

    def window(self, route: Route) -> Optional[int]:
        """The context a request to this backend model gets: for Ollama the num_ctx the proxy sends (the
        map's context_window, else --context-window, else 32768; never above the trained length); for the
        others the map's, else what the server states, else --context-window. None: unknown."""
        main = route.base_url == self.config.base_url
        if route.provider == "ollama":
            want = route.context_window or self.config.context_window or DEFAULT_NUM_CTX
            trained = self.trained.get(route.model) if main else None
            return min(want, trained) if trained else want
        stated = self.windows.get(route.model) if main else None
        return route.context_window or (stated[0] if stated else None) or self.config.context_window

    def map_warnings(self) -> list[str]:
        """Model-map mistakes: keys no Claude Code name can match, backend models the backend does not list."""
        config, listed = self.config, self.backend_models
        out = [
            f"model map key {key!r} matches no model name Claude Code sends"
            + (f" (did you mean {guess!r}?)" if guess else "")
            for key, guess in unlikely_claude_keys(list(config.model_map)).items()
        ]
        if listed:
            for key, route in config.routes.items():
                if route.base_url == config.base_url and route.model not in listed:
                    close = difflib.get_close_matches(route.model, listed, 3, 0.4)
                    out.append(
                        f"model map entry {key!r}: the backend does not list {route.model!r}"
                        + (f" (close: {', '.join(close)})" if close else f" (it lists {', '.join(listed[:8])})")
                    )
        return out

    def model_names(self) -> list[str]:
        """Every backend model a client can reach by its own name: the default, the backend's list, the map's."""
        config = self.config
        names = [config.default_model or "", *self.backend_models, *(r.model for r in config.routes.values())]
        return [name for name in dict.fromkeys(names) if name]

    def log_windows(self) -> None:
        """At start: the window each model runs with, where it comes from, and how to change it."""
        config = self.config
        routes = [resolve_route(config, n, None, self.backend_models) for n in self.model_names()]
        parts = []
        for route in dict.fromkeys(r for r in routes if r):
            window = self.window(route)
            if route.provider == "ollama":
                trained = self.trained.get(route.model)
                how = "num_ctx sent" + (f", trained for {trained}" if trained else "")
            else:
                stated = self.windows.get(route.model)
                how = "model map" if route.context_window else (stated[1] if stated else "--context-window")
            parts.append(f"{route.model} {window} ({how})" if window else f"{route.model} unknown")
        if parts:
            log.info(
                "context windows: %s; change with context_window in the model map or --context-window",
                ", ".join(parts[:20]),
            )

    def usage_scale(self, route: Route, client_model: str) -> float:
        """--scale-usage (and `run`): scale reported input tokens so that Claude Code compacts in time for the
        backend model's real window (see usage_scale())."""
        config = self.config
        if not route.context_window or not (config.scale_usage or config.client_window):
            return 1.0
        return usage_scale(config.client_window or client_believed_window(client_model), route.context_window)

    async def fetch_images(self, req: MessagesRequest) -> None:
        """Replace image URLs with their bytes (base64), for backends that take no URLs (Ollama): each URL
        once, and at most MAX_IMAGE_BYTES_PER_REQUEST in all."""
        fetched: dict[str, tuple[str, str]] = {}
        budget = MAX_IMAGE_BYTES_PER_REQUEST
        for message in req.messages:
            for block in message.content:
                sources = [
                    b.source
                    for b in (block.content if block.type == "tool_result" else [block])
                    if b.type == "image" and b.source.type == "url"
                ]
                for src in sources:
                    url = src.url or ""
                    if url not in fetched:
                        ctype, data = await self.fetch_image(url, budget)
                        budget -= len(data)
                        fetched[url] = ctype, base64.b64encode(data).decode()
                    src.type, (src.media_type, src.data) = "base64", fetched[url]

    async def fetch_image(self, url: str, budget: int) -> tuple[str, bytes]:
        """One image URL -> (media type, bytes), from a public address only, no redirect, at most
        MAX_IMAGE_BYTES and `budget` bytes. Errors say what was wrong, never which address a name has."""
        from yarl import URL  # what aiohttp connects to (urlsplit can read a URL differently)

        assert self.images is not None
        where = f"image url {url[:100]!r}"
        if not url.lower().startswith(("http://", "https://")):
            raise invalid("messages", f"{where}: only http and https URLs can be fetched")
        try:
            target = URL(url)
        except ValueError:
            raise invalid("messages", f"{where}: not a valid URL") from None
        host = target.raw_host or ""
        if (":" in host or host.replace(".", "").isdigit()) and not _public_address(host):  # a literal: no lookup
            raise invalid("messages", f"{where}: not a public address")
        limit = min(MAX_IMAGE_BYTES, budget)
        try:
            async with self.images.get(target, allow_redirects=False) as resp:
                ctype = resp.headers.get("content-type", "").split(";")[0].strip()
                if resp.status != 200 or ctype not in IMAGE_MEDIA_TYPES:
                    raise invalid(
                        "messages",
                        f"{where}: got HTTP {resp.status}, {ctype or 'no type'} (need an image "
                        f"of at most {MAX_IMAGE_BYTES >> 20} MiB, no redirect)",
                    )
                data = await read_capped(resp, limit)
        except NotPublic:
            raise invalid("messages", f"{where}: not a public address") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise invalid("messages", f"{where} could not be fetched: {type(exc).__name__}") from None
        if len(data) > limit:
            raise invalid(
                "messages",
                f"{where}: larger than {MAX_IMAGE_BYTES >> 20} MiB"
                if limit == MAX_IMAGE_BYTES
                else f"{where}: the request's images come to more than {MAX_IMAGE_BYTES_PER_REQUEST >> 20} MiB in all",
            )
        return ctype, data

    async def backend_token_count(self, req: MessagesRequest, route: Route) -> Optional[int]:
        """--count-tokens backend: the model's own tokenizer with its chat template applied (vLLM's
        /tokenize with messages, else llama.cpp's /apply-template + /tokenize). Cached; None -> heuristic."""
        if route.provider != "openai":
            return None
        assert self.session is not None
        body = openai_request(build_conversation(req, self.config.system_messages), req, route)
        payload = {"model": route.model, "messages": body["messages"], "add_generation_prompt": True}
        if "tools" in body:
            payload["tools"] = body["tools"]
        key = hashlib.sha256(dumps_bytes(payload)).hexdigest()
        if key in self.token_cache:
            return self.token_cache[key]
        root = re.sub(r"/v1$", "", route.base_url)
        count = (await self._get_json(root + "/tokenize", payload, route) or {}).get("count")  # vLLM
        if not isinstance(count, int):  # llama.cpp: render the chat template (tools too), then tokenize it
            template = {k: payload[k] for k in ("messages", "tools") if k in payload}
            prompt = (await self._get_json(root + "/apply-template", template, route) or {}).get("prompt")
            tokens = None
            if isinstance(prompt, str):
                tokenized = await self._get_json(root + "/tokenize", {"content": prompt, "add_special": True}, route)
                tokens = (tokenized or {}).get("tokens")
            count = len(tokens) if isinstance(tokens, list) else None
        if count is None:
            warn_once(f"backend {public_url(root)} has no usable tokenizer endpoint; count_tokens uses the heuristic")
            return None
        if len(self.token_cache) > BACKEND_TOKEN_CACHE_SIZE:
            self.token_cache.clear()
        self.token_cache[key] = count
        return count

    async def route(self, model: str) -> Route:
        """Client model name -> Route with the backend model's real context window (see window())."""
        config = self.config
        route = resolve_route(config, model, self.discovered, self.backend_models)
        if route is None and config.discover and not config.default_model:
            await self.discover()
            route = resolve_route(config, model, self.discovered, self.backend_models)
        if route is None:
            fix = (
                f'add it to the model map (--model-map / MODEL_MAP_JSON, e.g. {{"{model}": "qwen3-coder"}}) or set '
                "a default with --model / DEFAULT_MODEL"
            )
            if self.list_problem:  # the likely cause first: the backend's model list failed
                raise ApiError(
                    502,
                    f"the proxy could not list the backend's models ({self.list_problem}), so model {model!r} maps "
                    f"to nothing; fix the backend URL, or {fix}",
                    retry=False,
                    kind="unreachable",
                )
            raise ApiError(400, f"model {model!r} is not mapped to a backend model: {fix}", retry=False)
        if route.provider == "ollama" and route.base_url == config.base_url and route.model not in self.trained:
            await self._show([route.model])  # a model pulled after the start
        window = self.window(route)
        return route if window == route.context_window else dataclasses.replace(route, context_window=window)

    async def open(self, ex: Exchange) -> aiohttp.ClientResponse:
        """POST the exchange's body to its backend; return the 2xx response, or raise the mapped ApiError.
        A 400 that names what the model cannot take (`tools`, an optional field, max_tokens over its
        limit) is answered by adapting the body and sending it again, a few times at most; the lesson is
        remembered. Only the encoded body is kept while the backend thinks (a dict costs several times more)."""
        key = (ex.route.base_url, ex.route.model)
        body, ex.body = ex.body, {}
        prompt_mode = key in self.prompt_tools and ex.prompt_tools is not None
        if prompt_mode:
            body = self._prompt_tools(ex)
        self._apply_lessons(ex, key, body)
        data = _encode(body)
        del body
        for adaptation in range(MAX_BODY_ADAPTATIONS + 1):
            resp = await self._post(ex, data)
            if resp.status < 300:
                return resp
            try:
                raw = await read_capped(resp, MAX_ERROR_BODY_BYTES)
            except (aiohttp.ClientError, asyncio.TimeoutError, ApiError):
                raw = b""
            finally:
                resp.release()
            message = backend_error_text(raw)
            last = adaptation == MAX_BODY_ADAPTATIONS
            no_tools = resp.status in (400, 422, 500) and ex.prompt_tools is not None and not prompt_mode
            if no_tools and not last and _NO_TOOLS.search(message):
                prompt_mode = True
                self.prompt_tools.add(key)
                log.warning(
                    "backend model %s does not take tools (%s): tool definitions now go into the system prompt "
                    "and calls are read from the text; for native tool calling, %s",
                    ex.route.model,
                    message[:200],
                    native_tools_fix(message, ex.route.provider),
                )
                body = self._prompt_tools(ex)
                self._apply_lessons(ex, key, body)
                data = _encode(body)
                continue
            if resp.status in (400, 422) and not last:
                body = loads(data)
                if self._learn(ex, key, body, message):
                    data = _encode(body)
                    continue
            raise map_backend_error(
                resp.status,
                message,
                resp.headers.get("retry-after"),
                ex.input_estimate,
                ex.route.context_window,
                ex.route.model,
                self.backend_models if ex.route.base_url == self.config.base_url else (),
            )
        raise AssertionError("the last attempt returns or raises")

    def _prompt_tools(self, ex: Exchange) -> dict[str, Any]:
        """Switch the exchange to prompt-based tool calling: the body without `tools`, the watcher on."""
        assert ex.prompt_tools is not None
        ex.builder.text_calls = ex.text_calls
        return ex.prompt_tools()

    def remember(self, ex: Exchange) -> None:
        """After an answer: what it taught about the model (the field its reasoning came in)."""
        if ex.builder.reasoning_field:
            self.reasoning_fields[(ex.route.base_url, ex.route.model)] = ex.builder.reasoning_field

    def _apply_lessons(self, ex: Exchange, key: tuple[str, str], body: dict[str, Any]) -> None:
        rejected = self.rejected.get(key, set())
        field_name = self.reasoning_fields.get(key, "reasoning_content")
        for msg in body.get("messages") or ():
            if REASONING_HISTORY_FIELD in msg:
                if REASONING_HISTORY_FIELD in rejected:
                    del msg[REASONING_HISTORY_FIELD]
                elif field_name != REASONING_HISTORY_FIELD:
                    msg[field_name] = msg.pop(REASONING_HISTORY_FIELD)
        for name in rejected & body.keys():
            if name == "max_tokens":  # this backend wants the newer name
                body["max_completion_tokens"] = body.pop("max_tokens")
            else:
                del body[name]
        holder, field_name = _max_tokens_slot(body)
        context, cap = self.limits.get(key, (None, None))
        if cap and holder[field_name] > cap:
            holder[field_name] = cap
        if context and holder[field_name] > context - ex.input_estimate:
            holder[field_name] = max(1, context - ex.input_estimate)
        ex.sent_max_tokens = holder[field_name]

    def _learn(self, ex: Exchange, key: tuple[str, str], body: dict[str, Any], message: str) -> bool:
        """Adapt the body to a 400 that says what the model cannot take; False if nothing applies."""
        model = ex.route.model
        memory = self.rejected.setdefault(key, set())
        if "max_tokens" in body and _WANTS_COMPLETION_TOKENS.search(message):
            memory.add("max_tokens")
            body["max_completion_tokens"] = body.pop("max_tokens")
            log.warning("backend model %s wants max_completion_tokens; sending that from now on", model)
            return True
        holder, field_name = _max_tokens_slot(body)
        ctx, prompt, cap = context_limits(message)
        allowed = cap or (ctx - prompt if ctx and prompt and prompt < ctx else None)
        if allowed and allowed < holder[field_name]:
            known_ctx, known_cap = self.limits.get(key, (None, None))
            self.limits[key] = (ctx or known_ctx, cap or known_cap)
            holder[field_name] = ex.sent_max_tokens = allowed
            log.info("backend model %s: max_tokens lowered to %d to fit its limits", model, allowed)
            return True
        sent = [
            m
            for m in body.get("messages") or ()
            if isinstance(m, dict) and ("reasoning_content" in m or "reasoning" in m)
        ]
        if sent and (_names_field(message, "reasoning_content") or _names_field(message, "reasoning")):
            memory.add(REASONING_HISTORY_FIELD)
            for msg in sent:
                msg.pop("reasoning_content", None), msg.pop("reasoning", None)
            log.warning("backend model %s rejected earlier reasoning in messages; not sending it from now on", model)
            return True
        rejected = next((f for f in OPTIONAL_FIELDS if f in body and _names_field(message, f)), None)
        if rejected:
            memory.add(rejected)
            del body[rejected]
            log.warning("backend model %s rejected %r; sending requests without it from now on", model, rejected)
            return True
        return False

    def note_output_cap(self, ex: Exchange) -> None:
        """A `length` stop well below the limit the backend was given is the server's own output cap (llama.cpp
        -n, a Modelfile's num_predict): Claude Code then asks for continuations and reports its own maximum.
        Say so once per model, with the fix."""
        produced, outcome, model = ex.builder.usage_out, ex.builder.outcome, ex.route.model
        if not outcome or outcome.stop_reason != "max_tokens" or produced is None or model in self.capped:
            return
        if produced + OUTPUT_CAP_SLACK < ex.sent_max_tokens:
            self.capped.add(model)
            log.warning(
                "backend model %s stopped at %d output tokens ('length') although it was given %d: the server caps "
                "output on its own, so answers end early and Claude Code asks for continuations. Raise the server's "
                "limit (llama.cpp: -n/--n-predict; Ollama: num_predict in the Modelfile; vLLM: the model's "
                'generation_config max_tokens), or set "max_tokens": %d for this model in the model map',
                model,
                produced,
                ex.sent_max_tokens,
                produced,
            )

    async def _post(self, ex: Exchange, data: bytes) -> aiohttp.ClientResponse:
        """One POST; connection failures before any response byte are retried (jittered backoff)."""
        assert self.session is not None
        route = ex.route
        where = public_url(route.base_url)
        attempt = 0
        while True:
            try:
                return await self.session.post(
                    route.base_url + ex.provider.chat_path, data=data, headers=self.headers(route, ex.request_id)
                )
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if attempt >= self.config.retries:
                    raise ApiError(
                        502,
                        f"backend {where} is unreachable (is it running at {where}?): {type(exc).__name__}: {exc}"[
                            :500
                        ],
                        retry=True,
                        kind="unreachable",
                    ) from None
                attempt += 1
                ex.record.retries = attempt
                first, cap = RETRY_BACKOFF
                await asyncio.sleep(min(cap, first * 2**attempt) * random.uniform(0.5, 1.0))
            except asyncio.TimeoutError as exc:
                if isinstance(exc, _CONNECT_TIMEOUT):
                    raise ApiError(
                        504,
                        f"could not connect to backend {where} within {self.config.connect_timeout:g} s "
                        f"(is it running at {where}?)",
                        retry=True,
                        kind="connect_timeout",
                    ) from None
                raise ApiError(
                    504,
                    f"backend {where} did not answer within {self.config.timeout:g} s (a slow model may need more: "
                    "raise it with --timeout or PROVIDER_TIMEOUT_MS)",
                    retry=True,
                    kind="no_answer",
                ) from None
            except (aiohttp.ClientError, ValueError) as exc:  # ValueError: aiohttp refusing the URL or a header
                raise ApiError(
                    502,
                    f"backend request failed: {type(exc).__name__}: {exc}"[:500],
                    retry=True,
                    kind="connection_lost",
                ) from None


def _prompt_tools_body(provider: Provider, conv: Conversation, req: MessagesRequest, route: Route) -> dict[str, Any]:
    return provider.body(prompt_tools_conversation(conv, req), req, route)[0]


def exchange(
    req: MessagesRequest, route: Route, config: Config, usage_scale: float, request_id: str, record: RequestRecord
) -> Exchange:
    """A parsed request made ready for its route: the backend body, the prompt estimate, and the fold
    the answer will go through (all translation is in the pure functions of sections 5 and 6)."""
    provider = PROVIDER_IMPLS[route.provider]
    try:
        conv = build_conversation(req, config.system_messages)
        body, tool_names = provider.body(conv, req, route)
        estimate = count_request_tokens(req, conv)
    except (TypeError, ValueError, RecursionError) as exc:
        if not too_deep(exc):
            raise
        raise TOO_DEEP from None
    record.model, record.backend_model, record.provider = req.model, route.model, route.provider
    record.stream = bool(req.stream)
    check_fits(estimate, route)
    show_thinking = not (req.thinking and req.thinking.display == "omitted")
    calls_possible = bool(conv.tools) and not (req.tool_choice and req.tool_choice.type == "none")
    watcher, prompt_tools = None, None
    if calls_possible and output_schema(req) is None:
        offered = {t.name: t.input_schema for t in conv.tools}
        offered.update({alias: offered[name] for alias, name in tool_names.items()})
        watcher = TextCalls(offered)
        prompt_tools = functools.partial(_prompt_tools_body, provider, conv, req, route)
    text_calls = route.text_tool_calls if route.text_tool_calls is not None else config.text_tool_calls
    if prompt_tools is not None and route.tool_calls == "prompt":
        body, text_calls = prompt_tools(), True
    builder = EventBuilder(
        new_id("msg_"),
        req.model,
        estimate,
        tool_names=tool_names,
        show_thinking=show_thinking,
        usage_scale=usage_scale,
        text_calls=watcher if text_calls else None,
        stop_sequences=req.stop_sequences,
    )
    if log.isEnabledFor(logging.DEBUG):
        log.debug("backend request to %s: %s", public_url(route.base_url), dumps(body)[:MAX_DEBUG_CHARS])
    return Exchange(
        req.max_tokens == 0,
        bool(req.stream),
        estimate,
        route,
        provider,
        body,
        builder,
        request_id,
        record,
        prompt_tools=prompt_tools,
        text_calls=watcher,
    )


def decode_payload(ex: Exchange, raw: bytes) -> None:
    """One backend JSON object into the exchange's fold; any malformed or odd-shaped data is a 502."""
    try:
        obj = loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(502, f"backend sent malformed JSON: {raw[:MAX_SNIPPET_CHARS]!r}", kind="malformed") from None
    if not isinstance(obj, dict):
        raise ApiError(502, f"backend sent unexpected JSON: {raw[:MAX_SNIPPET_CHARS]!r}", kind="malformed")
    try:
        ex.provider.decode(obj, ex.builder)
    except (TypeError, AttributeError, KeyError, ValueError, RecursionError) as exc:
        raise ApiError(
            502,
            f"backend sent JSON of an unexpected shape ({type(exc).__name__}): {raw[:MAX_SNIPPET_CHARS]!r}",
            kind="malformed",
        ) from None


async def _fold(ex: Exchange, payloads: list[bytes], emit: Any) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("backend answer: %s", b"\n".join(payloads)[:4000].decode("utf-8", "replace"))
    try:
        for payload in payloads:
            decode_payload(ex, payload)
    finally:  # what the backend produced before a fault still reaches the client
        events = ex.builder.take()
        if events:
            await emit(events)


async def pump(resp: Optional[aiohttp.ClientResponse], ex: Exchange, emit: Any) -> None:
    """Read the backend's answer as it arrives: framing -> payloads -> the fold -> events, emitted per
    read. resp None: `max_tokens: 0` (a cache pre-warm), which asks for no output at all."""
    ev = ex.builder
    if resp is None:
        ev.backend_stop("length")
    else:
        frames = frames_for(resp.headers.get("content-type", ""), ex.provider)
        async for data in resp.content.iter_any():
            payloads = frames.feed(data)
            if payloads:
                await _fold(ex, payloads, emit)
            if frames.done or ev.cut:  # cut: a stop sequence matched, the rest is not wanted (resp is closed)
                break
        if not (frames.done or ev.cut):
            await _fold(ex, frames.flush(), emit)
        if not (ev.backend_stopped or frames.done):
            raise ApiError(
                502, "backend stream ended before the answer was complete (connection closed early)", kind="truncated"
            )
    ev.end_message()
    await emit(ev.take())


def relay_error(exc: BaseException, config: Config) -> ApiError:
    """Whatever ended a relay early -> the error the client sees (HTTP error or `event: error`)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return ApiError(
            504, f"backend sent nothing for {config.timeout:g} s (raise it with --timeout)", retry=True, kind="stalled"
        )
    if isinstance(exc, aiohttp.ClientError):
        return ApiError(
            502, f"backend connection lost: {type(exc).__name__}: {exc}"[:500], retry=True, kind="connection_lost"
        )
    log.exception("internal error while relaying the backend's answer")
    return ApiError(500, "internal proxy error (see the proxy's log)", kind="internal")


PING = sse([("ping", {"type": "ping"})])


def shutting_down() -> ApiError:
    return ApiError(529, "the proxy is shutting down: send the request again", retry=True, kind="shutdown")


class Watch:
    """`async with Watch(...)` around backend work: notices a client that went away (the request's
    task is cancelled, which closes the backend connection at once, and ClientGone comes out of the
    block) and, given the stream `out`, pings after `interval` s without a write (`last`)."""

    def __init__(self, request: web.Request, backend: Backend, out: Optional[web.StreamResponse] = None) -> None:
        self.request, self.interval, self.out = request, backend.config.ping_interval, out
        self.backend, self.in_flight = backend, backend.in_flight
        self.last = time.monotonic()
        self.gone = self.stopped = False
        self.task: Optional[asyncio.Task] = None
        self.watcher: Optional[asyncio.Task] = None

    async def __aenter__(self) -> Watch:
        if self.backend.stopping:
            raise shutting_down()
        self.task = asyncio.current_task()
        self.watcher = asyncio.create_task(self._watch())
        self.in_flight.add(self)
        return self

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        self.in_flight.discard(self)
        if not self.watcher.done():  # type: ignore[union-attr]
            self.watcher.cancel()  # type: ignore[union-attr]
            await asyncio.wait([self.watcher])  # type: ignore[list-item]  # our own cancellation still propagates
        if kind is asyncio.CancelledError and (self.gone or self.stopped):
            if hasattr(self.task, "uncancel"):  # Python 3.11+: the cancellation was ours, and it is handled
                self.task.uncancel()  # type: ignore[union-attr]
            if self.gone:
                raise ClientGone() from None
            raise shutting_down() from None
        return False

    def stop(self) -> None:
        """The proxy is shutting down and the grace period is over: end the work with an overloaded error."""
        if not self.gone and self.task is not None:
            self.stopped = True
            self.task.cancel()

    async def _watch(self) -> None:
        try:
            while True:  # wake every second, and (streams) exactly when a ping falls due
                due = self.interval - (time.monotonic() - self.last) if self.out is not None else 1.0
                await asyncio.sleep(max(0.01, min(1.0, due)))
                transport = self.request.transport
                if transport is None or transport.is_closing():
                    break
                if self.out is not None and time.monotonic() - self.last >= self.interval:
                    self.last = time.monotonic()
                    await self.out.write(PING)
        except (ConnectionError, RuntimeError):
            pass
        self.gone = True
        self.task.cancel()  # type: ignore[union-attr]


def _watching(request: Optional[web.Request], backend: Backend) -> Any:
    """A Watch without pings, or nothing when there is no client to watch (--check)."""
    return Watch(request, backend) if request is not None else contextlib.nullcontext()


async def open_backend(
    request: Optional[web.Request], backend: Backend, ex: Exchange
) -> Optional[aiohttp.ClientResponse]:
    """backend.open(ex), abandoned at once if the client leaves meanwhile (a local model can take
    minutes before its first byte). None for a pre-warm (max_tokens 0): nothing to ask."""
    if ex.prewarm:
        return None
    async with _watching(request, backend):
        return await backend.open(ex)


def _relayed(backend: Backend, ex: Exchange, resp: Optional[aiohttp.ClientResponse], *, failed: bool) -> None:
    """After a relay, whatever happened: the backend connection is released when its answer was read to the
    end, else closed (the backend sees that and stops generating); the outcome is recorded for the log, and
    what the answer taught about the model is kept."""
    if resp is not None:
        resp.release() if ex.builder.outcome and not failed and not ex.builder.cut else resp.close()
    ex.record.outcome = ex.builder.outcome
    backend.note_output_cap(ex)
    backend.remember(ex)


async def relay_message(backend: Backend, ex: Exchange, request: Optional[web.Request] = None) -> dict[str, Any]:
    """Non-streaming: stream from the backend anyway (the timeout bounds silence, not the answer's
    length), fold the events into one Message. A backend that answers with one JSON body works too."""
    resp = await open_backend(request, backend, ex)
    events: list[tuple[str, dict[str, Any]]] = []

    async def collect(batch: list[tuple[str, dict[str, Any]]]) -> None:
        events.extend(batch)

    try:
        ex.builder.start_message()
        async with _watching(request, backend):
            await pump(resp, ex, collect)
    except ClientGone:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes an Anthropic error
        raise relay_error(exc, backend.config) from None
    finally:
        _relayed(backend, ex, resp, failed=False)
    return fold_events(events)


async def relay_stream(request: web.Request, backend: Backend, ex: Exchange) -> web.StreamResponse:
    """Streaming: open the client's stream as soon as the backend answers 2xx, ping while it is
    silent, forward every read as it arrives, end with `event: error` if the backend fails."""
    resp = await open_backend(request, backend, ex)
    out = web.StreamResponse(
        status=200,
        headers={
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "request-id": ex.request_id,
            "x-accel-buffering": "no",
        },
    )
    watch = Watch(request, backend, out)
    record = ex.record

    async def emit(events: list[tuple[str, dict[str, Any]]]) -> None:
        if record.first_event is None:
            record.first_event = time.monotonic()
        try:
            await out.write(sse(events))
        except (ConnectionError, RuntimeError) as exc:
            raise ClientGone() from exc
        watch.last = time.monotonic()

    error: Optional[ApiError] = None
    try:
        await out.prepare(request)
        ex.builder.start_message()
        await out.write(sse(ex.builder.take()) + PING)
        try:
            async with watch:  # stopped before the end: no ping may follow the last event
                await pump(resp, ex, emit)
        except ClientGone:
            raise
        except Exception as exc:  # noqa: BLE001 - after the 200, every failure is an `event: error`
            error = relay_error(exc, backend.config)
        if error is not None:
            record.failed(error)
            await out.write(sse([("error", error.body())]))
        await out.write_eof()
    except (ClientGone, ConnectionError, RuntimeError):
        record.error, record.error_kind = "client disconnected", "client_disconnected"
    finally:
        _relayed(backend, ex, resp, failed=error is not None)
    return out


# ======================================================================================
# 9. HTTP APP
# ======================================================================================

BACKEND: web.AppKey[Backend] = web.AppKey("backend", Backend)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
OPEN_PATHS = ("/health", "/", "/api/hello")
_RequestKey = getattr(web, "RequestKey", None)  # aiohttp >= 3.14; plain strings before
REQUEST_ID: Any = _RequestKey("request_id", str) if _RequestKey else "request_id"
RECORD: Any = _RequestKey("record", RequestRecord) if _RequestKey else "record"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def error_response(error: ApiError, request_id: str) -> web.Response:
    headers = error.headers()
    headers["request-id"] = request_id
    return web.Response(
        status=error.status, text=dumps(error.body(request_id)), content_type="application/json", headers=headers
    )


def json_response(data: Any, request_id: str) -> web.Response:
    return web.Response(body=dumps_bytes(data), content_type="application/json", headers={"request-id": request_id})


def _authorized(request: web.Request, token: str) -> bool:
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return hmac.compare_digest(given.encode(), token.encode())


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Prometheus text exposition, written here: counters, histograms and gauges in plain dicts."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.histograms: dict[str, tuple[list[int], list[float]]] = {}
        self.active_streams = 0

    def inc(self, name: str, value: float = 1, **labels: Any) -> None:
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        self.counters[key] = self.counters.get(key, 0) + value

    def histogram(self, name: str, value: float) -> None:
        counts, total = self.histograms.setdefault(name, ([0] * (len(self.BUCKETS) + 1), [0.0]))
        for i, bound in enumerate(self.BUCKETS):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        total[0] += value

    def observe(self, fields: dict[str, Any], seconds: float, route: str) -> None:
        """One finished request. `route` is the matched route's pattern (a bounded set), never the raw path."""
        route = route if route.startswith("/v1/") else "other"
        model = fields.get("backend_model", "")  # bounded by the configuration, unlike client model names
        self.inc("claude_proxy_requests_total", route=route, status=fields["status"], model=model)
        if route == "/v1/messages":
            self.histogram("claude_proxy_request_duration_seconds", seconds)
            if "ttft_ms" in fields:
                self.histogram("claude_proxy_time_to_first_token_seconds", fields["ttft_ms"] / 1000)
            if fields.get("input_tokens"):
                self.inc("claude_proxy_input_tokens_total", fields["input_tokens"], model=model)
            if fields.get("output_tokens"):
                self.inc("claude_proxy_output_tokens_total", fields["output_tokens"], model=model)
            if fields.get("retries"):
                self.inc("claude_proxy_backend_retries_total", fields["retries"])
            if fields.get("error_kind"):
                self.inc("claude_proxy_backend_errors_total", kind=fields["error_kind"])

    def render(self) -> str:
        helps = {
            "claude_proxy_requests_total": "Requests by route, status and client model.",
            "claude_proxy_input_tokens_total": "Input tokens reported by the backend.",
            "claude_proxy_output_tokens_total": "Output tokens reported by the backend.",
            "claude_proxy_backend_retries_total": "Connection retries to the backend.",
            "claude_proxy_backend_errors_total": "Failed /v1/messages requests by kind.",
        }
        lines = []
        for name in sorted(helps):
            lines += [f"# HELP {name} {helps[name]}", f"# TYPE {name} counter"]
            for (metric, labels), value in sorted(self.counters.items()):
                if metric == name:
                    label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
                    lines.append(f"{name}{{{label_text}}} {value:g}" if labels else f"{name} {value:g}")
        for name, what in (
            ("claude_proxy_request_duration_seconds", "Time to serve /v1/messages."),
            ("claude_proxy_time_to_first_token_seconds", "Time to the first streamed event."),
        ):
            counts, total = self.histograms.get(name, ([0] * (len(self.BUCKETS) + 1), [0.0]))
            lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram"]
            running = 0
            for bound, count in zip(self.BUCKETS + (float("inf"),), counts):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'{name}_bucket{{le="{le}"}} {running}')
            lines += [f"{name}_sum {total[0]:g}", f"{name}_count {running}"]
        lines += [
            "# HELP claude_proxy_active_streams Streams being relayed now.",
            "# TYPE claude_proxy_active_streams gauge",
            f"claude_proxy_active_streams {self.active_streams}",
        ]
        return "\n".join(lines) + "\n"


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


QUIET_PATHS = ("/health", "/metrics", "/v1/messages/count_tokens")


def log_request(
    request: web.Request, status: int, started: float, record: RequestRecord, level: int = logging.INFO
) -> None:
    """The one line per request (text or JSON), and its metrics."""
    now = time.monotonic()
    fields: dict[str, Any] = {"method": request.method, "path": request.path, "status": status}
    if record.model is not None:
        fields["model"] = record.model
    if record.backend_model is not None:
        fields.update(backend_model=record.backend_model, provider=record.provider)
    if record.stream is not None:
        fields["stream"] = record.stream
    if record.first_event is not None:
        fields["ttft_ms"] = round((record.first_event - started) * 1000, 1)
    fields["time_ms"] = round((now - started) * 1000, 1)
    outcome = record.outcome
    if outcome is not None:
        fields.update(input_tokens=outcome.usage["input_tokens"], output_tokens=outcome.usage["output_tokens"])
        fields["stop"] = outcome.stop_reason
    if record.counted is not None:
        fields["input_tokens"] = record.counted
    if record.retries:
        fields["retries"] = record.retries
    if record.error:
        fields["error"] = record.error[:300]
    if record.error_kind:
        fields["error_kind"] = record.error_kind
    text = " ".join(
        f"{k}={v!r}" if k == "error" else f"{k}={v}" for k, v in fields.items() if k not in ("method", "path")
    )
    log.log(level, "%s %s %s", request.method, request.path, text, extra={"fields": fields})
    resource = request.match_info.route.resource  # None when no route matched: anyone can send any path
    request.app[METRICS].observe(fields, now - started, resource.canonical if resource is not None else "other")


@web.middleware
async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Request ids, inbound auth, Anthropic-shaped errors for everything, one log line per request."""
    incoming = request.headers.get("x-request-id", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else new_id("req_")
    request[REQUEST_ID] = request_id
    current_request_id.set(request_id)  # every log line of this request carries it
    record = request[RECORD] = RequestRecord()
    started = time.monotonic()
    config = request.app[CONFIG]
    try:
        if config.auth_token and request.path not in OPEN_PATHS and not _authorized(request, config.auth_token):
            raise ApiError(401, "invalid x-api-key: this proxy requires its --auth-token", retry=False)
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc, request_id)
        record.failed(exc)
    except web.HTTPException as exc:
        if exc.status == 405:
            error = ApiError(405, f"method {request.method} is not allowed for {request.path}", retry=False)
        elif exc.status == 413:
            error = ApiError(413, f"request body is larger than {config.max_body_bytes} bytes", retry=False)
        elif exc.status == 404:
            error = ApiError(404, f"not found: {request.method} {request.path}", retry=False)
        else:
            error = ApiError(exc.status, exc.reason or "error")
        response = error_response(error, request_id)
    except Exception:  # a bug: never a traceback to the client, always one in the log
        log.exception("internal error handling %s %s", request.method, request.path)
        error = ApiError(500, "internal proxy error (see the proxy's log)", kind="internal")
        response = error_response(error, request_id)
        record.failed(error)
    if not response.prepared:
        response.headers.setdefault("request-id", request_id)
    # probes, scrapes and token counts (Claude Code sends dozens for one /context) are DEBUG when they succeed
    quiet = request.path in QUIET_PATHS or request.method == "HEAD"
    log_request(
        request, response.status, started, record, logging.DEBUG if quiet and response.status < 400 else logging.INFO
    )
    return response


async def read_json(request: web.Request) -> Any:
    ctype = request.headers.get("content-type", "application/json")
    if "json" not in ctype.lower():
        raise ApiError(400, f"content-type must be application/json, got {ctype!r}"[:200], retry=False)
    limit = request.app[CONFIG].max_body_bytes
    too_large = ApiError(413, f"request body is larger than {limit} bytes", retry=False)
    if (request.content_length or 0) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.content.iter_any():  # not kept by aiohttp, as request.read() would be
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except (aiohttp.web_protocol.RequestPayloadError, ConnectionError) as exc:  # bad gzip, cut-off upload
        raise ApiError(400, f"request body could not be read: {exc}"[:300], retry=False) from None
    raw = b"".join(chunks)
    try:
        return loads_request(raw)
    except JsonTooDeep:
        raise TOO_DEEP from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}"[:300], retry=False) from None


async def handle_messages(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    backend.at_work += 1  # from the first byte: the shutdown grace waits for this request too
    try:
        return await _messages(request, backend)
    finally:
        backend.at_work -= 1


async def _messages(request: web.Request, backend: Backend) -> web.StreamResponse:
    req = parse_request(await read_json(request))
    config, record = request.app[CONFIG], request[RECORD]
    route = await backend.route(req.model)
    if route.provider == "ollama" and config.fetch_images:
        await backend.fetch_images(req)
    ex = exchange(req, route, config, backend.usage_scale(route, req.model), request[REQUEST_ID], record)
    metrics = request.app[METRICS]
    metrics.active_streams += ex.stream
    try:
        if ex.stream:
            return await relay_stream(request, backend, ex)
        return json_response(await relay_message(backend, ex, request), ex.request_id)
    except ClientGone:
        record.error, record.error_kind = "client disconnected", "client_disconnected"
        return web.Response(status=499)  # nobody reads it: the connection is gone
    finally:
        metrics.active_streams -= ex.stream


async def handle_count_tokens(request: web.Request) -> web.Response:
    req = parse_request(await read_json(request), count_only=True)
    config, backend = request.app[CONFIG], request.app[BACKEND]
    route = None
    if config.count_tokens == "backend" or config.scale_usage or config.client_window:
        try:
            route = await backend.route(req.model)
        except ApiError:
            pass  # an unmapped model still gets the heuristic count
    count = await backend.backend_token_count(req, route) if route and config.count_tokens == "backend" else None
    if count is None:
        count = count_request_tokens(req, build_conversation(req, config.system_messages))
    if route:
        count = round(count * backend.usage_scale(route, req.model))
    request[RECORD].model, request[RECORD].counted = req.model, count
    return json_response({"input_tokens": count}, request[REQUEST_ID])


def model_list(config: Config, backend: Backend) -> list[dict[str, Any]]:
    """The map's names, the default model, and every backend model a client can ask for by its own name (the
    backend's list and the map's targets), with the context window each runs with where it is known."""
    names = [n for n in config.model_map if not _GLOB_CHARS.search(n)] + backend.model_names()
    models = []
    for name in dict.fromkeys(names):
        model = {"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"}
        route = resolve_route(config, name, backend.discovered, backend.backend_models)
        window = backend.window(route) if route else None
        if window:
            model["max_input_tokens"] = window
        models.append(model)
    return models


async def handle_models(request: web.Request) -> web.Response:
    models = model_list(request.app[CONFIG], request.app[BACKEND])
    ids = [m["id"] for m in models]
    query = request.query
    try:
        limit = max(1, min(1000, int(query.get("limit", "20"))))
    except ValueError:
        raise ApiError(400, "limit: expected an integer", retry=False) from None
    start, end = 0, len(models)
    if query.get("after_id") in ids:
        start = ids.index(query["after_id"]) + 1
    if query.get("before_id") in ids:
        end = ids.index(query["before_id"])
        start = max(start, end - limit)
    page = models[start:end][:limit]
    more = start > 0 if "before_id" in query else start + len(page) < end
    return json_response(
        {
            "data": page,
            "has_more": more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        },
        request[REQUEST_ID],
    )


async def handle_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    for model in model_list(request.app[CONFIG], request.app[BACKEND]):
        if model["id"] == model_id:
            return json_response(model, request[REQUEST_ID])
    raise ApiError(404, f"model: {model_id}", retry=False)


async def handle_metrics(request: web.Request) -> web.Response:
    return web.Response(
        text=request.app[METRICS].render(), content_type="text/plain", headers={"request-id": request[REQUEST_ID]}
    )


async def handle_health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"}, request[REQUEST_ID])


async def handle_hello(request: web.Request) -> web.Response:
    return web.Response(status=200, headers={"request-id": request[REQUEST_ID]})


def create_app(config: Optional[Config] = None) -> web.Application:
    """The aiohttp Application (also for other servers: gunicorn, aiohttp.web.run_app, tests).
    Without a config it reads the environment and .env, as the command line would without flags, with the same
    checks: bad configuration raises ConfigError (a one-line message), as main() reports it."""
    if config is None:
        config = load_config([])
        if not logging.getLogger().handlers:
            setup_logging(config)
    app = web.Application(middlewares=[middleware], client_max_size=config.max_body_bytes)
    backend = Backend(config)
    app[CONFIG] = config
    app[BACKEND] = backend
    app[METRICS] = Metrics()

    async def startup(app: web.Application) -> None:
        await backend.start()
        if config.discover:  # the start-up probe: lists the backend's models, only warns when it is down
            await backend.discover(force=True)

    async def shutdown(app: web.Application) -> None:
        """SIGINT/SIGTERM: requests in flight get the grace period to finish, then are ended cleanly."""
        deadline = time.monotonic() + config.shutdown_grace
        while (backend.at_work or backend.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        backend.stopping = True  # a request still before its backend call ends when it gets there
        if backend.at_work:
            log.warning("shutting down: ending %d request(s) still in flight", backend.at_work)
        for watch in list(backend.in_flight):
            watch.stop()

    async def cleanup(app: web.Application) -> None:
        await backend.close()

    app.on_startup.append(startup)
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/v1/messages", handle_messages)
    app.router.add_post("/v1/messages/count_tokens", handle_count_tokens)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model_id:.+}", handle_model)  # vLLM ids look like Qwen/Qwen3-8B
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    for path in ("/", "/api/hello"):
        app.router.add_route("HEAD", path, handle_hello)
        app.router.add_get(path, handle_hello, allow_head=False)
    return app


# ======================================================================================
# 10. CLI
# ======================================================================================


async def run_check(config: Config, out: Any = sys.stdout) -> int:
    """--check: list the backend's models, send a one-token request for each mapped model, print a
    table of what works; 0 when everything does."""
    backend = Backend(config)
    await backend.start()
    rows: list[tuple[str, str, str]] = []
    try:
        await backend.discover(force=True)
        if backend.list_problem:
            result = f"FAIL: {backend.list_problem}"
        else:
            result = f"ok: {len(backend.backend_models)} models" if backend.backend_models else "FAIL: lists no models"
        rows.append(("(backend)", public_url(config.base_url), result))
        rows += [("(model map)", "", f"WARNING: {warning}") for warning in backend.map_warnings()]
        names = [n for n in config.model_map if not _GLOB_CHARS.search(n)] or ["claude-opus-5-5", "claude-haiku-5-5"]
        for name in names:
            req = MessagesRequest(model=name, messages=[Message("user", [TextBlock("Reply with OK.")])], max_tokens=1)
            try:
                route = await backend.route(name)
                await relay_message(backend, exchange(req, route, config, 1.0, new_id("req_"), RequestRecord()))
                window = f", window {route.context_window}" if route.context_window else ""
                rows.append((name, f"{route.model} ({route.provider}{window})", "ok"))
            except ApiError as exc:
                rows.append((name, "", f"FAIL: {exc.status} {exc.message}"))
    finally:
        await backend.close()
    width = [max(len(r[i]) for r in rows + [("client model", "backend model", "")]) for i in range(2)]
    out.write(f"{'client model':<{width[0]}}  {'backend model':<{width[1]}}  result\n")
    indent = width[0] + width[1] + 4  # results are printed whole, wrapped to the terminal
    room = max(40, shutil.get_terminal_size((100, 24)).columns - indent)
    for row in rows:
        lines = textwrap.wrap(row[2], room, break_long_words=False, break_on_hyphens=False) or [""]
        out.write(f"{row[0]:<{width[0]}}  {row[1]:<{width[1]}}  {lines[0]}\n")
        out.writelines(" " * indent + line + "\n" for line in lines[1:])
    return 1 if any(r[2].startswith("FAIL") for r in rows) else 0


CLAUDE_INSTALL = "npm install -g @anthropic-ai/claude-code"
CLAUDE_DEFAULT_MODEL = "claude-opus-5-5"  # what Claude Code 2.1.332 asks for without --model / ANTHROPIC_MODEL


def claude_model(claude_args: list[str], environ: dict[str, str]) -> str:
    """The model name Claude Code will send: its --model argument, else ANTHROPIC_MODEL, else its default."""
    for i, arg in enumerate(claude_args):
        if arg == "--model" and i + 1 < len(claude_args):
            return claude_args[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return environ.get("ANTHROPIC_MODEL") or CLAUDE_DEFAULT_MODEL


def claude_environment(
    config: Config, url: str, model: str, window: Optional[int], environ: dict[str, str]
) -> tuple[dict[str, str], Optional[int]]:
    """The environment Claude Code runs with under `run`, and the window it is told (None: not told).
    CLAUDE_CODE_AUTO_COMPACT_WINDOW sets both its /context window and its compaction point (window - 33k; it
    reads values under 100k as 100k); CLAUDE_CODE_MAX_CONTEXT_TOKENS is its window for names it does not know.
    Told max(window, 132k) while the proxy scales usage by that / window, it shows the true fraction of the
    model's window and compacts at 75% of a small window, 33k before the end of a large one."""
    env = dict(environ)
    env["ANTHROPIC_BASE_URL"] = url
    env["ANTHROPIC_AUTH_TOKEN"] = config.auth_token or "claude-proxy"  # Bearer: no API-key approval prompt
    env.pop("ANTHROPIC_API_KEY", None)  # a real key is never needed here, and would be preferred by some paths
    # the user's own choice wins: the variable, else --client-window, else the model's window (at least 132k)
    told = parse_tokens(environ.get("CLAUDE_CODE_AUTO_COMPACT_WINDOW")) or config.client_window
    if told is None and window:
        told = max(window, CLIENT_MIN_WINDOW)
    if told:
        env["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] = environ.get("CLAUDE_CODE_AUTO_COMPACT_WINDOW") or str(told)
        env.setdefault("CLAUDE_CODE_MAX_CONTEXT_TOKENS", str(told))
    return env, told


def run_claude(config: Config, claude_args: list[str], environ: Optional[dict[str, str]] = None) -> int:
    """`run`: the proxy on a free loopback port in a thread, logging to a file; Claude Code in the foreground
    with the proxy's address, key and context settings; its exit code returned; the proxy stopped after it."""
    import signal
    import subprocess
    import tempfile
    import threading
    import urllib.request

    environ = dict(os.environ if environ is None else environ)
    claude = shutil.which("claude", path=environ.get("PATH"))
    if not claude:
        sys.stderr.write(
            f"claude-proxy run: Claude Code (`claude`) is not on PATH; install it with: {CLAUDE_INSTALL}\n"
        )
        return 127
    log_path = os.path.join(tempfile.gettempdir(), f"claude-proxy-{os.getpid()}.log")
    log_file = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed below)
    setup_logging(config)
    logging.getLogger().handlers[0].setStream(log_file)  # type: ignore[attr-defined]
    config.host = "127.0.0.1"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="claude-proxy", daemon=True)
    thread.start()
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)

    async def start() -> tuple[int, Optional[Route]]:
        await runner.setup()  # the start-up discovery runs here
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            route = await app[BACKEND].route(model)
        except ApiError as exc:
            log.warning("%s", exc.message)
            route = None
        return port, route

    def call(coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    model = claude_model(claude_args, environ)
    try:
        port, route = call(start())
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):  # it listens already: this checks that it answers
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        else:
            sys.stderr.write(f"claude-proxy run: the proxy at {url} does not answer; see {log_path}\n")
            return 1
        window = route.context_window if route else None
        env, told = claude_environment(config, url, model, window, environ)
        config.client_window = told
        backend_model = f"{route.model} ({route.provider}, window {window or 'unknown'})" if route else "(unmapped)"
        log.info("run: %s -> %s; Claude Code is told a window of %s", model, backend_model, told or "(its own)")
        sys.stderr.write(
            f"claude-proxy run: proxy on {url} -> {config.provider} at {public_url(config.base_url)}; "
            f"{model} -> {backend_model}; log: {log_path}\n"
        )
        child = subprocess.Popen([claude, *claude_args], env=env)
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is Claude Code's to handle
        stop = signal.signal(signal.SIGTERM, lambda *_: child.terminate())  # and a stop is passed on to it
        try:
            code = child.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, stop)
        return 128 - code if code < 0 else code
    finally:
        with contextlib.suppress(Exception):
            call(runner.cleanup(), 10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        logging.getLogger().handlers[0].setStream(sys.stderr)  # type: ignore[attr-defined]
        log_file.close()


def split_run(argv: list[str]) -> tuple[list[str], Optional[list[str]]]:
    """`[proxy flags] run [claude arguments]` -> (proxy flags, claude arguments); None without `run`."""
    takes_value = {s for a in build_parser()._actions if a.nargs != 0 for s in a.option_strings}
    i = 0
    while i < len(argv):
        if argv[i] == "run":
            return argv[:i], argv[i + 1 :]
        if argv[i] == "--":
            break
        i += 2 if argv[i] in takes_value else 1
    return argv, None


def _command() -> str:
    name = os.path.basename(sys.argv[0] or "")
    return "claude-proxy" if name == "claude-proxy" else "python claude_proxy.py"


def main(argv: Optional[list[str]] = None) -> int:
    argv, claude_args = split_run(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"claude-proxy: {exc}\n")
        return 2
    if claude_args is not None:
        return run_claude(config, claude_args)
    setup_logging(config)
    if config.check:
        return asyncio.run(run_check(config))
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.auth_token:
        log.warning(
            "listening on %s without --auth-token: anyone who can reach this address can use the backend", config.host
        )
    url = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}"
    key = "any"
    if config.auth_token:  # the command that works, without the whole secret in a terminal log
        token = config.auth_token
        key = f"<your --auth-token: {token[:2]}…{token[-2:]}>" if len(token) >= 12 else "<your --auth-token>"
    banner = (
        f"claude-proxy {__version__} listening on {url} -> {config.provider} at {public_url(config.base_url)}\n"
        f"  use it: ANTHROPIC_BASE_URL={url} ANTHROPIC_API_KEY={key} claude\n"
        f"  or let the proxy start Claude Code, told the model's context window: {_command()} run [claude args]"
    )
    try:
        web.run_app(
            create_app(config),
            host=config.host,
            port=config.port,
            print=lambda _: print(banner, flush=True),  # called once the port is bound
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
    except OSError as exc:
        sys.stderr.write(f"claude-proxy: cannot listen on {url}: {exc.strerror}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
