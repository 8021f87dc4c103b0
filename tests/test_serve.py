"""`moelab serve`: continuous batching (`moelab.serve.scheduler`, `batch_cache`) and the OpenAI-compatible app
against a live uvicorn server on 127.0.0.1, called with the official `openai` client. Every text is checked against
`moelab.generate.generate` decoding the same prompt alone on the same float32 model."""

from __future__ import annotations

import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from moelab import hf  # noqa: E402
from moelab.config.model import ModelConfig, MoEConfig  # noqa: E402
from moelab.inference.generate import generate  # noqa: E402
from moelab.model.cache import KVCache  # noqa: E402
from moelab.model.transformer import MoETransformer  # noqa: E402
from moelab.runs.load import load_model  # noqa: E402
from moelab.serve import batch_cache  # noqa: E402
from moelab.serve.app import create_app  # noqa: E402
from moelab.serve.scheduler import Engine, Request  # noqa: E402
from moelab.serve.server import build  # noqa: E402

V = 64
CFG = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96,
                  moe=MoEConfig(d_model=32, d_expert=16, n_experts=8, top_k=2))
TEMPLATE = ("{% if prefix %}{{ prefix }} {% endif %}{% for w in (extra or []) %}{{ w }} {% endfor %}"
            "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is much faster on a shared machine (and the server runs in a thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model() -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(CFG)
    for w in model.parameters():  # larger than the init's, so that greedy tokens depend on the whole prompt
        w.data.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A float32 Qwen3-MoE-like checkpoint, a word-level tokenizer ("t0" … "t60", the chat markers, "[UNK]"; words
    decode joined by spaces) and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("serve")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "tokenizer.json"))
    out = hf.save(_model(), root / "hf", tokenizer_json=root / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return out


WORDS = [f"t{i}" for i in range(V - 4)] + ["<|user|>", "<|assistant|>", "<|system|>", "[UNK]"]


def _words(ids) -> str:
    return " ".join(WORDS[i] for i in ids)


def _solo(model, prompt: str, n: int, **kw) -> str:
    """The reference: the prompt decoded alone by `moelab.generate.generate`, as text."""
    return _words(generate(model, [WORDS.index(w) for w in prompt.split()], n, **kw))


class Server:
    """uvicorn serving `create_app(build(...))` on a free port of 127.0.0.1 in a thread."""

    def __init__(self, path, slow: float = 0.0, **options):
        import uvicorn

        self.loaded = load_model(path)
        if slow:  # each forward sleeps: a stream stays open long enough to act on it mid-way
            forward = self.loaded.model.forward
            self.loaded.model.forward = lambda *a, **k: (time.sleep(slow), forward(*a, **k))[1]
        self.served = build(self.loaded, model_name="tiny", **options)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.served), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=options.get("api_key") or "none",
                                    max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(hf_dir):
    s = Server(hf_dir, max_batch=8)
    yield s
    s.close()


