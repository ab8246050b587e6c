#!/usr/bin/env python3
"""Build random-weight ONNX models in the layouts sherpa-onnx loads as NeMo models.

The models are for tests and cost measurement only: the weights are random
(fixed seed), so the text they produce is meaningless.  What is faithful is the
*interface*: file names, ONNX input/output names, ranks, dtypes, dynamic axes,
cache tensors and the metadata keys that sherpa-onnx (checked against the
PyPI package sherpa-onnx 2.0.1) reads for NVIDIA NeMo models.

Kinds (``--kind``):

offline-transducer
    encoder.onnx, decoder.onnx, joiner.onnx, tokens.txt, bpe.vocab.
    Parakeet-style NeMo transducer for
    ``OfflineRecognizer.from_transducer(..., model_type="nemo_transducer")``.
    ``--variant tdt`` (default) adds 5 duration logits (0..4) to the joiner
    output and puts "tdt" in the ``url`` metadata, which is how sherpa-onnx
    tells TDT from plain RNNT; ``--variant rnnt`` builds a plain RNNT joiner.
offline-ctc
    model.onnx, tokens.txt.  For ``OfflineRecognizer.from_nemo_ctc``.
online-transducer
    encoder.onnx (cache-aware: cache_last_channel / cache_last_time /
    cache_last_channel_len in and *_next out), decoder.onnx, joiner.onnx,
    tokens.txt, bpe.vocab.  For ``OnlineRecognizer.from_transducer`` (sherpa
    picks its NeMo implementation because decoder.onnx has more than one output).
online-ctc
    model.onnx (cache-aware), tokens.txt.  For ``OnlineRecognizer.from_nemo_ctc``.

Sizes (``--size``):

tiny (default)
    d_model 32, 2 layers, 2 heads, ff 64, 43 tokens + <blk>.  Each file is
    well under 1 MB.
fastconformer-114m
    The dimensions of NVIDIA's 114M cache-aware streaming FastConformer
    (stt_en_fastconformer_hybrid_large_streaming_*): d_model 512, 17 layers,
    8 heads, ff 2048, conv kernel 9, dw-striding subsampling x8 with 256
    channels, 1024 BPE-like tokens + <blk>, 1-layer LSTM prediction net of 640,
    joint hidden 640; about 114M parameters (~450 MB of fp32 weights, roughly
    the size of the real fp32 export).  The layers are simplified (the
    attention uses one positional term computed from sinusoids instead of
    NeMo's relative-shift over 2T-1 positions, batch-norm is folded away, no
    dropout/xscale), but every matrix multiply of the real layer is there with
    the real shape, so the compute per second of audio is in the same range as
    the real model's (it is an estimate, not the real network; do not quote it
    as the real model's speed).  For the offline kinds this gives a 114M
    offline FastConformer (smaller than parakeet-tdt-0.6b, which has d_model
    1024 and 24 layers).

Not like the real networks (needed so random weights give token-like output
instead of all-blank or max_symbols_per_frame tokens on every frame): a blank
bias and zero-mean output columns, down-scaled attention/conv branches, a
prediction-net LSTM with fixed gates acting as a decaying memory of emitted
tokens plus a matching "repeat penalty" matmul in the joiner, and (online
kinds) a per-window feature normalisation at the encoder input.  These add
well under 1% to the compute.  Offline encoders zero padded frames after every
subsampling stage and mask attention/conv, so a batch decodes exactly like
one stream at a time.

Streaming chunking (``--chunk-ms``, online kinds): 80, 480 (default) or 1040,
giving window_size/chunk_shift of 17/8, 57/48 or 121/112 feature frames (10 ms
each) like the real 80/480/1040 ms exports; last_channel_cache_size is 70 and
the causal depthwise conv kernel is 9 (cache_last_time dim3 = 8).

Usage::

    python make_tiny_nemo.py --kind offline-transducer --out /tmp/nemo-tdt
    python make_tiny_nemo.py --kind online-transducer --out /tmp/nemo-stream \
        --size fastconformer-114m

Needs only ``numpy`` and ``onnx``.
"""

from __future__ import annotations

import argparse
import math
import os
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
INT64_MAX = np.iinfo(np.int64).max


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


@dataclass
class Config:
    d_model: int
    n_layers: int
    n_heads: int
    ff_dim: int
    conv_kernel: int
    sub_channels: int
    n_pieces: int  # tokens without <blk>; NeMo's "vocab_size"
    pred_hidden: int
    pred_rnn_layers: int
    joint_hidden: int


SIZES = {
    "tiny": Config(
        d_model=32,
        n_layers=2,
        n_heads=2,
        ff_dim=64,
        conv_kernel=9,
        sub_channels=8,
        n_pieces=43,
        pred_hidden=32,
        pred_rnn_layers=1,
        joint_hidden=32,
    ),
    "fastconformer-114m": Config(
        d_model=512,
        n_layers=17,
        n_heads=8,
        ff_dim=2048,
        conv_kernel=9,
        sub_channels=256,
        n_pieces=1024,
        pred_hidden=640,
        pred_rnn_layers=1,
        joint_hidden=640,
    ),
}

