"""serve.py: the local page's HTTP API on a tiny trained model, and the page itself in headless Chromium."""
import base64
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import sample
import serve
import train
from routing import routing


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve.py's server for a tiny model trained two steps, on a free port of 127.0.0.1, in a thread."""
    from conftest import make_tiny_setup, tiny_hf_config, tiny_hf_state_dict, write_checkpoint
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_hf_config(dim=64, layers=2, experts=4, top_k=2)
    setup = make_tiny_setup(tmp, write_checkpoint(tmp / "ckpt", cfg, tiny_hf_state_dict(cfg), 1))
    tc = train.TrainConfig(base=str(setup["base"]), shards=str(setup["shards"]), out_dir=str(tmp / "run"), rank=4,
                           batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=2, init="mean")
    train.train(tc)
    explorer = serve.Explorer(tmp / "run")
    httpd = serve.make_server(explorer, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "run": tmp / "run", "explorer": explorer, "tmp": tmp}
    httpd.shutdown()
    httpd.server_close()


def call(url, path, body=None, raw=None):
    """-> (status, [the JSON lines of the answer])"""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, [json.loads(line) for line in r.read().decode().splitlines() if line.strip()]
    except urllib.error.HTTPError as e:
        return e.code, [json.loads(line) for line in e.read().decode().splitlines()]


def test_a_drawing_streams_row_by_row_and_equals_sample_py(server, tmp_path):
    status, lines = call(server["url"], "/draw", {"prompt": "w10 w20", "n": 2, "seed": 3})
    assert status == 200 and [m.get("row") for m in lines[:-1]] == list(range(1, 9)) and lines[-1]["done"]
    assert all(len(m["images"]) == 2 for m in lines) and lines[-2]["images"] != lines[0]["images"]
    (tmp_path / "p.txt").write_text("w10 w20\n")
    sample.main(["--from-file", str(tmp_path / "p.txt"), "--out-dir", str(tmp_path / "o"), "-n", "2", "--seed", "3",
                 "--ckpt", str(server["run"]), "--size", str(serve.SIZE)])
    for k, b64 in enumerate(lines[-1]["images"]):
        assert base64.b64decode(b64) == (tmp_path / "o" / f"w10-w20_{k}.png").read_bytes()


def test_the_routing_shown_is_analyze_py_s_for_the_same_tokens(server):
    _, lines = call(server["url"], "/draw", {"prompt": "w11 w21", "seed": 1, "temperature": 0})
    done, model = lines[-1], server["explorer"].model
    ids = server["explorer"].tokenizer.encode("w11 w21").ids
    seq = torch.tensor([[model.start_token, *ids, model.image_token("boi"), *model.image_token(torch.tensor(done["codes"][0])).tolist()]])
    counts, _, routes = routing(model, [(seq, None)])
    assert done["routing"]["counts"] == counts.tolist() and done["routing"]["routes"] == routes[:, 0, -64:].tolist()
    assert sum(map(sum, done["routing"]["counts"][1])) == (1 + 64) * model.config.n_layers * model.config.top_k  # <boi> and the codes


def test_text_is_the_base_s_and_the_answers_agree(server):
    status, [r] = call(server["url"], "/text", {"prompt": "w10 w11 w12"})
    assert status == 200 and r["equal"] and r["max_difference"] == 0 and r["answer"] == r["base_answer"]
    assert len(r["top"]) == 10 and abs(sum(t["p"] for t in r["top"])) <= 1


@pytest.mark.parametrize("body,words", [
    (b"{not json", "not JSON"), (b"[1]", "JSON object"), (b'{"prompt": "w1", "size": 9}', "unknown field 'size'"),
    (b"{}", "prompt is missing"), (b'{"prompt": "   "}', "prompt must be text"), (json.dumps({"prompt": "w" * 201}).encode(), "prompt must be text"),
    (b'{"prompt": "w1", "n": 0}', "n must be a whole number from 1 to 8"), (b'{"prompt": "w1", "n": 9}', "n must be"),
    (b'{"prompt": "w1", "n": "2"}', "n must be"), (b'{"prompt": "w1", "n": true}', "n must be"), (b'{"prompt": "w1", "n": 1.5}', "n must be"),
    (b'{"prompt": "w1", "guidance": -1}', "guidance must be a number from 0 to 10"), (b'{"prompt": "w1", "temperature": 3}', "temperature must be"),
    (b'{"prompt": "w1", "seed": -1}', "seed must be"), (b'{"prompt": "w1", "guidance": NaN}', "guidance must be")])
