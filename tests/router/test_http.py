"""The router's OpenAI-compatible HTTP front, end to end: the official `openai` client (and raw HTTP
for what a client library never sends) against a real router with --http-port over real engines on
stories260k.

Oracles: the same router's gRPC Generate for the same request (greedy: token for token), the
engines' GetLoad for freed blocks, and OpenAI's documented response and error shapes.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import subprocess
import sys

import httpx
import pytest

openai = pytest.importorskip("openai")  # the test extra; the GPU image has none

from kvmesh.procs import ServiceProcess
from kvmesh.v1 import common_pb2, router_pb2
from tests.router.client import engine_load, engines_idle, generate, greedy, router_stub
from tests.router.conftest import CHILD_ENV, START_TIMEOUT_S

ENGINES = ["a", "c"]  # not "b": test_failover (before this module) kills and restarts it
MODEL = "stories260k"
# stories260k has no chat template; the test tokenizer serves a copy of it with this one (real files,
# a real Jinja template), so that chat goes through the tokenizer tier's template rendering.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


class Front:
    """One router serving both fronts: gRPC at `grpc_address`, HTTP at `base_url`."""

    def __init__(self, router: ServiceProcess, http_port: int, engines: list[str]):
        self.router = router
        self.grpc_address = router.address
        self.base_url = f"http://127.0.0.1:{http_port}"
        self.engines = engines

    def client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)


def chat_model_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """stories260k with a chat template: links to every file but tokenizer_config.json."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "tokenizer_config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return dst


def http_router(mesh, engines: list[str], tmp: pathlib.Path, *flags: str, tokenizer=None, env=None) -> Front:
    port_file = tmp / f"http-{len(mesh.routers)}.port"
    router = mesh.router(engines, "--http-port", "0", "--http-port-file", str(port_file), *flags,
                         tokenizer=tokenizer, env=env)
    return Front(router, int(port_file.read_text()), [mesh.engines[n].address for n in engines])


@pytest.fixture(scope="module")
def chat_tokenizer(mesh, stories260k_dir, tmp_path_factory):
    model = chat_model_copy(stories260k_dir, tmp_path_factory.mktemp("chat") / MODEL)
    proc = ServiceProcess("tokenizer", "tokenizer-chat", ["--model", str(model)], env=CHILD_ENV,
                          log_path=str(mesh.log_dir / "tokenizer-chat.log"), die_with_parent=True).start()
    proc.wait_healthy(START_TIMEOUT_S)
    yield proc
    proc.stop(10)


@pytest.fixture(scope="module")
def front(mesh, chat_tokenizer, tmp_path_factory):
    return http_router(mesh, ENGINES, tmp_path_factory.mktemp("front"), tokenizer=chat_tokenizer)


@pytest.fixture
async def client(front):
    async with front.client() as c:
        yield c


@pytest.fixture
async def stub(front):
    async with router_stub(front.grpc_address, len(ENGINES)) as stub:
        yield stub


@pytest.fixture(scope="module")
def examples(stories260k_dir):
    return json.loads((stories260k_dir / "greedy_examples.json").read_text())["examples"]


async def test_models_and_health(front, client):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("gpt-4o")
    assert "gpt-4o" in err.value.message
    async with httpx.AsyncClient(base_url=front.base_url) as http:
        health = await http.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        missing = await http.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


async def test_get_info_states_the_max_tokens_limit_and_default(stub):
    """A client in another language learns the limits from GetInfo instead of from errors."""
    info = await stub.GetInfo(common_pb2.GetInfoRequest())
    assert (info.max_tokens_limit, info.default_max_tokens, info.max_model_len) == (4096, 256, 512)
    (entry,) = (await stub.ListModels(router_pb2.ListModelsRequest())).models
    assert entry.HasField("max_model_len") and entry.max_model_len == 512


async def test_greedy_completion_equals_the_grpc_text(front, client, stub, examples):
    for ex in examples[:3]:
        n = ex["max_new_tokens"]
        via_grpc = await generate(stub, router_pb2.RouterGenerateRequest(text=ex["prompt"], sampling=greedy(n)))
        whole = await client.completions.create(model=MODEL, prompt=ex["prompt"], max_tokens=n, temperature=0)
        (choice,) = whole.choices
        assert choice.text == via_grpc.text and len(choice.text) > 10
        assert choice.finish_reason == "length"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
            (len(ex["prompt_ids"]), n, len(ex["prompt_ids"]) + n)
        assert whole.object == "text_completion" and whole.id.startswith("cmpl-")

        chunks = [c async for c in await client.completions.create(
            model=MODEL, prompt=ex["prompt"], max_tokens=n, temperature=0, stream=True,
            stream_options={"include_usage": True})]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == via_grpc.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert len(chunks) > 3  # streamed in pieces, not one blob
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


