"""
serve.py: a local page that shows the method at work: the picture drawn code by code, the experts that drew it
against the ones the prompt's text went to, and the text untouched by the adapter (C1).

    python serve.py                          # the built-in demo, on http://127.0.0.1:8000
    python serve.py --ckpt out/run --port 8080
    python serve.py --host 0.0.0.0           # reachable from other machines too (it says so when it starts)

No web framework: the standard library's HTTP server and one page, serve.html, in plain JavaScript. The API, JSON
in and out; a mistake is answered 400 with one line, {"error": "..."}:

    GET  /        the page
    POST /draw    {"prompt": "a red bicycle", "n": 1, "guidance": 1.5, "temperature": 0.7, "seed": 0}
                  -> JSON lines as the pictures are drawn: {"row": r, "images": [...]} after each row of codes (PNG,
                  base64; a model that draws scenes: {"tokens": t, "images"} every grid-th token, each a canvas), then
                  {"done": true, "images", "codes", "routing"}: the finished pictures (as sample.py draws them with
                  the same seed), their tokens, and which experts the first one's image tokens and its prompt's text
                  tokens went to in each layer (routing.py, as analyze.py counts them)
    POST /text    {"prompt": "..."} -> the prompt's next-token distribution with the adapter and on the base alone
                  (torch.equal: C1), and the chat answer of each, greedy
    POST /describe {"image": a PNG or JPEG in base64, "question": ""} -> {"words": ...}: what a model trained to
                  describe pictures (train.py's describe) says it shows, or its answer to the question; such a model's
                  /draw also says what each finished drawing shows ("described")

One request works at a time; QUEUE more wait; past that the answer is 503. A connection whose read or write waits
longer than --timeout is closed. A client that leaves before its answer (mid-drawing: it stops its drawing) is one
line in the log, not the server's end; Ctrl-C ends the server.
"""
import argparse
import base64
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

from cli import BadInput, run
from data import load_image
from mmmoe import SAMPLING, scene_tiles
from pictures import on_canvas, to_pil
from pipeline import DEMO, batch_generator, decode_drawings, decode_tiles, describe_pictures, load_pipeline
from routing import routing, routing_stats
from runs import run_inputs
from upcycle import chat_prompt

PAGE = Path(__file__).parent / "serve.html"
MAX_PROMPT, QUEUE, SIZE = 200, 2, 256  # characters, waiting requests, pixels of a picture sent
MAX_BODY = {"draw": 4096, "text": 4096, "describe": 4_000_000}  # bytes: a picture to describe comes as base64
FIELDS = {  # what a request may hold: the type, the range and the default of each field
    "draw": {"prompt": (str, 1, MAX_PROMPT, None), "n": (int, 1, 8, 1),
             "guidance": (float, 0, 10, SAMPLING["guidance"]), "temperature": (float, 0, 2, SAMPLING["temperature"]),
             "seed": (int, 0, 2**31 - 1, 0)},
    "text": {"prompt": (str, 1, MAX_PROMPT, None)},
    "describe": {"image": (str, 1, MAX_BODY["describe"], None), "question": (str, 0, MAX_PROMPT, "")},
}