def test_completions_and_chat_streamed_and_not(server, hf_dir):
    model = server.loaded.model
    r = server.client.completions.create(model="tiny", prompt="t1 t2 t3", max_tokens=7, temperature=0)
    assert r.choices[0].text == _solo(model, "t1 t2 t3", 7)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 7, 10)
    parts = list(server.client.completions.create(model="tiny", prompt="t1 t2 t3", max_tokens=7, temperature=0,
                                                  stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"
    msgs = [{"role": "system", "content": "t4"}, {"role": "user", "content": "t5 t6"}]
    chat = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == _solo(model, "<|system|> t4 <|user|> t5 t6 <|assistant|>", 5)
    streamed = list(server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                                          stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == 5 and streamed[-1].usage.prompt_tokens == 6
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


# -- the engine alone ------------------------------------------------------------------------------------------
def test_chat_template_kwargs_are_variables_of_the_template(server):
    """vLLM's `chat_template_kwargs` (Qwen3's enable_thinking is one): rendered into the prompt; a bad one is a 400
    naming the field."""
    model, msgs = server.loaded.model, [{"role": "user", "content": "t5 t6"}]
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                              extra_body={"chat_template_kwargs": {"prefix": "t9", "extra": ["t8"]}})
    assert r.choices[0].message.content == _solo(model, "t9 t8 <|user|> t5 t6 <|assistant|>", 4)
    assert r.usage.prompt_tokens == 6
    for kwargs, match in [([1], "must be an object"), ({"add_generation_prompt": False}, "is set by the server"),
                          ({"not a name": 1}, "must be an object"), ({"extra": 5}, "TypeError")]:
        with pytest.raises(openai.BadRequestError, match=match) as e:
            server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1,
                                                  extra_body={"chat_template_kwargs": kwargs})
        assert e.value.body["param"] == "chat_template_kwargs"
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs: unrecognized"):
        server.client.completions.create(model="tiny", prompt="t1", max_tokens=1,
                                         extra_body={"chat_template_kwargs": {"prefix": "t9"}})


def _run_engine(engine: Engine, reqs: list[Request], stagger: float = 0.0) -> None:
    engine.start()
    for r in reqs:
        engine.submit(r)
        time.sleep(stagger)
    while not all(r.done for r in reqs):
        time.sleep(0.005)
    engine.stop()


def test_requests_joining_and_leaving_get_their_solo_tokens():
    """32 prompts of 1 to 30 tokens asking for 1 to 40 tokens, joining a batch of at most 8 rows at different
    steps (prefilled 7 tokens per step): each gets greedily the tokens `generate` gives it alone, and with a seed
    at temperature 1 the tokens it draws alone; stop ids end a row early."""
    model = _model()
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 30))] for _ in range(32)]
    lengths = [rng.randint(1, 40) for _ in prompts]
    steps: list[dict] = []
    reqs = [Request(p, n, emit=lambda ev: None) for p, n in zip(prompts, lengths)]
    _run_engine(Engine(model, _words, None, max_batch=8, prefill_chunk=7, on_step=steps.append), reqs, 0.003)
    assert [r.generated for r in reqs] == [generate(model, p, n) for p, n in zip(prompts, lengths)]
    assert max(s["batch"] for s in steps) > 1  # they did share steps
    assert all(len(s["experts_touched"]) == 2 and all(2 <= t <= min(8, 2 * s["batch"]) for t in s["experts_touched"])
               for s in steps)
    sampled = [Request(p, 12, emit=lambda ev: None, temperature=1.0, top_p=0.9, seed=i) for i, p in
               enumerate(prompts[:8])]
    _run_engine(Engine(model, _words, None, max_batch=4), sampled)
    assert [r.generated for r in sampled] == [generate(model, p, 12, temperature=1.0, top_p=0.9, seed=i)
                                              for i, p in enumerate(prompts[:8])]
    stop = generate(model, prompts[0], 10)[4]
    stopped = [Request(p, 10, emit=lambda ev: None) for p in prompts[:6]]
    _run_engine(Engine(model, _words, stop, max_batch=3), stopped)
    assert [r.generated for r in stopped] == [generate(model, p, 10, stop_id=stop) for p in prompts[:6]]


def test_batch_cache_join_and_keep_against_a_padded_batch():
    """Rows joined one by one (the longer shifting the batch right) and removed hold exactly the keys and values
    of the left-padded batch a single forward builds, and its pads."""
    model = _model()
    prompts = [[3, 9, 14], [7, 1, 5, 8, 2, 6], [11]]
    with torch.no_grad():
        batch = None
        for p in prompts:
            row = KVCache()
            model(torch.tensor([p]), cache=row)
            batch = batch_cache.join(batch, row)
        L = max(map(len, prompts))
        ref = KVCache(pad=torch.tensor([L - len(p) for p in prompts]))
        model(torch.tensor([[0] * (L - len(p)) + p for p in prompts]), cache=ref)
    assert batch.pad.tolist() == ref.pad.tolist() == [3, 0, 5] and batch.length == L
    for b, p in enumerate(prompts):
        for i in range(CFG.n_layers):
            real = slice(L - len(p), L)
            torch.testing.assert_close(batch.k[i][b, :, real], ref.k[i][b, :, real], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(batch.v[i][b, :, real], ref.v[i][b, :, real], rtol=1e-5, atol=1e-6)
            assert not batch.k[i][b, :, :L - len(p)].any()  # padding columns are zeros
    kept = batch_cache.keep(batch, [0, 2])  # the longest row leaves: 3 leading columns are padding in both
    assert kept.pad.tolist() == [0, 2] and kept.length == 3
    torch.testing.assert_close(kept.k[0][1, :, 2:3], batch.k[0][2, :, 5:6])
    lone = batch_cache.keep(kept, [1])
    assert lone.pad is None and lone.length == 1 and batch_cache.keep(lone, []) is None


def test_engine_options_and_requests_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="max_batch=0"):
        Engine(model, _words, max_batch=0)
    with pytest.raises(ValueError, match="max_tokens_in_flight=1 "):
        Engine(model, _words, max_tokens_in_flight=1)
    e = Engine(model, _words, max_tokens_in_flight=50)
    with pytest.raises(ValueError, match=r"max_tokens=90 with a prompt of 10 tokens exceeds the model's context "
                                         r"of 96 tokens: allowed at most 86"):
        e.check([1] * 10, 90)
    with pytest.raises(ValueError, match="max-tokens-in-flight=50: allowed at most 40"):
        e.check([1] * 10, 41)
    with pytest.raises(ValueError, match="max_tokens=0"):
        e.check([1], 0)
    # admission under the KV bound: rows x the longest reservation
    e.rows = [Request([1] * 10, 10, emit=print)]  # 20 positions
    assert e.fits(Request([1] * 5, 10, emit=print))  # 2 x 20 <= 50
    assert not e.fits(Request([1] * 10, 20, emit=print))  # 2 x 30 > 50