# chunk option -> (window_size, chunk_shift) in 10 ms feature frames
CHUNKS = {80: (17, 8), 480: (57, 48), 1040: (121, 112)}
SUBSAMPLING = 8
LAST_CHANNEL_CACHE = 70
TDT_DURATIONS = [0, 1, 2, 3, 4]
# Output layers: token logits get std ~LOGIT_GAIN and the blank logit sits
# EMIT_MARGIN std above the expected best token; with the values below a
# random model emits a token on very roughly a quarter of the frames.
LOGIT_GAIN = 2.0
EMIT_MARGIN = 0.0
# Attention and conv branches are scaled down: with random weights attention
# is near-uniform and would wash out the differences between frames.
BRANCH_GAIN = 0.3
EMBED_NORM = 3.0
REPEAT_PENALTY = 2.0


# --------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------


def make_pieces(n: int) -> list[str]:
    """Return n unique sentencepiece-like pieces; index 0 is <unk>."""
    pieces = ["<unk>", "\u2581"]
    pieces += ["\u2581t", "\u2581a", "\u2581s", "\u2581w", "\u2581i", "\u2581o"]
    pieces += ["th", "he", "in", "er", "an", "re", "'"]
    pieces += list(string.ascii_lowercase)
    seen = set(pieces)
    letters = string.ascii_lowercase
    extra = []
    for a in letters:
        for b in letters:
            extra.append("\u2581" + a + b)
            extra.append(a + b)
    for p in extra:
        if len(pieces) >= n:
            break
        if p not in seen:
            pieces.append(p)
            seen.add(p)
    if len(pieces) < n:
        raise ValueError(f"cannot make {n} pieces")
    return pieces[:n]


def write_tokens(out: Path, pieces: list[str]) -> None:
    with open(out / "tokens.txt", "w", encoding="utf-8") as f:
        for i, p in enumerate(pieces):
            f.write(f"{p} {i}\n")
        f.write(f"<blk> {len(pieces)}\n")


def write_bpe_vocab(out: Path, pieces: list[str]) -> None:
    # sentencepiece "piece<TAB>score" listing, used by sherpa-onnx to encode
    # hotwords when modeling_unit="bpe".  Longer pieces get higher scores so
    # that they are merged first.
    with open(out / "bpe.vocab", "w", encoding="utf-8") as f:
        for i, p in enumerate(pieces):
            score = 0.0 if i == 0 else -float(i) / (1 + len(p.replace("\u2581", "")))
            f.write(f"{p}\t{score:.4f}\n")


# --------------------------------------------------------------------------
# tiny graph-building helper
# --------------------------------------------------------------------------