class Refused(Exception):
    """A request answered with an error: its HTTP status and one line saying why."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def checked(body, fields):
    """A request body (bytes) -> {field: value}, every field of `fields` present (or its default) and in range."""
    try:
        req = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(req, dict):
        raise Refused(400, "the body must be a JSON object")
    unknown = sorted(set(req) - set(fields))
    if unknown:
        raise Refused(400, f"unknown field {unknown[0]!r} (fields: {', '.join(fields)})")
    out = {}
    for name, (kind, lo, hi, default) in fields.items():
        value = req.get(name, default)
        if value is None:
            raise Refused(400, f"{name} is missing")
        if kind is str:
            if not isinstance(value, str) or not lo <= len(value.strip()) <= hi:
                raise Refused(400, f"{name} must be text of {lo} to {hi} characters")
            value = value.strip()
        else:
            ok = isinstance(value, int) if kind is int else isinstance(value, (int, float)) and value == value
            if isinstance(value, bool) or not ok or not lo <= value <= hi:
                what = "a whole number" if kind is int else "a number"
                raise Refused(400, f"{name} must be {what} from {lo} to {hi}")
        out[name] = value
    return out


def png(picture, size=SIZE):
    """(3, H, W) in [-1, 1] -> base64 PNG enlarged to size x size, as sample.py writes a picture."""
    buf = io.BytesIO()
    to_pil(picture).resize((size, size), Image.NEAREST).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class Explorer:
    """The model with its adapter, and the VQ, and what the page asks of them. One request uses them at a time (lock):
    the base of C1 is the same model with its adapter switched off for a moment, which no drawing may see."""

    def __init__(self, ckpt=None):
        self.model, self.tokenizer, self.vq = load_pipeline(ckpt)
        self.reads = bool(run_inputs(ckpt or DEMO)[0]["train_config"].get("describe"))  # trained to describe pictures
        with torch.no_grad():  # a white picture's tokens: what a picture not yet drawn shows
            self.blank = self.vq.tokenize(torch.ones(1, 3, self.vq.config.image_size, self.vq.config.image_size))[0]
        self.lock, self.slots = threading.Lock(), threading.BoundedSemaphore(1 + QUEUE)

    def draw(self, req, send):
        """Draw req's pictures, calling send(dict) after each row of codes (a scene: every grid-th token) and at the
        end. A prompt too long for the model's context is generate_image's BadInput, raised before the first send."""
        n, vq, model = req["n"], self.vq, self.model
        grid, first = vq.config.grid, vq.config.colour_tokens > 0  # the codes follow a colour token, if the VQ has them
        ids, drawn = self.tokenizer.encode(req["prompt"]).ids, []

        def progress(i, tokens):  # new token i of every picture (n,)
            drawn.append(tokens)
            scenes, codes = model.adapter.scene_tokens, i + 1 - first  # codes: a single picture's drawn so far
            if (i + 1 if scenes else codes) % grid == 0 and codes > 0:  # a row of codes, or grid tokens of a scene
                where = {"tokens": i + 1} if scenes else {"row": codes // grid}
                send(where | {"images": [png(p) for p in self.so_far(torch.stack(drawn, 1))]})
        with self.lock:
            tokens = model.generate_image([ids] * n, vq.config.n_tokens, req["guidance"], req["temperature"],
                                          SAMPLING["top_k"], None, batch_generator(req["seed"], 0), progress)
            drawings = decode_drawings(model, vq, tokens)
            pictures = [on_canvas(d, vq.config.image_size) if model.adapter.scene_tokens else d[0] for d in drawings]
            described = [self.read_back(d) for d in drawings] if self.reads else None
            send({"done": True, "images": [png(p) for p in pictures], "codes": tokens.tolist(), "described": described,
                  "routing": self.routing(ids, tokens[0], drawings[0])})

    def routing(self, ids, tokens, drawing):
        """The first drawing's routing, analyze.py's count of the finished sequence, so one forward over it: the
        drawing's own steps never run its last token, and run the rest with folded PLoRA beside the guidance twins,
        where rounding can tip a near tie between two experts. -> the page's routing: shares, specificity, each image
        token's experts in every layer (routes), and where each picture's codes start among them (tile_starts: one
        for a single picture, four for a scene, None for an empty tile)."""
        model, grid, first = self.model, self.vq.config.grid, int(self.vq.config.colour_tokens > 0)
        tokens = tokens[tokens >= 0]  # a scene adapter's rows are padded with -1
        seq = torch.tensor([[model.start_token, *ids, model.image_token("boi"), *model.image_token(tokens)]])
        counts, _, routes = routing(model, [(seq, None)])
        shares, spec, _ = routing_stats(counts)
        starts, i = [], int(len(drawing) == 4)  # a scene's tiles come after <scene>
        for tile in drawing:
            starts.append(None if tile is None else i)
            i += self.vq.config.n_tokens if tile is not None else 1
        return {"text": shares[0].tolist(), "image": shares[1].tolist(), "specificity": spec.tolist(),
                "counts": counts.tolist(), "routes": routes[:, 0, -len(tokens):].tolist(),  # (L, image tokens, k)
                "tile_starts": starts, "first_code": first, "grid": grid}

    def so_far(self, tokens):
        """(n, t): the first t tokens of each drawing -> what they show so far, each (3, h, w) as the finished drawing
        will be: codes not yet drawn white, a scene's tiles not yet begun empty."""
        K, n, size = self.model.adapter.n_image_codes, self.vq.config.n_tokens, self.vq.config.image_size
        done = lambda t: torch.cat([t, self.blank[len(t):]])  # noqa: E731  (a picture's tokens, white where not yet)
        if not self.model.adapter.scene_tokens:
            return [d[0] for d in decode_tiles(self.vq, [[done(row)] for row in tokens])]
        drawings = [[None if t is None else done(t) for t in (scene_tiles(row, n, K) or [row[:n]])] for row in tokens]
        return [on_canvas(d, size) for d in decode_tiles(self.vq, drawings)]

    def describe(self, req):
        """A picture (base64 PNG, JPEG, ...) -> its words (MMMoE.describe, greedy), or the answer to req's question."""
        if not self.reads:
            raise Refused(400, "this model was not trained to describe pictures (train.py's describe setting)")
        try:
            raw = base64.b64decode(req["image"], validate=True)
        except ValueError:
            raise Refused(400, "image must be a picture's file in base64") from None
        picture = load_image(io.BytesIO(raw), self.vq.config.image_size)
        if picture is None:
            raise Refused(400, "image: not a picture this can read (PNG, JPEG, ...)")
        with self.lock:
            return {"words": describe_pictures(self.model, self.tokenizer, self.vq, picture[None], req["question"])[0]}

    @torch.no_grad()
    def read_back(self, drawing):
        """A drawing just made ([picture] or a scene's tiles) -> what the model says it shows, read as a file of it
        would be: each picture's words, a scene's tiles' joined by " | " (its empty tiles left out)."""
        pictures = [t for t in drawing if t is not None]
        if not pictures:
            return ""
        return " | ".join(describe_pictures(self.model, self.tokenizer, self.vq, torch.stack(pictures)))

    @torch.no_grad()
    def text(self, req):
        """C1 made visible: the next-token distribution of the prompt, and a chat answer, with the adapter and on the
        base alone (the same model, its adapter off)."""
        model, V, tok = self.model, self.model.config.vocab_size, self.tokenizer
        idx = torch.tensor([[model.start_token, *tok.encode(req["prompt"]).ids]])
        chat = torch.tensor([tok.encode(chat_prompt(req["prompt"])).ids])

        def answer():  # greedy; generate refuses a prompt too long for the context (BadInput) before any work
            return tok.decode(model.generate(chat, 32, temperature=0, stop_at_eos=True,
                                             allowed_ids=torch.arange(V))[0, chat.shape[1]:].tolist())
        with self.lock:
            answers = [answer()]
            mm = model(idx)[0][0, -1, :V]
            with model.adapter_off():  # C1's reference: the base alone, in the same weights
                answers.append(answer())
                base = model(idx)[0][0, -1]
        top = torch.softmax(mm.float(), -1).topk(10)
        return {"equal": torch.equal(mm, base), "max_difference": (mm - base).abs().max().item(),
                "top": [{"token": tok.decode([int(i)]), "p": float(p)} for p, i in zip(top.values, top.indices)],
                "answer": answers[0], "base_answer": answers[1]}


