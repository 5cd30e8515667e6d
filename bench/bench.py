#!/usr/bin/env python3
"""claude-proxy benchmark: what does the Anthropic<->OpenAI translation cost?

Run from the repo root (about 40 s on 2 cores; loopback only; every server it starts is stopped
on exit, Ctrl-C and errors included):

    python bench/bench.py                  # streaming + non-streaming, concurrency 32
    python bench/bench.py --stress         # 500 concurrent 50-chunk streams through the proxy
    python bench/bench.py --soak           # 10000 requests mixed with faults: the proxy must not leak
    python bench/bench.py --duration 10 --concurrency 64 --modes stream --strict
    python bench/bench.py --chunk-delay-ms 1   # chunks spaced like a real token stream (latency-bound)

Three servers on 127.0.0.1, each its own subprocess:
  (a) backend      fake OpenAI-compatible /v1/chat/completions; canned 50-chunk stream (role, 42
                   text pieces, one tool call in fragments, finish, usage, [DONE]) or chat.completion
  (b) passthrough  minimal aiohttp proxy relaying bytes untranslated to (a): the Python limit
  (c) proxy        claude_proxy.py --provider openai --base-url (a)/v1 --model bench-model
Requests are Claude Code-shaped (the suite's fixtures/claude_code_2.1.331_parallel_tools_turn2.json: ~7 KB
system prompt, 12 tools, multi-turn history, ~50 KB); (a) and (b) get the equivalent Chat Completions body.
Every response is validated (SSE event grammar, text, tool-call JSON, chunk count), and the backend
counts what it served, so nothing can win by returning garbage or by skipping the backend. The proxy's
event streams are checked by the test suite's own grammar check (check_stream in conftest.py).

Reported per target: req/s and latency/TTFE (time to the first body bytes = the first SSE event)
p50/p99 loaded (--concurrency) and unloaded (c=1), CPU ms per request and RSS (idle, peak) of the
server under test (for (a) the backend itself), and the ratios c/a, c/b.

Targets for (c): streaming throughput >= 70% of (b), non-streaming >= 80% of (b); added latency vs
(a) at c=1 p50 <= 2 ms, p99 <= 10 ms; added TTFE p50 <= 2 ms; RSS idle < 80 MB. On 2 cores the load
generator itself may be the limit (see cli%): then CPU ms/request is the fairer comparison.
Exit status: 1 if any response failed validation (or, with --strict, a target was missed).
"""

import argparse
import asyncio
import ctypes
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "fixtures" / "claude_code_2.1.331_parallel_tools_turn2.json"
PROXY = HERE.parent / "claude_proxy.py"
sys.path.insert(0, str(HERE.parent))  # conftest.py: the suite's SSE grammar check, shared
MODEL = "bench-model"

# ------------------------------------------------------------------------------ the canned answer
TEXT = (
    "I'll run both commands in parallel and then summarise what they printed for you.\n\n"
    'The first printed "one" and the second printed "two" — both exited cleanly, so next I\'ll '
    "list the working directory. Then I'll check the file sizes and report back."
)
TEXT_PIECES = [w if i == 0 else " " + w for i, w in enumerate(TEXT.split(" "))]  # ~ one token each
TOOL_ID, TOOL_NAME = "call_bench9f3c2a7e", "Bash"
TOOL_ARGS = {"command": 'ls -la "$PWD" | head -n 20', "description": "List the directory — first 20"}
ARGS_JSON = json.dumps(TOOL_ARGS)
ARG_PIECES = [ARGS_JSON[i * len(ARGS_JSON) // 4 : (i + 1) * len(ARGS_JSON) // 4] for i in range(4)]
USAGE = {
    "prompt_tokens": 14210,
    "completion_tokens": 71,
    "total_tokens": 14281,
    "prompt_tokens_details": {"cached_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0},
}
HEAD = {"id": "chatcmpl-bench0123456789", "created": 1764230400, "model": MODEL, "system_fingerprint": "fp_bench"}


def openai_chunks(include_usage):
    """The streamed answer as wire bytes, one item per SSE event: `data: <chunk>\\n\\n`, then `data: [DONE]`."""

    def chunk(delta, finish=None):
        extra = {"usage": None} if include_usage else {}
        return dict(
            HEAD,
            object="chat.completion.chunk",
            **extra,
            choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        )

    out = [chunk({"role": "assistant", "content": "", "refusal": None})]
    out += [chunk({"content": p}) for p in TEXT_PIECES]
    out.append(
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": TOOL_ID, "type": "function", "function": {"name": TOOL_NAME, "arguments": ""}}
                ]
            }
        )
    )
    out += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in ARG_PIECES]
    out.append(chunk({}, "tool_calls"))
    if include_usage:
        out.append(dict(HEAD, object="chat.completion.chunk", choices=[], usage=USAGE))
    return [b"data: " + json.dumps(c).encode() + b"\n\n" for c in out] + [b"data: [DONE]\n\n"]