class Graph:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def add_init(self, arr: np.ndarray, prefix: str) -> str:
        n = self.name(prefix)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def weight(self, shape, fan_in: int, prefix: str = "w") -> str:
        a = self.rng.standard_normal(shape, dtype=np.float32) / math.sqrt(fan_in)
        return self.add_init(a.astype(np.float32), prefix)

    def const_f(self, value, prefix: str = "c") -> str:
        return self.add_init(np.asarray(value, dtype=np.float32), prefix)

    def const_i(self, value, prefix: str = "i") -> str:
        return self.add_init(np.asarray(value, dtype=np.int64), prefix)

    def op(self, op_type: str, inputs, n_out: int = 1, outputs=None, **attrs):
        if outputs is None:
            outputs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    # ---- layers ----------------------------------------------------------

    def linear(self, x: str, din: int, dout: int, bias: bool = True, bias_init=None) -> str:
        y = self.op("MatMul", [x, self.weight((din, dout), din, "lin_w")])
        if bias:
            b = np.zeros(dout, np.float32) if bias_init is None else bias_init.astype(np.float32)
            y = self.op("Add", [y, self.add_init(b, "lin_b")])
        return y

    def layer_norm(self, x: str, d: int) -> str:
        scale = self.add_init(np.ones(d, np.float32), "ln_g")
        bias = self.add_init(np.zeros(d, np.float32), "ln_b")
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)

    def swish(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def dim(self, x: str, axis: int) -> str:
        """Scalar int64 holding x.shape[axis]."""
        shape = self.op("Shape", [x])
        return self.op("Gather", [shape, self.const_i(axis)], axis=0)


# --------------------------------------------------------------------------
# encoder pieces
# --------------------------------------------------------------------------


def time_mask(g: Graph, x: str, length: str) -> str:
    """Zero the frames of x (B, C, T, F) at or after length (B,)."""
    pos = g.op("Range", [g.const_i(0), g.dim(x, 2), g.const_i(1)])
    keep = g.op("Less", [pos, g.op("Unsqueeze", [length, g.const_i([1])])])  # (B, T)
    keep = g.op("Cast", [keep], to=TensorProto.FLOAT)
    return g.op("Mul", [x, g.op("Unsqueeze", [keep, g.const_i([1, 3])])])


def half(g: Graph, length: str) -> str:
    """ceil(length / 2) for int64 lengths >= 1."""
    one = g.const_i(1)
    return g.op("Add", [g.op("Div", [g.op("Sub", [length, one]), g.const_i(2)]), one])


def subsampling(g: Graph, audio: str, feat_dim: int, cfg: Config, causal: bool,
                length: str | None = None) -> str:
    """NeMo-style "dw_striding" x8: (B, F, T) -> (B, ceil(T/8), d_model).

    With length given, frames past each stream's length are zeroed after every
    stage so that padding in a batch cannot leak into the last real frames."""
    c = cfg.sub_channels
    pads = [2, 1, 0, 1] if causal else [1, 1, 1, 1]  # [t_begin, f_begin, t_end, f_end]
    x = g.op("Transpose", [audio], perm=[0, 2, 1])  # (B, T, F)
    x = g.op("Unsqueeze", [x, g.const_i([1])])  # (B, 1, T, F)
    x = g.op(
        "Conv",
        [x, g.weight((c, 1, 3, 3), 9, "sub_w"), g.const_f(np.zeros(c))],
        kernel_shape=[3, 3], strides=[2, 2], pads=pads,
    )
    x = g.op("Relu", [x])
    if length is not None:
        length = half(g, length)
        x = time_mask(g, x, length)
    for _ in range(2):
        x = g.op(
            "Conv",
            [x, g.weight((c, 1, 3, 3), 9, "sub_dw"), g.const_f(np.zeros(c))],
            kernel_shape=[3, 3], strides=[2, 2], pads=pads, group=c,
        )
        x = g.op(
            "Conv",
            [x, g.weight((c, c, 1, 1), c, "sub_pw"), g.const_f(np.zeros(c))],
            kernel_shape=[1, 1],
        )
        x = g.op("Relu", [x])
        if length is not None:
            length = half(g, length)
            x = time_mask(g, x, length)
    f8 = feat_dim
    for _ in range(3):
        f8 = (f8 + 1) // 2
    x = g.op("Transpose", [x], perm=[0, 2, 1, 3])  # (B, T8, C, F8)
    x = g.op("Reshape", [x, g.const_i([0, 0, c * f8])])
    return g.linear(x, c * f8, cfg.d_model)


def sub_lengths(g: Graph, length: str) -> str:
    """ceil(len / 2) three times, int64."""
    for _ in range(3):
        length = half(g, length)
    return length


def sinusoids(g: Graph, n: str, d: int) -> str:
    """(n, d) sinusoidal embedding of positions 0..n-1 (n is a scalar int64)."""
    pos = g.op("Cast", [g.op("Range", [g.const_i(0), n, g.const_i(1)])], to=TensorProto.FLOAT)
    pos = g.op("Unsqueeze", [pos, g.const_i([1])])  # (n, 1)
    inv = np.exp(-math.log(10000.0) * np.arange(0, d, 2, dtype=np.float32) / d)
    ang = g.op("Mul", [pos, g.const_f(inv[None, :])])  # (n, d/2)
    return g.op("Concat", [g.op("Sin", [ang]), g.op("Cos", [ang])], axis=1)


def attention(g: Graph, x_ln: str, kv: str, mask: str, cfg: Config) -> str:
    """x_ln: (B, T, D) queries; kv: (B, S, D) keys/values; mask: (B, 1, 1, S) additive."""
    d, h = cfg.d_model, cfg.n_heads
    dk = d // h
    split = g.const_i([0, -1, h, dk])

    def heads(t, perm):
        return g.op("Transpose", [g.op("Reshape", [t, split])], perm=perm)

    q = heads(g.linear(x_ln, d, d), [0, 2, 1, 3])  # (B, H, T, dk)
    k = heads(g.linear(kv, d, d), [0, 2, 3, 1])  # (B, H, dk, S)
    v = heads(g.linear(kv, d, d), [0, 2, 1, 3])  # (B, H, S, dk)
    # positional term (stands in for NeMo's rel-pos matrix_bd)
    s = g.dim(kv, 1)
    p = g.op("MatMul", [sinusoids(g, s, d), g.weight((d, d), d, "pos_w")])  # (S, D)
    p = g.op("Transpose", [g.op("Reshape", [p, g.const_i([1, -1, h, dk])])], perm=[0, 2, 3, 1])
    pos_u = g.const_f(np.zeros((h, 1, dk)))
    pos_v = g.const_f(np.zeros((h, 1, dk)))
    ac = g.op("MatMul", [g.op("Add", [q, pos_u]), k])
    bd = g.op("MatMul", [g.op("Add", [q, pos_v]), p])
    scores = g.op("Mul", [g.op("Add", [ac, bd]), g.const_f(1.0 / math.sqrt(dk))])
    scores = g.op("Add", [scores, mask])
    attn = g.op("Softmax", [scores], axis=-1)
    y = g.op("MatMul", [attn, v])  # (B, H, T, dk)
    y = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]), g.const_i([0, -1, d])])
    return g.op("Mul", [g.linear(y, d, d), g.const_f(BRANCH_GAIN)])


