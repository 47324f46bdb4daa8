"""serve.py: the local page's HTTP API on a tiny trained model, and the page itself in headless Chromium."""
import base64
import json
import select
import shutil
import socket
import struct
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
from conftest import make_tiny_setup, tiny_hf_config, tiny_hf_state_dict, write_checkpoint
from mmmoe import MMMoE
from routing import routing


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve.py's server for a tiny model trained two steps, on a free port of 127.0.0.1, in a thread."""
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
                 "--ckpt", str(server["run"]), "--size", str(serve.SIZE), "--dtype", "float32"])  # the explorer's
    for k, b64 in enumerate(lines[-1]["images"]):
        assert base64.b64decode(b64) == (tmp_path / "o" / f"w10-w20_{k}.png").read_bytes()


def test_the_routing_shown_is_analyze_py_s_for_the_same_tokens(server):
    _, lines = call(server["url"], "/draw", {"prompt": "w11 w21", "seed": 1, "temperature": 0})
    done, model = lines[-1], server["explorer"].model
    ids = server["explorer"].tokenizer.encode("w11 w21").ids
    codes = model.image_token(torch.tensor(done["codes"][0])).tolist()
    seq = torch.tensor([[model.start_token, *ids, model.image_token("boi"), *codes]])
    counts, _, routes = routing(model, [(seq, None)])
    assert done["routing"]["counts"] == counts.tolist() and done["routing"]["routes"] == routes[:, 0, -64:].tolist()
    image_slots = (1 + 64) * model.config.n_layers * model.config.top_k  # <boi> and the codes
    assert sum(map(sum, done["routing"]["counts"][1])) == image_slots


def test_text_is_the_base_s_and_the_answers_agree_with_one_model_in_memory(server):
    status, [r] = call(server["url"], "/text", {"prompt": "w10 w11 w12"})
    assert status == 200 and r["equal"] and r["max_difference"] == 0 and r["answer"] == r["base_answer"]
    assert len(r["top"]) == 10 and abs(sum(t["p"] for t in r["top"])) <= 1
    explorer = server["explorer"]  # C1's base is the model itself, its adapter off for a moment: no second copy
    assert [v for v in vars(explorer).values() if isinstance(v, MMMoE)] == [explorer.model]
    assert explorer.model.adapter is not None and explorer.model.image_head is not None  # the adapter is back


def test_a_prompt_too_long_for_the_context_is_one_line_before_anything_is_drawn(server, monkeypatch):
    monkeypatch.setattr(server["explorer"].model.config, "max_seq_len", 80)  # 40 words + 64 codes do not fit
    for path in ("/draw", "/text"):
        status, lines = call(server["url"], path, {"prompt": "w10 " * 40})
        assert status == 400 and len(lines) == 1 and "context of 80" in lines[0]["error"], lines


@pytest.mark.parametrize("body,words", [
    (b"{not json", "not JSON"), (b"[1]", "JSON object"), (b'{"prompt": "w1", "size": 9}', "unknown field 'size'"),
    (b"{}", "prompt is missing"), (b'{"prompt": "   "}', "prompt must be text"),
    (json.dumps({"prompt": "w" * 201}).encode(), "prompt must be text"),
    (b'{"prompt": "w1", "n": 0}', "n must be a whole number from 1 to 8"), (b'{"prompt": "w1", "n": 9}', "n must be"),
    (b'{"prompt": "w1", "n": "2"}', "n must be"), (b'{"prompt": "w1", "n": true}', "n must be"),
    (b'{"prompt": "w1", "n": 1.5}', "n must be"), (b'{"prompt": "w1", "temperature": 3}', "temperature must be"),
    (b'{"prompt": "w1", "guidance": -1}', "guidance must be a number from 0 to 10"),
    (b'{"prompt": "w1", "seed": -1}', "seed must be"), (b'{"prompt": "w1", "guidance": NaN}', "guidance must be")])
def test_bad_requests_are_400_with_one_line(server, body, words):
    status, lines = call(server["url"], "/draw", raw=body)
    assert status == 400 and len(lines) == 1 and words in lines[0]["error"], lines