N_CHUNKS = len(openai_chunks(True)) - 1  # data events before [DONE], usage chunk included: 50
NONSTREAM_BODY = json.dumps(
    dict(
        HEAD,
        object="chat.completion",
        usage=USAGE,
        choices=[
            {
                "index": 0,
                "logprobs": None,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": TEXT,
                    "refusal": None,
                    "tool_calls": [
                        {"id": TOOL_ID, "type": "function", "function": {"name": TOOL_NAME, "arguments": ARGS_JSON}}
                    ],
                },
            }
        ],
    )
).encode()


# ------------------------------------------------------------------------------ server roles (subprocesses)
def serve_backend(port, chunk_delay):
    streams = {True: openai_chunks(True), False: openai_chunks(False)}
    stats = {"requests": 0, "streamed": 0, "bad": 0, "inflight": 0, "max_inflight": 0}

    async def completions(request):
        stats["requests"] += 1
        raw = await request.read()
        req = json.loads(raw)  # a real backend parses the body too
        fault = raw.partition(b"<bench-fault:")[2].partition(b">")[0]  # --soak marks requests in a user text
        if fault == b"http500":
            return web.json_response(
                {
                    "error": {
                        "message": "bench backend: injected failure",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=500,
            )
        if req.get("model") != MODEL or not req.get("messages") or not req.get("tools"):
            stats["bad"] += 1
            return web.json_response(
                {
                    "error": {
                        "message": "bench backend: unexpected request shape",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=400,
            )
        if not req.get("stream"):
            return web.Response(body=NONSTREAM_BODY, content_type="application/json")
        stats["streamed"] += 1
        stats["inflight"] += 1
        stats["max_inflight"] = max(stats["max_inflight"], stats["inflight"])
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            for n, c in enumerate(streams[bool((req.get("stream_options") or {}).get("include_usage"))]):
                if fault == b"break" and n == 5:  # hang up mid-stream: no [DONE], the chunked body left open
                    request.transport.close()
                    return resp
                await resp.write(c)  # one write per chunk, like a real token stream
                if chunk_delay or fault == b"slow":
                    await asyncio.sleep(chunk_delay or 0.01)
            await resp.write_eof()
            return resp
        finally:
            stats["inflight"] -= 1

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/bench/stats", lambda request: web.json_response(stats))
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def serve_passthrough(port, upstream):
    async def session(app):
        app["s"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        yield
        await app["s"].close()

    async def relay(request):
        body = await request.read()
        async with request.app["s"].post(
            upstream + request.path_qs, data=body, headers={"Content-Type": request.content_type}
        ) as r:
            resp = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get("Content-Type", "")})
            await resp.prepare(request)
            async for data in r.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp

    app = web.Application(client_max_size=64 << 20)
    app.cleanup_ctx.append(session)
    app.router.add_post("/{tail:.*}", relay)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------------------ request bodies
def openai_equivalent(a, stream):
    """A Chat Completions body carrying the same content as the Anthropic fixture body."""
    msgs = [{"role": "system", "content": "\n\n".join(b["text"] for b in a["system"])}]
    for m in a["messages"]:
        blocks = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        for b in blocks:
            if b["type"] == "tool_result":
                c = b["content"]
                msgs.append(
                    {
                        "role": "tool",
                        "tool_call_id": b["tool_use_id"],
                        "content": c if isinstance(c, str) else "\n".join(x.get("text", "") for x in c),
                    }
                )
        texts = [b["text"] for b in blocks if b["type"] == "text"]
        calls = [
            {"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
            for b in blocks
            if b["type"] == "tool_use"
        ]
        if texts or calls:
            msgs.append(
                dict(
                    {"role": m["role"], "content": "\n\n".join(texts) or None},
                    **({"tool_calls": calls} if calls else {}),
                )
            )
    tools = [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t.get("description", ""), "parameters": t["input_schema"]},
        }
        for t in a["tools"]
    ]
    body = {"model": MODEL, "messages": msgs, "tools": tools, "max_tokens": 32000, "stream": stream}
    return dict(body, stream_options={"include_usage": True}) if stream else body


# ------------------------------------------------------------------------------ validators: None or an error string
def check_openai_stream(data):
    if not data.endswith(b"data: [DONE]\n\n"):
        return "stream does not end with data: [DONE]"
    events = [e for e in data.split(b"\n\n") if e.strip()][:-1]
    if len(events) != N_CHUNKS or not all(e.startswith(b"data: {") for e in events):
        return f"expected {N_CHUNKS} 'data: {{...}}' chunks, got {len(events)}"
    deltas = [ch["delta"] for e in events for ch in json.loads(e[6:])["choices"]]
    args = "".join(tc["function"].get("arguments", "") for d in deltas for tc in d.get("tool_calls") or [])
    if "".join(d.get("content") or "" for d in deltas) != TEXT or json.loads(args) != TOOL_ARGS:
        return "text or tool arguments differ"


def check_openai_json(data):
    ch = json.loads(data)["choices"][0]
    tc = ch["message"]["tool_calls"][0]["function"]
    if (
        ch["message"]["content"] != TEXT
        or tc["name"] != TOOL_NAME
        or json.loads(tc["arguments"]) != TOOL_ARGS
        or ch["finish_reason"] != "tool_calls"
    ):
        return "content, tool call or finish_reason differ"


def check_anthropic_sse(data):
    """The proxy's event stream: Anthropic's SSE grammar (the suite's own check), then the canned answer."""
    from conftest import check_stream, raw_sse  # loaded by make_target before any timing; never by the servers

    try:
        got = check_stream(raw_sse(data.decode()))
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as exc:
        return f"SSE grammar: {type(exc).__name__}: {exc}"[:300]
    if "".join(b[1] for b in got["blocks"] if b[0] == "text") != TEXT:
        return "text differs"
    tools = [b for b in got["blocks"] if b[0] == "tool_use"]
    if tools != [("tool_use", TOOL_NAME, TOOL_ARGS)]:
        return f"expected one tool_use block {TOOL_NAME} with input {TOOL_ARGS}, got {tools}"
    if got["stop_reason"] != "tool_use":
        return f"stop_reason {got['stop_reason']!r}"


def check_anthropic_json(data):
    m = json.loads(data)
    text = "".join(b["text"] for b in m["content"] if b["type"] == "text")
    tools = [b for b in m["content"] if b["type"] == "tool_use"]
    if (
        m.get("type") != "message"
        or m.get("role") != "assistant"
        or m.get("stop_reason") != "tool_use"
        or not isinstance(m.get("usage", {}).get("output_tokens"), int)
    ):
        return f"bad message envelope type={m.get('type')!r} stop_reason={m.get('stop_reason')!r}"
    if text != TEXT or len(tools) != 1 or tools[0]["name"] != TOOL_NAME or tools[0]["input"] != TOOL_ARGS:
        return "content differs"


# ------------------------------------------------------------------------------ processes and /proc
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup():
    os.setsid()  # Ctrl-C reaches only the bench, which then stops the servers itself
    try:  # PR_SET_PDEATHSIG: the server gets SIGTERM if the bench dies, even by SIGKILL
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


class Procs:
    def __init__(self):
        self.logdir, self.procs = Path(tempfile.mkdtemp(prefix="claude-proxy-bench-")), {}

    def start(self, name, argv, port, timeout=20.0):
        with open(self.logdir / f"{name}.log", "wb") as log:
            p = self.procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_child_setup,
                cwd=HERE.parent,
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.tail(name)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return p.pid
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{name} did not listen on port {port} within {timeout}s:\n{self.tail(name)}")

    def tail(self, name):
        return (self.logdir / f"{name}.log").read_bytes()[-2000:].decode(errors="replace")

    def stop_all(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=3)


def cpu_seconds(pid):  # utime + stime of the process
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:  # it died: the failed requests say so
        return float("nan")
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def foreign_cpu(pids):
    """CPU seconds used so far by the whole machine minus this bench and its servers: other load skews results."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    return busy - sum(os.times()[:2]) - sum(cpu_seconds(p) for p in pids.values())


def pct(xs, q):  # in ms
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000 if xs else float("nan")


# ------------------------------------------------------------------------------ load generation
async def one(session, t, res):
    t0 = time.perf_counter()
    first, parts = None, []
    try:
        async with session.post(t.url, data=t.body, headers=t.headers) as r:
            async for data in r.content.iter_any():
                first = first or time.perf_counter()
                parts.append(data)
            t1 = time.perf_counter()
        body = b"".join(parts)
        err = f"HTTP {r.status}: {body[:200]!r}" if r.status != 200 else t.check(body)
    except Exception as e:  # noqa: BLE001 — every failure is counted, none is fatal
        err = f"{type(e).__name__}: {e}"
    res["sent"] += 1
    if err:
        res["errors"] += 1
        res["samples"] += [err][: 3 - len(res["samples"])]
    else:
        res["lat"].append(t1 - t0)
        res["ttfe"].append(first - t0)


async def run_phase(t, concurrency, duration, max_requests, max_seconds):
    """`concurrency` workers, each sending one request after another until time or count runs out."""
    res = {"lat": [], "ttfe": [], "errors": 0, "samples": [], "sent": 0, "rss_peak": rss_mb(t.pid)}
    stop, issued = time.perf_counter() + min(duration or max_seconds, max_seconds), 0

    async def worker():
        nonlocal issued
        while time.perf_counter() < stop and (max_requests is None or issued < max_requests):
            issued += 1
            await one(s, t, res)

    async def sample_rss():
        while True:
            res["rss_peak"] = max(res["rss_peak"], rss_mb(t.pid))
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=max_seconds + 30),
    ) as s:
        sampler = asyncio.create_task(sample_rss())
        cpu0, own0, w0 = cpu_seconds(t.pid), sum(os.times()[:2]), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))  # bounded: each request times out too
        wall = time.perf_counter() - w0
        sampler.cancel()
    res["cpu_ms"] = (cpu_seconds(t.pid) - cpu0) * 1000 / max(1, res["sent"])
    res["client_pct"] = (sum(os.times()[:2]) - own0) * 100 / wall
    res["rps"] = len(res["lat"]) / wall
    return res


async def backend_stats(url):
    async with aiohttp.ClientSession() as s, s.get(url + "/bench/stats") as r:
        return await r.json()


async def bench_target(t, a):
    """Warm up, then a loaded run at --concurrency and an unloaded one at concurrency 1."""
    b0 = await backend_stats(t.backend)
    phases = [
        await run_phase(t, a.concurrency, None, 2 * a.concurrency, 10),
        await run_phase(t, a.concurrency, a.duration, a.requests, a.max_phase_seconds),
        await run_phase(t, 1, None, a.solo_requests, a.max_phase_seconds),
    ]
    b1 = await backend_stats(t.backend)
    r = {k: sum((p[k] for p in phases), [] if k == "samples" else 0) for k in ("sent", "errors", "samples")}
    served, good = b1["requests"] - b0["requests"], r["sent"] - r["errors"]
    r.update(
        load=phases[1],
        solo=phases[2],
        bad=b1["bad"] - b0["bad"],
        served=served,
        streamed=b1["streamed"] - b0["streamed"],
    )
    if served < good:
        r["errors"] += 1
        r["samples"].append(f"backend served {served} requests for {good} good responses (cached or faked?)")
    return r


def proxy_problem():
    if not PROXY.exists():
        return f"{PROXY} does not exist"
    try:
        r = subprocess.run([sys.executable, str(PROXY), "--help"], capture_output=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "claude_proxy.py --help timed out"
    if r.returncode or b"--base-url" not in r.stdout:
        return f"claude_proxy.py --help does not work yet (rc {r.returncode}) {r.stderr.decode()[-300:]}"


def start_servers(procs, a, chunk_delay_ms=0.0):
    me, ports = [sys.executable, str(Path(__file__).resolve())], {n: free_port() for n in ["backend"] + a.targets}
    backend = f"http://127.0.0.1:{ports['backend']}"
    pids = {
        "backend": procs.start(
            "backend",
            me + ["--role", "backend", "--port", str(ports["backend"]), "--chunk-delay-ms", str(chunk_delay_ms)],
            ports["backend"],
        )
    }
    if "passthrough" in a.targets:
        pids["passthrough"] = procs.start(
            "passthrough",
            me + ["--role", "passthrough", "--port", str(ports["passthrough"]), "--upstream", backend],
            ports["passthrough"],
        )
    if "proxy" in a.targets and (why := proxy_problem()):
        print(f"!! skipping (c) claude_proxy: {why}")
        a.targets.remove("proxy")
    elif "proxy" in a.targets:
        pids["proxy"] = procs.start(
            "proxy",
            [
                sys.executable,
                str(PROXY),
                "--provider",
                "openai",
                "--base-url",
                backend + "/v1",
                "--model",
                MODEL,
                "--port",
                str(ports["proxy"]),
                "--log-level",
                "warning",
            ],
            ports["proxy"],
        )
    return backend, ports, pids


def make_target(name, stream, ports, pids, backend):
    importlib.import_module("conftest")  # check_anthropic_sse's; imported here so that no timed request pays for it
    fixture = json.loads(FIXTURE.read_text())
    if name == "proxy":
        headers = {k: v for k, v in fixture["headers"].items() if k.lower() not in ("accept", "user-agent")}
        body, url = dict(fixture["body"], stream=stream), f"http://127.0.0.1:{ports[name]}/v1/messages?beta=true"
        check = check_anthropic_sse if stream else check_anthropic_json
    else:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}
        body, url = openai_equivalent(fixture["body"], stream), f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
        check = check_openai_stream if stream else check_openai_json
    return SimpleNamespace(
        url=url, body=json.dumps(body).encode(), headers=headers, check=check, pid=pids[name], backend=backend
    )


# ------------------------------------------------------------------------------ reporting and entry points
def report(results, idle, after, a):
    label = {"backend": "(a) backend", "passthrough": "(b) passthrough", "proxy": "(c) claude_proxy"}
    print(
        f"\nloaded = concurrency {a.concurrency} for {a.duration}s; "
        f"c=1 = {a.solo_requests} sequential requests; times in ms;"
        + (f" backend pauses {a.chunk_delay_ms:g} ms between chunks;" if a.chunk_delay_ms else "")
        + "\ncpu = CPU ms/request of the server under test; rss in MB; "
        "cli% = load generator CPU (100 = it is the limit)"
    )
    hdr = (
        f"{'mode':<9}{'target':<17}{'req/s':>7}{'lat50':>7}{'lat99':>7}{'ttfe50':>7}{'ttfe99':>7} |{'c=1 lat50':>10}"
        f"{'lat99':>6}{'ttfe50':>7}{'ttfe99':>7} |{'cpu':>6}{'rss':>6}{'peak':>6}{'cli%':>5}{'errs':>5}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    for mode, per in results.items():
        for name, r in per.items():
            L, S = r["load"], r["solo"]
            print(
                f"{mode:<9}{label[name]:<17}{L['rps']:>7.0f}"
                + "".join(f"{pct(L[k], q):>7.1f}" for k in ("lat", "ttfe") for q in (0.5, 0.99))
                + " |"
                + "".join(
                    f"{pct(S[k], q):>{w}.2f}"
                    for k, q, w in (("lat", 0.5, 10), ("lat", 0.99, 6), ("ttfe", 0.5, 7), ("ttfe", 0.99, 7))
                )
                + f" |{L['cpu_ms']:>6.2f}{idle[name]:>6.1f}{max(L['rss_peak'], S['rss_peak']):>6.1f}"
                f"{L['client_pct']:>5.0f}{r['errors']:>5}"
            )
    misses = []
    for mode, per in [(m, p) for m, p in results.items() if "proxy" in p]:
        c = per["proxy"]
        print(f"\n[{mode}] claude_proxy (c) against the baselines; added ms = c minus baseline")
        for base in [b for b in ("backend", "passthrough") if b in per]:
            B = per[base]

            def d(ph, k, q, c=c, B=B):
                return pct(c[ph][k], q) - pct(B[ph][k], q)

            print(
                f"  c/{label[base][1]}: throughput {c['load']['rps'] / B['load']['rps']:.2f}x, cpu/request "
                f"{c['load']['cpu_ms'] / max(B['load']['cpu_ms'], 1e-9):.1f}x; "
                f"added c=1 lat p50 {d('solo', 'lat', 0.5):+.2f} "
                f"p99 {d('solo', 'lat', 0.99):+.2f} ttfe p50 {d('solo', 'ttfe', 0.5):+.2f}; loaded lat p50 "
                f"{d('load', 'lat', 0.5):+.1f} p99 {d('load', 'lat', 0.99):+.1f}"
            )
        checks = []
        if "passthrough" in per:
            want, got = (0.70 if mode == "stream" else 0.80), c["load"]["rps"] / per["passthrough"]["load"]["rps"]
            checks.append((f"throughput >= {want:.0%} of passthrough: {got:.0%}", got >= want))
        for what, ph, k, q, limit in (
            ("latency", "solo", "lat", 0.5, 2),
            ("latency", "solo", "lat", 0.99, 10),
            ("TTFE", "solo", "ttfe", 0.5, 2),
        ):
            vs = {
                x: pct(c[ph][k], q) - pct(per[b][ph][k], q)
                for x, b in (("a", "backend"), ("b", "passthrough"))
                if b in per
            }
            if "a" in vs:  # the target is against going direct to (a); (b) shows what the bare hop costs
                checks.append(
                    (
                        f"added {what} p{int(q * 100)} (c=1) <= {limit} ms: {vs['a']:+.2f} vs a"
                        + (f", {vs['b']:+.2f} vs b" if "b" in vs else ""),
                        vs["a"] <= limit,
                    )
                )
        for what, ok in checks:
            print(f"  {'PASS' if ok else 'MISS'}  {what}")
            misses += [] if ok else [f"{mode}: {what}"]
    if "proxy" in idle:
        ok = idle["proxy"] < 80
        print(
            f"\n  {'PASS' if ok else 'MISS'}  proxy RSS idle < 80 MB: {idle['proxy']:.1f} MB "
            f"(after the runs: {after['proxy']:.1f} MB)"
        )
        misses += [] if ok else ["RSS idle"]
    return misses


async def main_bench(a, procs):
    backend, ports, pids = start_servers(procs, a, a.chunk_delay_ms or 0)
    idle = {n: rss_mb(p) for n, p in pids.items()}
    results, errors, other0, w0 = {}, 0, foreign_cpu(pids), time.perf_counter()
    for mode in a.modes:
        results[mode] = {}
        for name in a.targets:
            print(f"running {mode:<9} {name:<12} ...", end=" ", flush=True)
            r = results[mode][name] = await bench_target(make_target(name, mode == "stream", ports, pids, backend), a)
            errors += r["errors"]
            print(
                f"{r['load']['rps']:.0f} req/s, {r['sent']} requests, {r['errors']} errors; the backend served "
                f"{r['served']} ({r['streamed']} streamed" + (f", {r['bad']} rejected)" if r["bad"] else ")")
            )
            for s in r["samples"]:
                print("    error:", s)
            if procs.procs[name].poll() is not None:
                raise RuntimeError(f"{name} died (exit {procs.procs[name].returncode}):\n{procs.tail(name)}")
    other = (foreign_cpu(pids) - other0) * 100 / (time.perf_counter() - w0)
    misses = report(results, idle, {n: rss_mb(p) for n, p in pids.items()}, a)
    print(
        f"\nother processes used {other:.0f}% of a core ({os.cpu_count()} cores) during the runs"
        + (": the numbers are skewed, run again on a quiet machine" if other > 15 else "")
    )
    if errors:
        print(f"\nserver logs: {procs.logdir}")
    return 1 if errors or (a.strict and misses) else 0


async def main_stress(a, procs):
    a.targets = [a.stress_target]
    delay_ms = 2.0 if a.chunk_delay_ms is None else a.chunk_delay_ms
    backend, ports, pids = start_servers(procs, a, delay_ms)
    if a.stress_target not in pids:
        return 1
    t, n = make_target(a.stress_target, True, ports, pids, backend), a.stress_streams
    print(f"stress: {n} concurrent streams of {N_CHUNKS} chunks, {delay_ms:g} ms apart, via {a.stress_target}")
    rss0, b0, w0 = rss_mb(t.pid), await backend_stats(backend), time.perf_counter()
    r = await run_phase(t, n, None, n, 120)  # n workers, one stream each, all started at once
    wall, st = time.perf_counter() - w0, await backend_stats(backend)
    print(
        f"  {len(r['lat'])} ok, {r['errors']} errors in {wall:.2f}s (one stream alone takes >= "
        f"{N_CHUNKS * delay_ms:.0f} ms)\n  stream duration p50 {pct(r['lat'], 0.5):.0f} ms "
        f"p99 {pct(r['lat'], 0.99):.0f} ms; ttfe p50 {pct(r['ttfe'], 0.5):.0f} ms p99 {pct(r['ttfe'], 0.99):.0f} ms"
    )
    print(
        f"  backend: served {st['requests'] - b0['requests']}, max concurrent streams {st['max_inflight']}, "
        f"rejected {st['bad'] - b0['bad']}\n  {a.stress_target}: cpu {r['cpu_ms']:.2f} ms/stream, "
        f"rss {rss0:.1f} MB idle -> {r['rss_peak']:.1f} MB peak -> {rss_mb(t.pid):.1f} MB after"
    )
    for e in r["samples"]:
        print("  error:", e)
    print(
        f"  {'PASS' if r['errors'] == 0 else 'FAIL'}: errors must be 0"
        + (f" (server logs: {procs.logdir})" if r["errors"] else "")
    )
    return 1 if r["errors"] else 0


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def soak_body(t, fault=None, **override):
    """The target's body, with `<bench-fault:NAME>` first in the first user text (the backend acts on it)."""
    body = dict(json.loads(t.body), **override)
    if fault:
        first = body["messages"][0]
        body["messages"] = [
            dict(first, content=[{"type": "text", "text": f"<bench-fault:{fault}>"}] + first["content"])
        ] + body["messages"][1:]
    return json.dumps(body).encode()


def anthropic_error(kind):
    return lambda data: None if json.loads(data).get("error", {}).get("type") == kind else f"expected error type {kind}"


SOAK_MIX = [
    "stream",
    "nonstream",
    "stream",
    "disconnect",
    "stream",
    "invalid",
    "stream",
    "backend_500",
    "nonstream",
    "backend_break",
]  # request i is SOAK_MIX[i % 10]


async def soak_one(s, t, kind, body, status, check):
    """None when the proxy answered as expected, else what went wrong."""
    try:
        async with s.post(t.url, data=body, headers=t.headers) as r:
            if kind == "disconnect":  # the first SSE event, then hang up mid-stream
                data = await r.content.readuntil(b"\n\n")
                r.close()
            else:
                data = await r.read()
        return f"HTTP {r.status}: {data[:200]!r}" if r.status != status else check(data)
    except Exception as e:  # noqa: BLE001 — every failure is counted, none is fatal
        return f"{type(e).__name__}: {e}"


async def main_soak(a, procs):
    a.targets = ["proxy"]
    backend, ports, pids = start_servers(procs, a)
    if "proxy" not in pids:
        return 1
    (ts, tn), n = (make_target("proxy", stream, ports, pids, backend) for stream in (True, False)), a.soak_requests
    cases = {
        "stream": (ts.body, 200, ts.check),
        "nonstream": (tn.body, 200, tn.check),
        "disconnect": (
            soak_body(ts, "slow"),
            200,  # the backend paces this stream: the client leaves mid-way
            lambda d: None if d.startswith(b"event: message_start") else "no message_start",
        ),
        "invalid": (soak_body(ts, messages="x"), 400, anthropic_error("invalid_request_error")),
        "backend_500": (soak_body(ts, "http500"), 500, anthropic_error("api_error")),
        "backend_break": (
            soak_body(ts, "break"),
            200,
            lambda d: (
                None
                if b"event: error" in d and b"message_stop" not in d
                else f"no event: error at the end: {d[-200:]!r}"
            ),
        ),
    }
    res = {"ok": dict.fromkeys(cases, 0), "bad": dict.fromkeys(cases, 0), "samples": []}
    print(
        f"soak: {n} requests at concurrency {a.soak_concurrency} through the proxy; mix per 10 requests: "
        + ", ".join(f"{SOAK_MIX.count(k)} {k}" for k in cases)
    )
    w0 = time.perf_counter()
    deadline = w0 + 300  # hard cap; the budget is ~2 minutes

    async def run(todo):
        async def worker():
            for i in todo:
                if time.perf_counter() > deadline:
                    break
                kind = SOAK_MIX[i % len(SOAK_MIX)]
                err = await soak_one(s, ts, kind, *cases[kind])
                res["bad" if err else "ok"][kind] += 1
                if err:
                    res["samples"] += [f"#{i} {kind}: {err}"][: 5 - len(res["samples"])]

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=a.soak_concurrency),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as s:  # closed: no idle keep-alives
            await asyncio.gather(*(worker() for _ in range(a.soak_concurrency)))
        await asyncio.sleep(1.0)  # idle: in-flight work on the proxy finishes
        return rss_mb(ts.pid), fd_count(ts.pid)

    warm = await run(iter(range(n // 5)))
    end = await run(iter(range(n // 5, n)))
    wall, st = time.perf_counter() - w0, await backend_stats(backend)
    done = sum(res["ok"].values()) + sum(res["bad"].values())
    unexpected = sum(res["bad"].values()) + n - done
    print(
        "  "
        + ", ".join(
            f"{k} {res['ok'][k]} ok" + (f" / {res['bad'][k]} UNEXPECTED" if res["bad"][k] else "") for k in cases
        )
        + f"; unexpected {unexpected}"
        + (f" ({n - done} not sent: 300 s cap)" if done < n else "")
    )
    for e in res["samples"]:
        print("  error:", e)
    print(
        f"  {done} requests in {wall:.1f}s, the 2 idle pauses included ({done / (wall - 2):.0f} req/s)"
        + (" — OVER the ~2 minute budget" if wall > 120 else "")
        + f"; backend served {st['requests']}, streams still open there after the idle pause: {st['inflight']}"
    )
    rss_ok, fd_ok = end[0] <= warm[0] * 1.10, 0 <= end[1] <= warm[1] + 5
    print(
        f"  proxy after warm-up ({n // 5} requests + 1 s idle): rss {warm[0]:.1f} MB, {warm[1]} fds; at the end "
        f"(+1 s idle): rss {end[0]:.1f} MB ({(end[0] / warm[0] - 1) * 100:+.1f}%), {end[1]} fds ({end[1] - warm[1]:+d})"
    )
    for what, ok in (
        ("rss at the end <= warm-up + 10%", rss_ok),
        ("open fds at the end <= warm-up + 5", fd_ok),
        ("every request got the expected outcome", unexpected == 0),
    ):
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
    ok = rss_ok and fd_ok and unexpected == 0 and procs.procs["proxy"].poll() is None
    print(f"  {'PASS' if ok else 'FAIL'}" + ("" if ok else f" (server logs: {procs.logdir})"))
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per loaded run (default 5)")
    p.add_argument(
        "--requests", type=int, help="end each loaded run after N requests instead (capped by --max-phase-seconds)"
    )
    p.add_argument("--solo-requests", type=int, default=200, help="requests in each concurrency-1 run (default 200)")
    p.add_argument("--max-phase-seconds", type=float, default=30.0, help="hard cap for any one run (default 30)")
    p.add_argument("--modes", default="stream,nonstream", help="comma list (default stream,nonstream)")
    p.add_argument(
        "--targets", default="backend,passthrough,proxy", help="comma list (default backend,passthrough,proxy)"
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed, too")
    p.add_argument("--stress", action="store_true", help="only the stress test: concurrent streams, errors must be 0")
    p.add_argument("--stress-streams", type=int, default=500)
    p.add_argument(
        "--chunk-delay-ms", type=float, help="backend pause between stream chunks (default 0; 2 with --stress)"
    )
    p.add_argument("--stress-target", default="proxy", choices=["proxy", "passthrough"])
    p.add_argument(
        "--soak", action="store_true", help="only the soak test: requests mixed with faults, no leaks allowed"
    )
    p.add_argument("--soak-requests", type=int, default=10000)
    p.add_argument("--soak-concurrency", type=int, default=16)
    for hidden in ("--role", "--port", "--upstream"):  # used by the server subprocesses
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "backend":
        return serve_backend(int(a.port), (a.chunk_delay_ms or 0) / 1000)
    if a.role == "passthrough":
        return serve_passthrough(int(a.port), a.upstream)
    a.modes, a.targets = [m for m in a.modes.split(",") if m], [t for t in a.targets.split(",") if t]
    if not set(a.modes) <= {"stream", "nonstream"} or not set(a.targets) <= {"backend", "passthrough", "proxy"}:
        p.error("--modes takes stream,nonstream and --targets backend,passthrough,proxy")
    procs, rc = Procs(), 2

    async def guarded():  # Ctrl-C / SIGTERM cancel the run; `finally` below stops the servers
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, asyncio.current_task().cancel)
        try:
            return await (
                main_soak(a, procs) if a.soak else main_stress(a, procs) if a.stress else main_bench(a, procs)
            )
        except asyncio.CancelledError:
            print("\ninterrupted", file=sys.stderr)
            return 130

    try:
        rc = asyncio.run(guarded())
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
    finally:
        procs.stop_all()
        if rc == 0:
            shutil.rmtree(procs.logdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