def conv_module(g: Graph, x: str, cfg: Config, cache: str | None, valid: str | None = None):
    """Returns (y, new_cache or None). cache: (B, D, K-1) or None (offline).

    valid: (B, T, 1) float, 1 for real frames; padded frames are zeroed before
    the depthwise conv (as NeMo does) so batching does not leak padding."""
    d, k = cfg.d_model, cfg.conv_kernel
    y = g.layer_norm(x, d)
    y = g.linear(y, d, 2 * d)
    a, b = g.op("Split", [y, g.const_i([d, d])], n_out=2, axis=-1)
    y = g.op("Mul", [a, g.op("Sigmoid", [b])])  # GLU
    if valid is not None:
        y = g.op("Mul", [y, valid])
    y = g.op("Transpose", [y], perm=[0, 2, 1])  # (B, D, T)
    dw = g.weight((d, 1, k), k, "dw_w")
    dwb = g.const_f(np.zeros(d))
    new_cache = None
    if cache is None:
        y = g.op("Conv", [y, dw, dwb], kernel_shape=[k], pads=[(k - 1) // 2, (k - 1) // 2], group=d)
    else:
        full = g.op("Concat", [cache, y], axis=2)  # (B, D, K-1+T)
        new_cache = g.op(
            "Slice", [full, g.const_i([-(k - 1)]), g.const_i([INT64_MAX]), g.const_i([2])]
        )
        y = g.op("Conv", [full, dw, dwb], kernel_shape=[k], group=d)  # (B, D, T)
    y = g.swish(y)  # batch-norm folded into the depthwise conv
    y = g.op("Transpose", [y], perm=[0, 2, 1])
    y = g.op("Mul", [g.linear(y, d, d), g.const_f(BRANCH_GAIN)])
    return g.op("Add", [x, y]), new_cache


def feed_forward(g: Graph, x: str, cfg: Config) -> str:
    y = g.layer_norm(x, cfg.d_model)
    y = g.swish(g.linear(y, cfg.d_model, cfg.ff_dim))
    y = g.linear(y, cfg.ff_dim, cfg.d_model)
    return g.op("Add", [x, g.op("Mul", [y, g.const_f(0.5)])])


def conformer_layer(g: Graph, x: str, mask: str, cfg: Config, ch_cache=None, t_cache=None,
                    valid=None):
    """One FastConformer layer. Returns (x, new_channel_cache, new_time_cache)."""
    x = feed_forward(g, x, cfg)
    x_ln = g.layer_norm(x, cfg.d_model)
    new_ch = None
    if ch_cache is None:
        kv = x_ln
    else:
        kv = g.op("Concat", [ch_cache, x_ln], axis=1)  # (B, C+T, D)
        new_ch = g.op(
            "Slice",
            [kv, g.const_i([-LAST_CHANNEL_CACHE]), g.const_i([INT64_MAX]), g.const_i([1])],
        )
    x = g.op("Add", [x, attention(g, x_ln, kv, mask, cfg)])
    x, new_t = conv_module(g, x, cfg, t_cache, valid)
    x = feed_forward(g, x, cfg)
    return g.layer_norm(x, cfg.d_model), new_ch, new_t


def padding_masks(g: Graph, lengths: str, t: str):
    """Returns ((B, 1, 1, T) additive attention mask, (B, T, 1) float valid mask)."""
    pos = g.op("Range", [g.const_i(0), t, g.const_i(1)])  # (T,)
    lens = g.op("Unsqueeze", [lengths, g.const_i([1])])  # (B, 1)
    pad = g.op("Cast", [g.op("GreaterOrEqual", [pos, lens])], to=TensorProto.FLOAT)
    m = g.op("Mul", [pad, g.const_f(-10000.0)])
    valid = g.op("Sub", [g.const_f(1.0), pad])
    return g.op("Unsqueeze", [m, g.const_i([1, 2])]), g.op("Unsqueeze", [valid, g.const_i([2])])


def offline_encoder(g: Graph, cfg: Config, feat_dim: int):
    """Returns (x (B, T8, D), lengths (B,))."""
    # zero the padded feature frames (NeMo's preprocessor does the same), so a
    # batch of different lengths gives the same result as one at a time
    t_in = g.dim("audio_signal", 2)
    pos = g.op("Range", [g.const_i(0), t_in, g.const_i(1)])
    keep = g.op("Less", [pos, g.op("Unsqueeze", ["length", g.const_i([1])])])  # (B, T)
    keep = g.op("Unsqueeze", [g.op("Cast", [keep], to=TensorProto.FLOAT), g.const_i([1])])
    audio = g.op("Mul", ["audio_signal", keep])
    x = subsampling(g, audio, feat_dim, cfg, causal=False, length="length")
    lengths = sub_lengths(g, "length")
    mask, valid = padding_masks(g, lengths, g.dim(x, 1))
    for _ in range(cfg.n_layers):
        x, _, _ = conformer_layer(g, x, mask, cfg, valid=valid)
    return x, lengths


def streaming_encoder(g: Graph, cfg: Config, feat_dim: int, window: int, shift: int):
    """Cache-aware encoder.

    Returns (x (B, T_out, D), lengths, cache_channel_next, cache_time_next, cache_len_next)."""
    c = LAST_CHANNEL_CACHE
    # Stand-in for training: real streaming NeMo models get raw log-mel
    # (normalize_type "") and have learnt to cope with its offset; a random
    # model would see nearly the same input on every frame, so the window is
    # normalised per feature here (cheap; the real model has no such op).
    mean = g.op("ReduceMean", ["audio_signal"], axes=[2], keepdims=1)
    cen = g.op("Sub", ["audio_signal", mean])
    var = g.op("ReduceMean", [g.op("Mul", [cen, cen])], axes=[2], keepdims=1)
    audio = g.op("Div", [cen, g.op("Sqrt", [g.op("Add", [var, g.const_f(1e-5)])])])
    x = subsampling(g, audio, feat_dim, cfg, causal=True)
    t8 = -(-window // SUBSAMPLING)
    keep = shift // SUBSAMPLING
    drop = t8 - keep  # NeMo drops the frames coming from the pre-encode cache
    x = g.op("Slice", [x, g.const_i([drop]), g.const_i([INT64_MAX]), g.const_i([1])])
    lengths = g.op("Max", [g.op("Sub", [sub_lengths(g, "length"), g.const_i(drop)]), g.const_i(0)])
    t_out = g.dim(x, 1)

    # attention mask: cache slot j (0..C-1) is valid iff j >= C - cache_len
    slots = g.const_i(np.arange(c))
    first_valid = g.op("Sub", [g.const_i(c), "cache_last_channel_len"])  # (B,)
    invalid = g.op("Less", [slots, g.op("Unsqueeze", [first_valid, g.const_i([1])])])  # (B, C)
    cache_mask = g.op("Mul", [g.op("Cast", [invalid], to=TensorProto.FLOAT), g.const_f(-10000.0)])
    bt = g.op("Slice", [g.op("Shape", [x]), g.const_i([0]), g.const_i([2])])  # [B, T]
    cur_mask = g.op("ConstantOfShape", [bt], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
    mask = g.op("Concat", [cache_mask, cur_mask], axis=1)  # (B, C+T)
    mask = g.op("Unsqueeze", [mask, g.const_i([1, 2])])

    new_ch, new_t = [], []
    for layer in range(cfg.n_layers):
        idx = g.const_i(layer)
        ch = g.op("Gather", ["cache_last_channel", idx], axis=1)  # (B, C, D)
        tc = g.op("Gather", ["cache_last_time", idx], axis=1)  # (B, D, K-1)
        x, nch, nt = conformer_layer(g, x, mask, cfg, ch, tc)
        new_ch.append(g.op("Unsqueeze", [nch, g.const_i([1])]))
        new_t.append(g.op("Unsqueeze", [nt, g.const_i([1])]))
    cache_ch = g.op("Concat", new_ch, axis=1, outputs=["cache_last_channel_next"])
    cache_t = g.op("Concat", new_t, axis=1, outputs=["cache_last_time_next"])
    cache_len = g.op(
        "Min",
        [g.op("Add", ["cache_last_channel_len", t_out]), g.const_i(c)],
        outputs=["cache_last_channel_next_len"],
    )
    return x, lengths, cache_ch, cache_t, cache_len


# --------------------------------------------------------------------------
# model assembly
# --------------------------------------------------------------------------


def tensor(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def finish(g: Graph, inputs, outputs, meta: dict | None, path: Path, doc: str) -> None:
    graph = helper.make_graph(g.nodes, "nemo_like", inputs, outputs, g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="sttd make_tiny_nemo.py",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    for k, v in (meta or {}).items():
        p = model.metadata_props.add()
        p.key, p.value = k, str(v)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def audio_inputs(feat_dim):
    return [
        tensor("audio_signal", TensorProto.FLOAT, ["B", feat_dim, "T"]),
        tensor("length", TensorProto.INT64, ["B"]),
    ]


def _cache_tensors(cfg, next_=""):
    """The streaming encoder's cache, as inputs (`next_` "") or outputs ("_next")."""
    c, d, k = LAST_CHANNEL_CACHE, cfg.d_model, cfg.conv_kernel
    return [
        tensor(f"cache_last_channel{next_}", TensorProto.FLOAT, ["B", cfg.n_layers, c, d]),
        tensor(f"cache_last_time{next_}", TensorProto.FLOAT, ["B", cfg.n_layers, d, k - 1]),
        tensor(f"cache_last_channel{next_}_len", TensorProto.INT64, ["B"]),
    ]


def cache_inputs(cfg):
    return _cache_tensors(cfg)


def cache_outputs(cfg):
    return _cache_tensors(cfg, "_next")


def streaming_meta(cfg, window, shift):
    return {
        "window_size": window,
        "chunk_shift": shift,
        "cache_last_channel_dim1": cfg.n_layers,
        "cache_last_channel_dim2": LAST_CHANNEL_CACHE,
        "cache_last_channel_dim3": cfg.d_model,
        "cache_last_time_dim1": cfg.n_layers,
        "cache_last_time_dim2": cfg.d_model,
        "cache_last_time_dim3": cfg.conv_kernel - 1,
    }


def common_meta(cfg, comment):
    return {
        "vocab_size": cfg.n_pieces,  # NeMo convention: blank not counted
        "subsampling_factor": SUBSAMPLING,
        "version": "1",
        "model_author": "sttd test fixture (random weights, not NeMo)",
        "comment": comment,
    }


def expected_max(n: int) -> float:
    """E[max of n standard normals] (Monte Carlo, own fixed seed)."""
    r = np.random.default_rng(1234).standard_normal((4000, n))
    return float(r.max(axis=1).mean())


def output_layer(g: Graph, x: str, din: int, n_out: int, n_tokens: int, x_std: float) -> str:
    """Logits for n_out classes; class n_tokens is blank (after the tokens).

    Columns are zero-mean so no token is always preferred; the blank column
    is zero and blank's bias is set from the expected best token logit."""
    w = g.rng.standard_normal((din, n_out)).astype(np.float32)
    w -= w.mean(axis=0, keepdims=True)
    w *= LOGIT_GAIN / (math.sqrt(din) * x_std)
    w[:, n_tokens] = 0.0
    b = np.zeros(n_out, np.float32)
    b[n_tokens] = LOGIT_GAIN * (expected_max(n_tokens) + EMIT_MARGIN)
    b[0] = -10.0  # <unk>: a trained model seldom emits it
    return g.op("Add", [g.op("MatMul", [x, g.add_init(w, "out_w")]), g.add_init(b, "out_b")])


def ctc_logits(g: Graph, x: str, cfg: Config) -> str:
    v1 = cfg.n_pieces + 1
    return output_layer(g, x, cfg.d_model, v1, cfg.n_pieces, 1.0)


def token_directions(rng, cfg: Config) -> np.ndarray:
    """(V+1, H) unit vectors, one per token, zero for blank.

    The decoder embeds token k as EMBED_NORM * direction[k]; its LSTM is set
    up as a leaky sum of the last tokens (see build_decoder) and the joiner
    subtracts REPEAT_PENALTY * <decoder_out, direction[k]> from token k's
    logit.  This stands in for what a trained model learns (do not emit the
    same tokens again on the same frame); without it a random RNNT emits
    max_symbols_per_frame tokens on every frame where a token beats blank.
    """
    v1, h = cfg.n_pieces + 1, cfg.pred_hidden
    e = rng.standard_normal((v1, h)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    e[-1] = 0.0  # blank is NeMo's padding_idx
    return e


def build_decoder(rng, cfg: Config, path: Path, directions: np.ndarray) -> None:
    """NeMo RNNT prediction net: embedding + LSTM, layout of NeMo's export."""
    g = Graph(rng)
    h, layers = cfg.pred_hidden, cfg.pred_rnn_layers
    emb = g.add_init(directions * EMBED_NORM, "embed")
    e = g.op("Gather", [emb, "targets"], axis=0)  # (B, U, H)
    y = g.op("Transpose", [e], perm=[1, 0, 2])  # (U, B, H)
    hs, cs = [], []
    for layer in range(layers):
        sl = [g.const_i([layer]), g.const_i([layer + 1]), g.const_i([0])]
        h0 = g.op("Slice", ["states.1", *sl])
        c0 = g.op("Slice", ["onnx::LSTM_3", *sl])
        # Not random: gates i, o ~ 1 and f = 0.73, cell input = tanh(x), so the
        # output is ~ tanh(x_t + 0.73 x_{t-1} + 0.53 x_{t-2} ...), a decaying
        # memory of the emitted tokens.  R is zero but still multiplied, so
        # the cost is that of a real LSTM of this size.  (ONNX gate order iofc)
        w = np.zeros((1, 4 * h, h), np.float32)
        w[0, 3 * h:] = np.eye(h, dtype=np.float32)
        b = np.zeros((1, 8 * h), np.float32)
        b[0, : 2 * h] = 10.0
        b[0, 2 * h : 3 * h] = 1.0
        w, r, b = g.add_init(w, "lstm_w"), g.const_f(np.zeros((1, 4 * h, h))), g.add_init(b, "lstm_b")
        seq, hn, cn = g.op("LSTM", [y, w, r, b, "", h0, c0], n_out=3, hidden_size=h)
        y = g.op("Squeeze", [seq, g.const_i([1])])  # (U, B, H)
        hs.append(hn)
        cs.append(cn)
    g.op("Transpose", [y], perm=[1, 2, 0], outputs=["outputs"])  # (B, H, U)
    g.op("Identity", ["target_length"], outputs=["prednet_lengths"])
    g.op("Concat", hs, axis=0, outputs=["states"])
    g.op("Concat", cs, axis=0, outputs=["74"])
    finish(
        g,
        [
            tensor("targets", TensorProto.INT32, ["B", "U"]),
            tensor("target_length", TensorProto.INT32, ["B"]),
            tensor("states.1", TensorProto.FLOAT, [layers, "B", h]),
            tensor("onnx::LSTM_3", TensorProto.FLOAT, [layers, "B", h]),
        ],
        [
            tensor("outputs", TensorProto.FLOAT, ["B", h, "U"]),
            tensor("prednet_lengths", TensorProto.INT32, ["B"]),
            tensor("states", TensorProto.FLOAT, [layers, "B", h]),
            tensor("74", TensorProto.FLOAT, [layers, "B", h]),
        ],
        None,
        path,
        "NeMo-like RNNT decoder (random weights)",
    )


def build_joiner(rng, cfg: Config, path: Path, tdt: bool, directions: np.ndarray) -> None:
    g = Graph(rng)
    d, h, j = cfg.d_model, cfg.pred_hidden, cfg.joint_hidden
    v1 = cfg.n_pieces + 1
    n_out = v1 + (len(TDT_DURATIONS) if tdt else 0)
    enc = g.op("Transpose", ["encoder_outputs"], perm=[0, 2, 1])  # (B, T, D)
    dec_in = g.op("Transpose", ["decoder_outputs"], perm=[0, 2, 1])  # (B, U, H)
    enc = g.op("Unsqueeze", [g.linear(enc, d, j), g.const_i([2])])  # (B, T, 1, J)
    dec = g.op("Mul", [g.linear(dec_in, h, j), g.const_f(0.25)])
    dec = g.op("Unsqueeze", [dec, g.const_i([1])])  # (B, 1, U, J)
    z = g.op("Relu", [g.op("Add", [enc, dec])])
    # repeat penalty, see token_directions()
    pen = (-REPEAT_PENALTY * directions.T).astype(np.float32)  # (H, V+1)
    pen = g.op("Unsqueeze", [g.op("MatMul", [dec_in, g.add_init(pen, "rep")]), g.const_i([1])])
    relu_std = math.sqrt(0.5 - 1 / (2 * math.pi))  # std of relu(N(0, 1))
    logits = g.op("Add", [output_layer(g, z, j, v1, v1 - 1, relu_std), pen])
    if tdt:
        # TDT: duration logits follow the token logits on the last axis
        nd = len(TDT_DURATIONS)
        wd = g.weight((j, nd), j / 0.25, "dur_w")
        bd = np.array([1.0, 3.0, 2.0, 0.0, -1.0], np.float32)  # mostly advance 1-2 frames
        dur = g.op("Add", [g.op("MatMul", [z, wd]), g.add_init(bd, "dur_b")])
        logits = g.op("Concat", [logits, dur], axis=-1)
    g.op("Identity", [logits], outputs=["outputs"])
    finish(
        g,
        [
            tensor("encoder_outputs", TensorProto.FLOAT, ["B", d, "T"]),
            tensor("decoder_outputs", TensorProto.FLOAT, ["B", h, "U"]),
        ],
        [tensor("outputs", TensorProto.FLOAT, ["B", "T", "U", n_out])],
        None,
        path,
        "NeMo-like RNNT/TDT joint (random weights)",
    )


def build(kind: str, out: Path, size: str, feat_dim: int | None, chunk_ms: int,
          variant: str, seed: int) -> None:
    cfg = SIZES[size]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    pieces = make_pieces(cfg.n_pieces)
    v1 = cfg.n_pieces + 1
    window, shift = CHUNKS[chunk_ms]
    tdt = kind == "offline-transducer" and variant == "tdt"
    if feat_dim is None:
        feat_dim = 128 if tdt else 80
    note = "random weights; output text is meaningless"

    if kind == "offline-transducer":
        g = Graph(rng)
        x, lengths = offline_encoder(g, cfg, feat_dim)
        g.op("Transpose", [x], perm=[0, 2, 1], outputs=["outputs"])
        g.op("Identity", [lengths], outputs=["encoded_lengths"])
        meta = common_meta(cfg, f"{note}; only the transducer branch")
        meta.update({
            "normalize_type": "per_feature",
            "pred_rnn_layers": cfg.pred_rnn_layers,
            "pred_hidden": cfg.pred_hidden,
            "model_type": "EncDecRNNTBPEModel",
            "feat_dim": feat_dim,
            # sherpa-onnx treats the model as TDT iff "tdt" occurs in url
            "url": "https://example.invalid/sttd/tiny-nemo-"
            + ("tdt" if tdt else "rnnt"),
        })
        finish(
            g,
            audio_inputs(feat_dim),
            [
                tensor("outputs", TensorProto.FLOAT, ["B", cfg.d_model, "T8"]),
                tensor("encoded_lengths", TensorProto.INT64, ["B"]),
            ],
            meta,
            out / "encoder.onnx",
            "NeMo-like offline FastConformer encoder (random weights)",
        )
        dirs = token_directions(rng, cfg)
        build_decoder(rng, cfg, out / "decoder.onnx", dirs)
        build_joiner(rng, cfg, out / "joiner.onnx", tdt, dirs)
        write_bpe_vocab(out, pieces)

    elif kind == "offline-ctc":
        g = Graph(rng)
        x, _ = offline_encoder(g, cfg, feat_dim)
        logits = ctc_logits(g, x, cfg)
        g.op("LogSoftmax", [logits], axis=-1, outputs=["logprobs"])
        meta = common_meta(cfg, f"{note}; CTC")
        meta.update({"normalize_type": "per_feature", "model_type": "EncDecCTCModelBPE"})
        finish(
            g,
            audio_inputs(feat_dim),
            [tensor("logprobs", TensorProto.FLOAT, ["B", "T8", v1])],
            meta,
            out / "model.onnx",
            "NeMo-like offline FastConformer CTC model (random weights)",
        )

    elif kind in ("online-transducer", "online-ctc"):
        g = Graph(rng)
        x, lengths, *_ = streaming_encoder(g, cfg, feat_dim, window, shift)
        meta = common_meta(cfg, f"{note}; cache-aware streaming, {chunk_ms} ms chunks")
        meta.update(streaming_meta(cfg, window, shift))
        meta.update({"normalize_type": "", "model_type": "EncDecHybridRNNTCTCBPEModel"})
        if kind == "online-transducer":
            g.op("Transpose", [x], perm=[0, 2, 1], outputs=["outputs"])
            first = tensor("outputs", TensorProto.FLOAT, ["B", cfg.d_model, "T_out"])
            meta.update({"pred_rnn_layers": cfg.pred_rnn_layers, "pred_hidden": cfg.pred_hidden})
            fname = "encoder.onnx"
        else:
            logits = ctc_logits(g, x, cfg)
            g.op("LogSoftmax", [logits], axis=-1, outputs=["logprobs"])
            first = tensor("logprobs", TensorProto.FLOAT, ["B", "T_out", v1])
            fname = "model.onnx"
        g.op("Identity", [lengths], outputs=["encoded_lengths"])
        finish(
            g,
            audio_inputs(feat_dim) + cache_inputs(cfg),
            [first, tensor("encoded_lengths", TensorProto.INT64, ["B"])] + cache_outputs(cfg),
            meta,
            out / fname,
            "NeMo-like cache-aware streaming FastConformer (random weights)",
        )
        if kind == "online-transducer":
            dirs = token_directions(rng, cfg)
            build_decoder(rng, cfg, out / "decoder.onnx", dirs)
            build_joiner(rng, cfg, out / "joiner.onnx", False, dirs)
            write_bpe_vocab(out, pieces)
    else:
        raise ValueError(kind)

    write_tokens(out, pieces)
    with open(out / "README.txt", "w", encoding="utf-8") as f:
        f.write(
            f"Generated by make_tiny_nemo.py --kind {kind} --size {size} "
            f"--feat-dim {feat_dim} --chunk-ms {chunk_ms} --variant {variant} "
            f"--seed {seed}\nRandom weights: the recognised text is meaningless.\n"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True,
                   choices=["offline-transducer", "offline-ctc", "online-transducer", "online-ctc"])
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--feat-dim", type=int, default=None,
                   help="mel bins; default 128 for offline TDT (like parakeet-tdt-0.6b), else 80")
    p.add_argument("--chunk-ms", type=int, default=480, choices=sorted(CHUNKS),
                   help="streaming chunk (online kinds)")
    p.add_argument("--variant", default="tdt", choices=["tdt", "rnnt"],
                   help="offline-transducer joiner type")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    build(a.kind, a.out, a.size, a.feat_dim, a.chunk_ms, a.variant, a.seed)
    for f in sorted(os.listdir(a.out)):
        print(f"{a.out / f}\t{(a.out / f).stat().st_size} bytes")


if __name__ == "__main__":
    main()