async def test_token_id_prompt_and_empty_prompt(front, client, stub, examples):
    ex = examples[0]
    by_ids = await client.completions.create(model=MODEL, prompt=ex["prompt_ids"], max_tokens=8, temperature=0)
    by_text = await client.completions.create(model=MODEL, prompt=ex["prompt"], max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    # An empty prompt tokenizes to BOS: a valid request (as in vLLM), here and over gRPC.
    empty = await client.completions.create(model=MODEL, prompt="", max_tokens=4, temperature=0)
    assert (empty.usage.prompt_tokens, empty.usage.completion_tokens) == (1, 4)
    res = await generate(stub, router_pb2.RouterGenerateRequest(text="", sampling=greedy(4)))
    assert res.text == empty.choices[0].text and res.last.usage.prompt_tokens == 1
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=MODEL, prompt=[], max_tokens=4)
    assert err.value.body["param"] == "prompt" and "must not be empty" in err.value.message


async def test_greedy_chat_equals_the_grpc_chat(front, client, stub):
    messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}]
    via_grpc = await generate(stub, router_pb2.RouterGenerateRequest(
        chat=router_pb2.ChatInput(messages=[common_pb2.ChatMessage(**m) for m in messages]), sampling=greedy(24)))
    whole = await client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=24,
                                                 temperature=0)
    (choice,) = whole.choices
    assert (choice.message.role, choice.message.content) == ("assistant", via_grpc.text)
    assert choice.finish_reason == "length" and whole.object == "chat.completion"
    assert whole.usage.prompt_tokens == via_grpc.last.usage.prompt_tokens

    chunks = [c async for c in await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True})]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == via_grpc.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and all(c.object == "chat.completion.chunk" for c in chunks)


async def test_stop_strings_seed_and_logprobs(front, client):
    full = (await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40,
                                            temperature=0)).choices[0].text
    stop = full[12:16]
    cut = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0,
                                          stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[:full.index(stop)]

    sampling = dict(temperature=1.0, seed=7, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.1,
                    extra_body={"top_k": 40, "min_p": 0.01, "repetition_penalty": 1.1})
    sampled = [(await client.completions.create(model=MODEL, prompt="Once", max_tokens=16, **sampling)).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same text

    lp = (await client.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0,
                                          logprobs=2)).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and logprob <= 0 and max(top.values()) == pytest.approx(logprob)  # greedy: the best
    assert lp.text_offset[0] == 0

    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content).replace(" ", "") == chat.choices[0].message.content.replace(" ", "")


async def _wait_running(addresses: list[str], timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        loads = [await engine_load(a) for a in addresses]
        if sum(r.num_running_requests for r in loads) == 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the request never ran on an engine")


async def test_client_disconnect_cancels_the_engine_request(front, client):
    baseline = await engines_idle(front.engines)
    # Streaming: read a few chunks, then close the connection.
    stream = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=480,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await _wait_running(front.engines)
    await stream.close()
    after = await engines_idle(front.engines, timeout_s=30)
    for a in front.engines:  # nothing in use (finished full blocks may stay cached for reuse)
        assert (after[a].free_blocks + after[a].cached_blocks, after[a].in_use_blocks, after[a].num_running_requests) \
            == (baseline[a].free_blocks + baseline[a].cached_blocks, 0, 0), after[a]

    # Non-streaming: the client gives up while the engine computes.
    async with httpx.AsyncClient(base_url=front.base_url) as http:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True}
        request = asyncio.ensure_future(http.post("/v1/completions", json=body, timeout=120))
        await _wait_running(front.engines)
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
    after = await engines_idle(front.engines, timeout_s=30)
    for a in front.engines:  # nothing in use (finished full blocks may stay cached for reuse)
        assert (after[a].free_blocks + after[a].cached_blocks, after[a].in_use_blocks, after[a].num_running_requests) \
            == (baseline[a].free_blocks + baseline[a].cached_blocks, 0, 0), after[a]


