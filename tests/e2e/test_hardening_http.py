"""Bad requests over HTTP against a hivis server: each gets a 4xx (or stock vLLM's status where
that is right) with a message that says what was wrong, while concurrent good requests keep
getting exactly the target's answers, and the server stays up with no request left behind.

Includes the two vLLM bugs the plugin fixes (patches/upstream.py): a request rejected after its
image was processed no longer makes the next valid request with that image fail with HTTP 500,
and a file:// URL is a client error (400), not an internal one.
"""

import base64
import concurrent.futures
import http.client
import io
import json
import socket
import time
import urllib.request

import pytest

from hivis_testbed import assets
from hivis_testbed.demo import image_data_url
from hivis_testbed.server import VLLMServer
from hivis_testbed.tinyworld.dataset import sample

from .helpers import hivis_spec, image_size, transformers_greedy

pytestmark = pytest.mark.e2e
TOKENS = 64


def post(url, body, raw=None, timeout=120):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def messages(*urls, text="Describe the image in detail."):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def scenes():
    """Three scenes for the load, and a fourth that no request sends before the rejection test."""
    return [sample("test", 700 + i, image_size(), kind="describe") for i in range(4)]


@pytest.fixture(scope="module")
def reference(scenes):
    return transformers_greedy([s.qa.question for s in scenes], [s.image for s in scenes], max_new_tokens=TOKENS)


@pytest.fixture(scope="module")
def server():
    with VLLMServer(assets.tiny_target(), ["--speculative-config", json.dumps(hivis_spec(k=3))]) as srv:
        srv.model = json.loads(urllib.request.urlopen(srv.url + "/v1/models").read())["data"][0]["id"]
        yield srv


def good_answer(srv, scene):
    msgs = messages(image_data_url(scene.image), text=scene.qa.question)
    status, out = post(srv.url, {"model": srv.model, "messages": msgs, "temperature": 0.0, "max_tokens": TOKENS})
    assert status == 200, out
    return out["choices"][0]["message"]["content"].strip()


def bad_cases(scenes):
    good = image_data_url(scenes[0].image)
    full = png_bytes(scenes[0].image)
    b64 = lambda data: "data:image/png;base64," + base64.b64encode(data).decode()  # noqa: E731
    return [  # (name, body, expected status, words the message must contain)
        ("corrupt base64 image", {"messages": messages("data:image/png;base64,AAAA")}, 400, "Failed to load image"),
        ("truncated image", {"messages": messages(b64(full[: len(full) // 2]))}, 400, "truncated"),
        ("non-image bytes", {"messages": messages(b64(b"hello, not an image"))}, 400, "cannot identify image"),
        ("empty data URL", {"messages": messages("data:image/png;base64,")}, 400, "Failed to load image"),
        ("too many images", {"messages": messages(good, good, good)}, 400, "At most 2 image"),
        ("local file URL", {"messages": messages("file:///etc/hostname")}, 400, "allowed-local-media-path"),
        ("prompt longer than max_model_len", {"messages": messages(good, text="Describe the image. " * 300)}, 400,
         "maximum context length is 512"),
        ("top_p out of range", {"messages": messages(good), "top_p": 2.0}, 400, "top_p must be in (0, 1]"),
        ("negative temperature", {"messages": messages(good), "temperature": -1.0}, 400, "temperature must be"),
        ("max_tokens 0", {"messages": messages(good), "max_tokens": 0}, 400, "max_tokens must be at least 1"),
        ("n 0", {"messages": messages(good), "n": 0}, 400, "n must be at least 1"),
        ("unknown model", {"messages": messages(good), "model": "no-such-model"}, 404, "does not exist"),
        ("no messages", {}, 400, "messages"),
        ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unsupported role"),
        ("malformed JSON", b"{not json", 400, "JSON decode error"),
    ]


def test_bad_requests_get_clear_errors_while_good_ones_stay_exact(server, scenes, reference):
    cases = bad_cases(scenes)
    assert len(cases) >= 12
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(good_answer, server, s) for s in scenes[:3] for _ in range(2)]
        for name, body, want, words in cases:
            if isinstance(body, bytes):
                status, out = post(server.url, None, raw=body)
            else:
                status, out = post(server.url, {"model": server.model, "max_tokens": 8, **body})
            assert status == want, (name, status, out)
            assert words in out["error"]["message"], (name, out)
        assert [f.result() for f in good] == [r for r in reference[:3] for _ in range(2)]
    assert_healthy(server)


def test_a_rejected_request_does_not_break_the_next_one_with_its_image(server, scenes, reference):
    """vLLM bug (fixed in patches/upstream.py): rendering marked the image as sent to the engine,
    the request was then rejected (top_p), and the next valid request with the same image got 500.
    The image must be new to the server (once the engine holds it, nothing is stale)."""
    s = scenes[3]
    body = {"model": server.model, "messages": messages(image_data_url(s.image), text=s.qa.question),
            "temperature": 0.0, "max_tokens": TOKENS}
    status, _ = post(server.url, {**body, "top_p": 2.0})
    assert status == 400
    status, out = post(server.url, body)
    assert status == 200, out
    assert out["choices"][0]["message"]["content"].strip() == reference[3]
    status, _ = post(server.url, {**body, "messages": messages(image_data_url(s.image), text="x " * 2000)})
    assert status == 400  # rejected later (prompt too long): same healing
    assert good_answer(server, s) == reference[3]


def test_disconnects_and_cancellations_leave_nothing_behind(server, scenes, reference):
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": server.model, "messages": messages(image_data_url(scenes[2].image),
                                                                   text=scenes[2].qa.question),
                       "temperature": 0.0, "max_tokens": 400, "ignore_eos": True, "stream": True}).encode()
    for _ in range(3):  # client disconnect mid-stream
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read(200)  # a few chunks, then hang up
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    for _ in range(3):  # cancelled non-streaming request: the client gives up before the answer
        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
            post(server.url, {**json.loads(body), "stream": False}, timeout=0.3)
    assert good_answer(server, scenes[2]) == reference[2]
    assert_healthy(server)


def assert_healthy(server, timeout=30):
    """/health is 200 and every request has left the engine (none running or waiting)."""
    with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
        assert r.status == 200
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        load = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")))
        if load == 0:
            return
        assert time.monotonic() < deadline, f"requests left in the engine: {load}"
        time.sleep(0.5)