# -- the HTTP server -------------------------------------------------------------------------------------------
def test_stop_strings_and_seeds(server):
    model = server.loaded.model
    full = _solo(model, "t8 t9", 10).split()
    stop = f" {full[3]}"  # cut before the 4th token's word, streamed or not
    r = server.client.completions.create(model="tiny", prompt="t8 t9", max_tokens=10, temperature=0, stop=[stop, "x"])
    expected = " ".join(full)[:" ".join(full).find(stop)]
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    parts = list(server.client.completions.create(model="tiny", prompt="t8 t9", max_tokens=10, temperature=0,
                                                  stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in parts) == expected and parts[-1].choices[0].finish_reason == "stop"
    seeded = [server.client.completions.create(model="tiny", prompt="t8 t9", max_tokens=10, temperature=1.0, top_p=0.9,
                                               seed=11).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1] == _solo(model, "t8 t9", 10, temperature=1.0, top_p=0.9, seed=11)
    other = server.client.completions.create(model="tiny", prompt="t8 t9", max_tokens=10, temperature=1.0, seed=12)
    assert other.choices[0].text != _solo(model, "t8 t9", 10)  # sampled, not greedy (checked for this seed)


def test_32_concurrent_requests_each_get_their_solo_greedy_tokens(server):
    model = server.loaded.model
    rng = random.Random(1)
    jobs = [(" ".join(f"t{rng.randrange(V - 4)}" for _ in range(rng.randint(1, 20))), rng.randint(1, 30))
            for _ in range(32)]
    out: dict[int, str] = {}

    def call(i: int) -> None:
        prompt, n = jobs[i]
        if i % 2:
            parts = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                     stream=True)
            out[i] = "".join(p.choices[0].text for p in parts)
        else:
            out[i] = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                                      temperature=0).choices[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out.get(i) for i in range(32)] == [_solo(model, p, n) for p, n in jobs]
    metrics = _get(server.url, "/metrics")[1]
    batch = _metric(metrics, "moelab_decode_rows_total") / _metric(metrics, "moelab_decode_steps_total")
    assert batch > 1  # they shared decode steps
    touched, uniform = _metric(metrics, "moelab_experts_touched_total"), _metric(metrics,
                                                                                 "moelab_experts_touched_uniform_total")
    layer_steps = _metric(metrics, "moelab_moe_layer_steps_total")
    assert 2 <= touched / layer_steps <= 8 and 2 <= uniform / layer_steps <= 8