@pytest.mark.parametrize("kwargs, param, words", [
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": 600}, "max_tokens", "exceeds max_model_len 512"),
    ({"max_tokens": 5000}, "max_tokens", "must be in [1, 4096]"),
    ({"temperature": -1}, "temperature", "must be in [0, 100]"),
    ({"top_p": 0}, "top_p", "must be in (0, 1]"),
    ({"n": 2}, "n", "only n=1 is supported"),
    ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty", "repetition_penalty"),  # the engine's check
    ({"echo": True}, "echo", "not supported"),
    ({"stop": [""]}, "stop", "must not be empty"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
])
async def test_bad_completion_values_are_400_naming_the_field(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model=MODEL, prompt="Hi", **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert words in err.value.message, err.value.message


async def test_bad_chat_and_model_errors(front, client):
    with pytest.raises(openai.NotFoundError) as err:
        await client.completions.create(model="gpt-4o", prompt="Hi")
    assert "gpt-4o" in err.value.message and err.value.body["type"] == "not_found_error"
    cases = [
        ({"messages": []}, "messages", "needs at least one message"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "Input should be"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type",
         "only 'text' parts"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "tool"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 600}, "max_completion_tokens",
         "exceeds max_model_len"),
    ]
    for kwargs, param, words in cases:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model=MODEL, **kwargs)
        assert (err.value.body["param"], words in err.value.message) == (param, True), err.value.message


async def test_malformed_bodies_over_raw_http(front):
    async with httpx.AsyncClient(base_url=front.base_url) as http:
        for raw in (b"{bad", b'{"prompt": "Hi",}', b"\xff\xfe", b""):
            r = await http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], (raw, r.text)
        r = await http.post("/v1/chat/completions", content=b"[1, 2]")
        assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={"model": MODEL})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "prompt")
        r = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": "many"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "max_tokens")
        r = await http.get("/v1/completions")
        assert r.status_code == 405 and "error" in r.json()
        # curl -d sends a form content type: the body is read as JSON all the same.
        r = await http.post("/v1/completions", content=b'{"prompt": "Hi", "max_tokens": 2}',
                            headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


async def test_auth_and_overload(mesh, tmp_path_factory):
    front = http_router(mesh, ["a"], tmp_path_factory.mktemp("auth"), "--max-concurrent-streams", "1",
                        "--retry-after", "2", env={"KVMESH_AUTH_TOKEN": "s3cret"})
    async with httpx.AsyncClient(base_url=front.base_url) as http:
        assert (await http.get("/health")).status_code == 200  # probes carry no credentials
    for key in ("wrong", "s3cre", "s3cretX"):
        async with front.client(key) as client:
            with pytest.raises(openai.AuthenticationError) as err:
                await client.models.list()
        assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    async with front.client("s3cret") as client:
        await _one_stream_is_the_limit(client, front)


async def _one_stream_is_the_limit(client, front) -> None:
    stream = await client.completions.create(model=MODEL, prompt="Once", max_tokens=480, stream=True,
                                             extra_body={"ignore_eos": True})
    await stream.__anext__()  # one stream open: the limit
    with pytest.raises(openai.RateLimitError) as err:
        await client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert err.value.status_code == 429 and err.value.response.headers["retry-after"] == "2"
    await stream.close()
    assert (await engines_idle(front.engines))[front.engines[0]].num_running_requests == 0


async def test_no_engine_is_503(mesh, tmp_path_factory):
    """A router whose only engine address answers nothing: /health and requests say 503."""
    port_file = tmp_path_factory.mktemp("none") / "http.port"
    proc = ServiceProcess("router", "router-no-engine",
                          ["--tokenizer", mesh.tokenizer.address, "--engines", "127.0.0.1:9",
                           "--http-port", "0", "--http-port-file", str(port_file)],
                          env=CHILD_ENV, log_path=str(mesh.log_dir / "router-no-engine.log"), die_with_parent=True)
    proc.start()
    try:
        proc.wait_listening(START_TIMEOUT_S)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/health")).status_code == 503
            r = await http.post("/v1/completions", json={"prompt": "Hi"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error", r.text
    finally:
        proc.stop(10)


def test_generate_into_head_ends_quietly(front):
    """`kvmesh generate ... | head`: head leaves early; generate stops without a BrokenPipeError."""
    cmd = (f"{sys.executable} -m kvmesh.cli.main generate --router {front.grpc_address} --prompt 'Once upon a time'"
           " --max-tokens 400 --ignore-eos --temperature 0 | head -c 12; echo \" generate=${PIPESTATUS[0]}\"")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.stderr == "" and out.stdout.endswith(" generate=141\n"), (out.stdout, out.stderr)
    assert len(out.stdout) == 12 + len(" generate=141\n")
