"""
pipeline.py: a trained run (or the committed demo) loaded for drawing, as sample.py and serve.py draw: the base with
its adapter, the base's tokenizer, and the run's image tokenizer; the dtype to draw in; the seed of each batch of
pictures; what the model's image tokens show, decoded (a picture, or a scene's tiles); the words around a picture
that the model is asked to describe.
"""
from pathlib import Path

import numpy as np
import torch

from cli import BadInput
from hf import load_tokenizer
from mmmoe import MMMoE, bfloat16_support, choose_dtype, scene_tiles
from runs import run_inputs
from upcycle import builtin_base, chat_prompt
from vq import load_vq

DEMO = Path(__file__).parent / "demo"  # the committed demo: adapter.safetensors + state.json, and vq/


def load_pipeline(ckpt=None, device="cpu", dtype=torch.float32):
    """-> (model with adapter, tokenizer, VQ) for a train.py checkpoint directory, or the built-in demo. The model in
    dtype (the adapter too: bfloat16 draws faster where the CPU has it, not code for code as float32 does); the VQ in
    float32."""
    ckpt = ckpt or DEMO
    _, base, vq_dir = run_inputs(ckpt)
    base = base or builtin_base()
    model = MMMoE.from_pretrained(base, dtype=dtype, device=device)
    model.load_adapter(ckpt)
    model.to(dtype)
    vq = load_vq(vq_dir, device)
    adapter = model.adapter
    if (vq.config.vocab_size, vq.config.colour_tokens) != (adapter.n_image_codes, adapter.colour_tokens):
        raise BadInput(f"the VQ has {vq.config.vocab_size} image tokens ({vq.config.colour_tokens} of them colours), "
                       f"but the adapter was trained for {adapter.n_image_codes} ({adapter.colour_tokens})")
    return model.eval(), load_tokenizer(base), vq


DRAWING_DTYPES = ("auto", "float32", "bfloat16")  # --dtype's choices in sample.py and analyze.py


def drawing_dtype(name, device=torch.device("cpu")):
    """--dtype's name -> (the dtype to draw in, a line saying what auto chose or why bfloat16 is slow here, or
    None); bfloat16 is refused where the CPU only emulates it (many times slower)."""
    if name == "bfloat16" and bfloat16_support(device) == "emulated":
        raise BadInput("--dtype bfloat16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so it would draw "
                       "many times slower than float32")
    return choose_dtype(name, device)


def batch_generator(seed, k):
    """The random numbers of batch k of a drawing: its own seed, from (seed, k), so that a picture does not depend on
    which batches were drawn before it (a rerun that skips what is written draws the rest as the first run did)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))


def decode_drawings(model, vq, tokens):
    """generate_image's rows (B, n), or with scene tokens (B, 1 + 4n) -> what each row shows: [picture] for a single
    picture (3, H, W), or a scene's 4 tiles, top-left, top-right, bottom-left, bottom-right, each a picture or None
    (empty)."""
    n, K = vq.config.n_tokens, model.adapter.n_image_codes
    if not model.adapter.scene_tokens:
        return [[p] for p in vq.detokenize(tokens)]
    return decode_tiles(vq, [scene_tiles(row, n, K) or [row[:n]] for row in tokens])


def decode_tiles(vq, drawings):
    """Drawings as tokens, each [a picture's tokens (n,)] or 4 tiles (tokens or None) -> the same with the pictures
    decoded, (3, H, W) each: every picture of the batch at once."""
    parts = [t for tiles in drawings for t in tiles if t is not None]
    decoded = iter(vq.detokenize(torch.stack(parts)) if parts else [])
    return [[None if t is None else next(decoded) for t in tiles] for tiles in drawings]


def around_a_picture(model, tokenizer, question=None):
    """-> the token ids before and after a picture the model describes (MMMoE.describe): <start> and nothing, or with
    a question the base's chat format, the picture then the question as the user's words: how train.py's describe
    examples ask (data.make_describe_batch), and sample.py --ask and the explorer."""
    if not question:
        return [model.start_token], []
    check_question(tokenizer)
    head, tail = chat_prompt("\0").split("\0")  # the chat format around a user's words
    return tokenizer.encode(head).ids, tokenizer.encode(f"\n{question.strip()}{tail}").ids


def asks_questions(tokenizer):
    """Whether a picture can be asked about in the chat format: SmolLM2's (ChatML, as Qwen's is), which a base whose
    tokenizer has no <|im_start|> (Mixtral's, OLMoE's) never learned; those are described plainly."""
    return tokenizer.token_to_id("<|im_start|>") is not None


def check_question(tokenizer):
    """A question about a picture, to a base without the chat format -> one line (BadInput)."""
    if not asks_questions(tokenizer):
        raise BadInput("questions about a picture are asked in SmolLM2's chat format (ChatML), and this base's "
                       "tokenizer has no <|im_start|>: describe without one")


@torch.no_grad()
def describe_pictures(model, tokenizer, vq, pictures, question=None, batch_size=16):
    """Pictures (N, 3, H, W) at the VQ's size -> the words each is described with (MMMoE.describe, greedy), or its
    answer to question: tokenized by the run's VQ, batch_size pictures together."""
    before, after = around_a_picture(model, tokenizer, question)
    codes, words = vq.tokenize(pictures), []  # (N, n)
    for b in range(0, len(codes), batch_size):
        words += [tokenizer.decode(w).strip() for w in model.describe(codes[b:b + batch_size], before, after)]
    return words