def _get(url: str, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    return r.status, data, dict(r.getheaders())


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


MALFORMED = [b"{not json", b"[]", b'"text"', b"{}", b'{"prompt": 5}', b'{"prompt": ["a", "b"]}',
             b'{"prompt": "t1", "max_tokens": 0}', b'{"prompt": "t1", "max_tokens": "3"}',
             b'{"prompt": "t1", "max_tokens": 500}', b'{"prompt": "t1", "temperature": -1}',
             b'{"prompt": "t1", "temperature": "hot"}', b'{"prompt": "t1", "top_p": 0}', b'{"prompt": "t1", "n": 2}',
             b'{"prompt": "t1", "best_of": 3}', b'{"prompt": "t1", "logprobs": 2}', b'{"prompt": "t1", "echo": true}',
             b'{"prompt": "t1", "stop": 7}', b'{"prompt": "t1", "stop": ["a","b","c","d","e"]}',
             b'{"prompt": "t1", "stream": "yes"}', b'{"prompt": "t1", "model": "gpt-4"}', b'{"prompt": "t1", "x": 1}',
             b'{"prompt": "t1", "seed": 1.5}', b'{"prompt": "' + b"t1 " * 200 + b'"}',
             b'{"prompt": "t1", "stream_options": {"include_usage": true}}', b"\xff\xfe"]


def test_malformed_requests_get_4xx_naming_the_field_and_the_server_still_answers(server):
    fields = {b'"max_tokens"': "max_tokens", b'"temperature"': "temperature", b'"n"': "n", b'"stop"': "stop",
              b'"model"': "model", b'"x"': "x", b'"seed"': "seed", b'"top_p"': "top_p"}
    for i in range(200):
        body = MALFORMED[i % len(MALFORMED)]
        status, data, _ = _get(server.url, "/v1/completions", "POST", body, {"Content-Type": "application/json"})
        assert 400 <= status < 500, (body, status, data)
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        named = [f for k, f in fields.items() if k in body]
        if status == 400 and len(named) == 1:
            assert err["param"] == named[0], (body, err)
    assert _get(server.url, "/v1/completions", "POST", b'{"prompt": "t1", "model": "gpt-4"}')[0] == 404
    status, data, _ = _get(server.url, "/v1/chat/completions", "POST", b'{"messages": [{"role": "robot"}]}')
    assert status == 400 and json.loads(data)["error"]["param"] == "messages"
    assert _get(server.url, "/health")[:2] == (200, '{"status":"ok"}')
    r = server.client.completions.create(model="tiny", prompt="t1", max_tokens=2, temperature=0)
    assert r.choices[0].text == _solo(server.loaded.model, "t1", 2)


def test_one_failing_request_fails_alone(server, monkeypatch):
    """An exception while sampling one request's third token (top_p=0.5 marks it here) is that request's 500; the
    request decoded in the same batch completes with its own tokens, and the server goes on."""
    from moelab.serve import scheduler

    real = scheduler.sample_next
    draws = []

    def faulty(logits, temperature, top_p, generator):
        if top_p == 0.5:
            draws.append(1)
            if len(draws) == 3:  # its third token: in a decode step of the running batch
                raise RuntimeError("planted fault")
        return real(logits, temperature, top_p, generator)

    monkeypatch.setattr(scheduler, "sample_next", faulty)
    results: dict[str, object] = {}

    def good():
        results["good"] = server.client.completions.create(model="tiny", prompt="t3 t4", max_tokens=20,
                                                           temperature=0).choices[0].text

    t = threading.Thread(target=good)
    t.start()
    with pytest.raises(openai.InternalServerError, match="planted fault"):
        server.client.completions.create(model="tiny", prompt="t5", max_tokens=5, temperature=1.0, top_p=0.5,
                                         timeout=60)
    t.join(60)
    assert results["good"] == _solo(server.loaded.model, "t3 t4", 20) and len(draws) == 3
    assert server.client.completions.create(model="tiny", prompt="t3", max_tokens=2, temperature=0).choices[0].text \
        == _solo(server.loaded.model, "t3", 2)


def test_a_killed_client_frees_its_slot_and_a_full_queue_answers_429(hf_dir):
    """One row, one queue place, each forward slowed: a stream that stops reading mid-way and closes its connection
    is dropped (the next request runs in its row); with the row busy and one request waiting, the next gets 429
    with Retry-After."""
    s = Server(hf_dir, slow=0.02, max_batch=1, max_queue=1)
    try:
        host, port = s.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "t1", "max_tokens": 80, "stream": True}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        waiting = threading.Thread(target=lambda: s.client.completions.create(model="tiny", prompt="t2",
                                                                              max_tokens=3))
        waiting.start()
        while s.served.engine.queue_depth == 0:
            time.sleep(0.01)
        status, data, headers = _get(s.url, "/v1/completions", "POST", b'{"prompt": "t3", "max_tokens": 3}')
        assert status == 429 and headers.get("retry-after") == "1"
        assert json.loads(data)["error"]["code"] == "queue_full"
        first = s.served.engine.rows[0]
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()  # the client is gone after one token of 80
        waiting.join(60)
        assert not waiting.is_alive() and first.cancelled and len(first.generated) < 80
        r = s.client.completions.create(model="tiny", prompt="t3", max_tokens=3, temperature=0)
        assert r.choices[0].text == _solo(s.loaded.model, "t3", 3)
        assert s.served.engine.batch_size == 0 and not s.served.engine.prefilling
    finally:
        s.close()