def test_bad_requests_are_400_with_one_line(server, body, words):
    status, lines = call(server["url"], "/draw", raw=body)
    assert status == 400 and len(lines) == 1 and words in lines[0]["error"], lines


def test_sizes_paths_and_the_page(server):
    assert call(server["url"], "/draw", raw=b" " * (serve.MAX_BODY + 1))[0] == 413
    assert call(server["url"], "/nowhere", {"prompt": "w1"})[0] == 404
    with urllib.request.urlopen(server["url"] + "/", timeout=10) as r:
        assert r.status == 200 and b'id="prompt"' in r.read()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(server["url"] + "/../serve.py", timeout=10)


def test_twenty_at_once_are_all_answered_and_it_draws_after(server):
    statuses = []

    def one():
        statuses.append(call(server["url"], "/draw", {"prompt": "w12 w22", "n": 8})[0])  # ~1 s each: they overlap
    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(statuses) == 20 and set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses
    assert call(server["url"], "/draw", {"prompt": "w12 w22"})[0] == 200


def test_a_client_that_leaves_mid_drawing_does_not_stop_the_server(server):
    host, port = server["url"].removeprefix("http://").split(":")
    body = json.dumps({"prompt": "w13 w23", "n": 8}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /draw HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(64).startswith(b"HTTP/1.0 200")
    time.sleep(0.5)
    assert call(server["url"], "/draw", {"prompt": "w13 w23"})[0] == 200


def test_a_host_other_than_this_machine_is_said_and_a_busy_port_is_one_line(server, capsys):
    port = int(server["url"].rsplit(":", 1)[1])
    with pytest.raises(serve.BadInput, match=f"cannot listen on 127.0.0.1:{port}"):
        serve.make_server(server["explorer"], "127.0.0.1", port)


CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def webdriver(port):
    """A headless Chromium under chromedriver, driven by the W3C WebDriver protocol over plain HTTP (no client
    library): -> (command(method, path, body) -> value, the driver's process)."""
    proc = subprocess.Popen([DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def command(method, path, body=None):
        req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["value"]
    for _ in range(100):  # the driver takes a moment to listen
        try:
            command("GET", "/status")
            break
        except OSError:
            time.sleep(0.1)
    options = {"binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,1200"]}
    sid = command("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})["sessionId"]
    return (lambda method, path, body=None: command(method, f"/session/{sid}{path}", body)), proc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_in_headless_chromium(server):
    if not (CHROMIUM and DRIVER):
        pytest.skip("no Chromium here (Debian: apt-get install -y chromium chromium-driver)")
    browser, proc = webdriver(free_port())
    try:
        browser("POST", "/url", {"url": server["url"] + "/"})
        prompt = next(iter(browser("POST", "/element", {"using": "css selector", "value": "#prompt"}).values()))
        browser("POST", f"/element/{prompt}/clear", {})
        browser("POST", f"/element/{prompt}/value", {"text": "w10 w20\ue007"})  # typed, then Enter
        done = "const i = document.querySelector('#pictures img'); return !!i && i.complete && i.naturalWidth > 0 && " \
               "document.getElementById('heatmap').dataset.drawn === '1' && document.getElementById('c1').textContent.includes('identical')"
        for _ in range(600):
            if browser("POST", "/execute/sync", {"script": done, "args": []}):
                break
            time.sleep(0.1)
        assert browser("POST", "/execute/sync", {"script": done, "args": []})
        assert browser("POST", "/execute/sync", {"script": "return document.getElementById('status').textContent", "args": []}) == "done"
    finally:
        browser("DELETE", "")
        proc.terminate()