def test_sizes_paths_and_the_page(server):
    assert call(server["url"], "/draw", raw=b" " * (serve.MAX_BODY["draw"] + 1))[0] == 413
    status, [answer] = call(server["url"], "/describe", {"image": "AAAA"})  # this run draws only
    assert status == 400 and "not trained to describe" in answer["error"]
    assert call(server["url"], "/nowhere", {"prompt": "w1"})[0] == 404
    with urllib.request.urlopen(server["url"] + "/", timeout=10) as r:
        assert r.status == 200 and b'id="prompt"' in r.read()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(server["url"] + "/../serve.py", timeout=10)


def test_twenty_at_once_are_all_answered_and_it_draws_after(server):
    answers = []  # (path, status, lines): drawings (~1 s each: they overlap) and C1's base, its adapter off a moment

    def one(path, body):
        answers.append((path, *call(server["url"], path, body)))
    draw, text = ("/draw", {"prompt": "w12 w22", "n": 8}), ("/text", {"prompt": "w12 w22"})
    threads = [threading.Thread(target=one, args=text if k % 2 else draw) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(answers) == 20 and {s for _, s, _ in answers} == {200, 503}
    assert all(lines[-1]["done"] if p == "/draw" else lines[0]["equal"] for p, s, lines in answers if s == 200)
    assert call(server["url"], "/draw", {"prompt": "w12 w22"})[0] == 200


def server_log(capsys, words, seconds=120):
    """What the server wrote to stderr until a line holds `words` (it works in its own threads)."""
    err = ""
    for _ in range(seconds * 10):
        err += capsys.readouterr().err
        if words in err:
            break
        time.sleep(0.1)
    return err


def test_a_client_that_leaves_mid_drawing_does_not_stop_the_server(server, capsys):
    host, port = server["url"].removeprefix("http://").split(":")
    body = json.dumps({"prompt": "w13 w23", "n": 8}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /draw HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert s.recv(64).startswith(b"HTTP/1.0 200")
    err = server_log(capsys, "left before its answer")
    assert err.count("left before its answer") == 1 and "Traceback" not in err, err
    assert call(server["url"], "/draw", {"prompt": "w13 w23"})[0] == 200


def test_a_client_that_hangs_up_before_its_400_is_one_line_in_the_log(server, capsys):
    host, port = server["url"].removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # its close resets the connection
    s.sendall(b"POST /draw HTTP/1.0\r\nContent-Length: 9\r\n\r\n{not")  # JSON that cannot be: a 400 when it is all read
    s.close()
    err = server_log(capsys, "left before its answer")
    assert err.count("\n") == 1 and "left before its answer" in err and "Traceback" not in err, err


def test_a_half_sent_request_is_closed_after_the_timeout_and_others_are_answered_meanwhile(server, capsys):
    httpd = serve.make_server(server["explorer"], "127.0.0.1", 0, timeout=5)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_address[1])) as s:
            s.sendall(b'POST /text HTTP/1.0\r\nContent-Length: 40\r\n\r\n{"prompt": ')  # 11 bytes of 40
            sent = time.monotonic()
            with urllib.request.urlopen(url + "/", timeout=10) as r:
                assert r.status == 200
            assert select.select([s], [], [], 0)[0] == []  # answered while the half-sent one is still open
            s.settimeout(120)
            assert s.recv(64) == b""  # closed, unanswered
            assert 4 < time.monotonic() - sent < 120
        assert "Request timed out" in server_log(capsys, "Request timed out")
    finally:
        httpd.shutdown()
        httpd.server_close()


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
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data, {"Content-Type": "application/json"}, method=method)
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["value"]
    for _ in range(100):  # the driver takes a moment to listen
        try:
            command("GET", "/status")
            break
        except OSError:
            time.sleep(0.1)
    options = {"binary": CHROMIUM,
               "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,1200"]}
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
               "document.getElementById('heatmap').dataset.drawn === '1' && " \
               "document.getElementById('c1').textContent.includes('identical')"
        for _ in range(600):
            if browser("POST", "/execute/sync", {"script": done, "args": []}):
                break
            time.sleep(0.1)
        assert browser("POST", "/execute/sync", {"script": done, "args": []})
        status = "return document.getElementById('status').textContent"
        assert browser("POST", "/execute/sync", {"script": status, "args": []}) == "done"
    finally:
        browser("DELETE", "")
        proc.terminate()