def test_api_key_and_a_checkpoint_without_chat_template(hf_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    (bare / "tokenizer_config.json").unlink()
    s = Server(bare, api_key="sekret")
    try:
        assert _get(s.url, "/v1/models")[0] == 401
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="t1", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="has no chat template"):
            s.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "t1"}])
        assert s.client.completions.create(model="tiny", prompt="t1", max_tokens=2).usage.completion_tokens == 2
    finally:
        s.close()


SIGTERM_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from moelab.runs.load import load_model
from moelab.serve.app import create_app
from moelab.serve.server import build, run
loaded = load_model(sys.argv[1])
forward = loaded.model.forward
loaded.model.forward = lambda *a, **k: (time.sleep(0.02), forward(*a, **k))[1]
served = build(loaded, model_name="tiny", start=False)  # as `moelab serve`: the engine on this thread, HTTP on another
run(create_app(served), "127.0.0.1", int(sys.argv[2]), "warning", engine=served.engine)
print("exited cleanly", flush=True)
"""


def test_sigterm_drains_the_open_streams_and_exits_0(hf_dir):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(hf_dir), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(600):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        stream = client.completions.create(model="tiny", prompt="t6 t7", max_tokens=40, temperature=0, stream=True)
        parts = [next(iter(stream))]
        proc.terminate()  # SIGTERM, with 39 tokens (0.8 s of slowed forwards) still to come
        parts += list(stream)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "".join(p.choices[0].text for p in parts) == _solo(_model(), "t6 t7", 40)
    assert parts[-1].choices[0].finish_reason == "length"
    assert "exited cleanly" in proc.stdout.read()


def test_run_with_the_engine_on_this_thread_stops_it_when_uvicorn_cannot_start(hf_dir):
    """`run(..., engine=)` runs the engine loop on the calling thread: when uvicorn fails (the port is taken) the
    loop is stopped and uvicorn's exit is raised here, instead of the engine waiting forever."""
    from moelab.serve.server import run

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    served = build(load_model(hf_dir), model_name="tiny", start=False)
    done: list = []

    def serve() -> None:
        try:
            run(create_app(served), "127.0.0.1", taken.getsockname()[1], "critical", engine=served.engine)
        except BaseException as e:  # noqa: BLE001
            done.append(e)

    thread = threading.Thread(target=serve, daemon=True)  # a thread: signal handlers cannot be set there
    try:
        thread.start()
        thread.join(60)
    finally:
        taken.close()
    assert not thread.is_alive(), "run() kept the engine loop going after uvicorn had failed"
    assert len(done) == 1 and isinstance(done[0], SystemExit) and done[0].code  # uvicorn: 3, a failed startup