def handler(explorer, timeout_s):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # a streamed answer ends when the connection closes
        timeout = timeout_s  # the socket's: a read or write that waits longer ends the connection ("Request timed out")
        streaming = False  # whether a drawing's 200 and headers are sent

        def handle_one_request(self):  # a client gone before its answer is one line, not a traceback
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError) as e:
                print(f"{self.address_string()} left before its answer ({type(e).__name__})", file=sys.stderr)

        def log_message(self, fmt, *args):  # one short line a request
            print(f"{self.address_string()} {fmt % args}", file=sys.stderr)

        def reply(self, status, body, kind="application/json"):
            data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self.reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            else:
                self.reply(404, {"error": f"no page {self.path[:80]}"})

        def do_POST(self):
            try:
                if self.path not in ("/draw", "/text", "/describe"):
                    raise Refused(404, f"no endpoint {self.path[:80]} (POST /draw, /text or /describe)")
                length, limit = self.headers.get("Content-Length", ""), MAX_BODY[self.path[1:]]
                if not length.isdigit() or int(length) > limit:
                    raise Refused(400 if not length.isdigit() else 413,
                                  f"a body of at most {limit} bytes, with its Content-Length")
                req = checked(self.rfile.read(int(length)), FIELDS[self.path[1:]])
                if not explorer.slots.acquire(blocking=False):
                    raise Refused(503, f"busy: one request at work and {QUEUE} waiting; try again shortly")
            except Refused as e:
                return self.reply(e.status, {"error": str(e)})
            try:
                if self.path == "/text":
                    return self.reply(200, explorer.text(req))
                if self.path == "/describe":
                    return self.reply(200, explorer.describe(req))
                explorer.draw(req, self.send_line)
            except BadInput as e:  # a prompt too long for the model's context, refused before anything was sent
                self.reply(400, {"error": str(e)})
            except Refused as e:  # a picture to describe that is not one
                self.reply(e.status, {"error": str(e)})
            finally:
                explorer.slots.release()

        def send_line(self, message):  # one line of a drawing; the first comes after the 200 and the headers
            if not self.streaming:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                self.streaming = True
            self.wfile.write((json.dumps(message) + "\n").encode())
            self.wfile.flush()
    return Handler


def make_server(explorer, host="127.0.0.1", port=8000, timeout=30):
    try:
        server = ThreadingHTTPServer((host, port), handler(explorer, timeout))
    except OSError as e:
        raise BadInput(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.daemon_threads = True
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a train.py output directory (default: the built-in demo)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=30, help="seconds a connection may keep a read or write waiting")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535 or (args.threads is not None and args.threads < 1) or not 0 < args.timeout <= 3600:
        raise BadInput("--port must be 0..65535, --threads at least 1 and --timeout above 0, at most 3600 seconds")
    if args.threads:
        torch.set_num_threads(args.threads)
    explorer = Explorer(args.ckpt)
    server = make_server(explorer, args.host, args.port, args.timeout)
    host, port = server.server_address[:2]
    if args.host != "127.0.0.1":
        print(f"warning: listening on {host}, so other machines can reach this page and draw with this CPU",
              file=sys.stderr)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"serving on http://{shown}:{port}/ (Ctrl-C ends it)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


if __name__ == "__main__":
    run(main)