def test_cli_bad_values_are_one_line_errors(hf_dir, capsys):
    from moelab.cli.main import main

    for args, match in [(["--max-batch", "0"], "max_batch=0 is invalid: allowed an integer >= 1"),
                        (["--max-tokens-in-flight", "1"], "max_tokens_in_flight=1 is invalid"),
                        (["--port", "70000"], "port=70000 is invalid"),
                        (["--prefetch"], "--cache-policy and --prefetch apply with --max-memory-gb"),
                        (["--api-key", ""], "api_key is empty")]:
        assert main(["serve", str(hf_dir), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moelab serve: error: ") and match in err and err.count("\n") == 1


def _wait(req: Request, seconds: float = 60) -> bool:
    end = time.monotonic() + seconds
    while not req.done and time.monotonic() < end:
        time.sleep(0.005)
    return req.done


def test_a_fault_outside_any_request_fails_those_in_flight_and_the_loop_goes_on(monkeypatch):
    """batch_cache.keep raising once (a fault of the engine's step, not of one request's draw) when a short request
    leaves the batch: the request still running then gets an error event, and the next one is served with its solo
    tokens."""
    model = _model()
    real = batch_cache.keep
    calls: list = []

    def broken_once(batch, rows):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("planted engine fault")
        return real(batch, rows)

    monkeypatch.setattr(batch_cache, "keep", broken_once)
    events: list = []
    short, long = Request([1, 2, 3], 2, emit=lambda ev: None), Request([4, 5, 6], 40, emit=events.append)
    engine = Engine(model, _words)
    engine.submit(short)
    engine.submit(long)
    engine.start()
    assert _wait(short) and _wait(long)
    assert events[-1].kind == "error" and "planted engine fault" in events[-1].message
    third = Request([4, 5], 5, emit=lambda ev: None)
    engine.submit(third)
    assert _wait(third) and third.generated == generate(model, [4, 5], 5)
    engine.stop()


@pytest.mark.skipif(not __import__("moelab.inference.native", fromlist=["available"]).available(),
                    reason="moelab's CPU kernels are not built here: the mixed step needs them")
def test_on_the_kernels_new_prompts_are_read_in_the_running_step_and_each_gets_its_solo_tokens(monkeypatch):
    """A prepared int4 model whose blocks all run on the kernels: prompts that fit prefill_chunk join the running
    rows' step as new rows (one `step_tokens` call reads their prompts and the running rows' tokens), longer ones are
    prefilled alone first; every request gets exactly the tokens `generate` gives it alone, greedy and seeded."""
    from moelab.inference.engine import InferenceEngine
    from moelab.inference.prepare import prepare_inference

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, max_seq_len=96,
                      moe=MoEConfig(d_model=128, d_expert=64, n_experts=8, top_k=2))
    model = MoETransformer(cfg)
    for w in model.parameters():
        w.data.normal_(0, 0.3)
    model = prepare_inference(model.to(torch.bfloat16), "int4")
    calls = []
    real = InferenceEngine.step_tokens
    monkeypatch.setattr(InferenceEngine, "step_tokens", lambda self, ids, rows, *a: calls.append(
        (ids.numel(), int(rows.max()) + 1)) or real(self, ids, rows, *a))
    rng = random.Random(1)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 30))] for _ in range(24)]
    lengths = [rng.randint(1, 30) for _ in prompts]
    reqs = [Request(p, n, emit=lambda ev: None) for p, n in zip(prompts, lengths)]
    engine = Engine(model, _words, None, max_batch=8, prefill_chunk=20)
    assert engine._mixed
    _run_engine(engine, reqs, 0.003)
    assert [r.generated for r in reqs] == [generate(model, p, n) for p, n in zip(prompts, lengths)]
    assert any(tokens > rows for tokens, rows in calls)  # prompts read in a step (more tokens than rows)
    assert any(len(p) > 20 for p in prompts)  # and some prefilled alone first
    sampled = [Request(p, 12, emit=lambda ev: None, temperature=1.0, top_p=0.9, seed=i) for i, p in
               enumerate(prompts[:8])]
    _run_engine(Engine(model, _words, None, max_batch=4, prefill_chunk=20), sampled)
    assert [r.generated for r in sampled] == [generate(model, p, 12, temperature=1.0, top_p=0.9, seed=i)
                                              for i, p in enumerate(prompts[:8])]


def test_add_rows_places_each_prompt_to_end_at_the_next_position_and_copies_nothing_without_one():
    """Rows of 3 and 5 positions (L = 5): prompts of 4 and 7 tokens must end at position L, so the 7-token one needs
    the batch shifted right by one; the old rows' keys move with it, the new rows are empty, every pad is where its
    row's first token is. A step with no new prompt keeps the same buffers (no copy of the cache)."""
    rows = []
    for n in (3, 5):
        c = KVCache()
        c.update(0, torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4))
        rows.append(c)
    batch = batch_cache.join(batch_cache.join(None, rows[0]), rows[1])
    grown, pads = batch_cache.add_rows(batch, [4, 7], [(2, 4)], batch.k[0])
    assert grown.length == 6 and pads == [3, 0] and grown.pad.tolist() == [3, 1, 3, 0]
    assert torch.equal(grown.k[0][:2, :, 1:6], batch.k[0][:, :, :5])
    assert not grown.k[0][2:].any() and not grown.k[0][:2, :, :1].any()
    same, none = batch_cache.add_rows(grown, [], [], grown.k[0])
    assert none == [] and same.k[0] is grown.k[0] and same.v[0] is grown.v[0] and same.lengths is grown.lengths
