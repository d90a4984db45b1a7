"""Tensor names: layer index and module kind, and the prefix map that pairs renamed tensors.

**Layer index** (:func:`parse_name`): the number after the first component named
``layers``, ``layer``, ``h``, ``blocks`` or ``block`` (``model.layers.7.mlp...`` -> 7,
``transformer.h.3.attn...`` -> 3, ``encoder.layer.5...`` -> 5, T5's
``encoder.block.2.layer.1...`` -> 2); None for tensors outside the stack (embeddings, final
norm, head). Mixture-of-experts names also give ``expert`` (the number after ``experts``).

**Module kinds** (:data:`KINDS`), from the last module names before the parameter name:

==========  ================================================================================
kind        names (architectures)
==========  ================================================================================
q, k, v     q_proj/k_proj/v_proj (Llama, Qwen, Mistral, OPT, Phi), query/key/value (BERT),
            q/k/v (T5), wq/wk/wv (Meta Llama), q_a_proj/q_b_proj (DeepSeek: q)
kv          kv_a_proj_with_mqa, kv_b_proj (DeepSeek)
qkv         c_attn (GPT-2), query_key_value (GPT-NeoX, Falcon, BLOOM), qkv_proj (Phi-3),
            Wqkv (MPT), qkv, in_proj
o           o_proj, out_proj, attention.output.dense (BERT), attn.c_proj (GPT-2),
            attention.dense / self_attention.dense / self_attn.dense, o (T5), wo in attention
gate        gate_proj, w1 (Mixtral, Meta Llama), wi_0 (T5 gated)
up          up_proj, w3, fc1, c_fc (GPT-2), dense_h_to_4h, intermediate.dense (BERT),
            wi / wi_1 (T5), fc_in
gate_up     gate_up_proj (Phi-3)
down        down_proj, w2, fc2, mlp.c_proj (GPT-2), dense_4h_to_h, output.dense (BERT),
            wo in the MLP (T5), fc_out
router      block_sparse_moe.gate, mlp.gate (MoE routers), router, shared_expert_gate
embed       embed_tokens, wte, word_embeddings, embed_in, tok_embeddings, shared (T5)
pos_embed   wpe, position_embeddings, embed_positions
type_embed  token_type_embeddings
lm_head     lm_head, embed_out, top-level output
norm        every name with ``norm`` or ``ln_`` in it (layer norms, RMS norms, q_norm/k_norm)
pooler      pooler
other       everything else (rotary buffers, classifier heads, ...)
==========  ================================================================================

**Prefix map** (:func:`parse_map`, :func:`apply_map`): a list of ``OLD=NEW`` rules (CLI
``--map model.=`` or Python ``{"model.": ""}``). Each name, *on both sides*, is rewritten by
the first rule whose OLD it starts with (``OLD`` replaced by ``NEW``), and tensors are paired
on the rewritten name. ``--map model.=`` thus pairs ``model.layers.0.mlp.up_proj.weight``
with ``layers.0.mlp.up_proj.weight``, and ``--map base_model.model.=`` unwraps a merged PEFT
checkpoint. Rows keep both original names. A map that makes two tensors of one side share a
name raises :class:`~gatesim.diff.errors.NameMapError`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Optional, Sequence, Union

from gatesim.diff.errors import NameMapError

__all__ = ["KINDS", "NameInfo", "parse_name", "module_kind", "layer_index", "parse_map",
           "apply_map", "MapLike"]

KINDS = ("q", "k", "v", "kv", "qkv", "o", "gate", "up", "gate_up", "down", "router",
         "embed", "pos_embed", "type_embed", "lm_head", "norm", "pooler", "other")

_STACKS = frozenset({"layers", "layer", "h", "blocks", "block"})
_PARAMS = frozenset({"weight", "bias"})
_ATTN = frozenset({"attn", "attention", "self_attn", "self_attention", "selfattention",
                   "encdecattention", "crossattention", "cross_attn", "mixer"})
_MLP = frozenset({"mlp", "ffn", "feed_forward", "feedforward", "densereludense",
                  "block_sparse_moe", "moe"})

# leaf module name (lower case) -> kind, when it alone decides
_LEAF = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "query": "q", "key": "k", "value": "v",
    "wq": "q", "wk": "k", "wv": "v", "to_q": "q", "to_k": "k", "to_v": "v",
    "q_a_proj": "q", "q_b_proj": "q", "kv_a_proj_with_mqa": "kv", "kv_b_proj": "kv",
    "c_attn": "qkv", "query_key_value": "qkv", "qkv_proj": "qkv", "wqkv": "qkv",
    "qkv": "qkv", "in_proj": "qkv",
    "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate", "w1": "gate", "wi_0": "gate",
    "up_proj": "up", "w3": "up", "fc1": "up", "c_fc": "up", "dense_h_to_4h": "up",
    "wi": "up", "wi_1": "up", "fc_in": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down", "w2": "down", "fc2": "down", "dense_4h_to_h": "down",
    "fc_out": "down",
    "router": "router", "shared_expert_gate": "router",
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed", "embed_in": "embed",
    "tok_embeddings": "embed",
    "wpe": "pos_embed", "position_embeddings": "pos_embed", "embed_positions": "pos_embed",
    "token_type_embeddings": "type_embed",
    "lm_head": "lm_head", "embed_out": "lm_head",
    "pooler": "pooler",
}

_LAYER_RE = re.compile(r"^\d+$")


@dataclasses.dataclass(frozen=True)
class NameInfo:
    """What a tensor name says: ``layer`` (None outside the stack), ``module`` (a
    :data:`KINDS` entry), ``param`` (the last component: ``weight``, ``bias``, ...),
    ``expert`` (MoE expert index or None)."""

    layer: Optional[int]
    module: str
    param: str
    expert: Optional[int] = None


def layer_index(name: str) -> Optional[int]:
    """The layer index of a tensor name (module docstring), or None."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.lower() in _STACKS and _LAYER_RE.match(parts[i + 1]):
            return int(parts[i + 1])
    return None


def _expert(parts: Sequence[str]) -> Optional[int]:
    for i, p in enumerate(parts[:-1]):
        if p.lower() == "experts" and _LAYER_RE.match(parts[i + 1]):
            return int(parts[i + 1])
    return None


def module_kind(name: str) -> str:
    """The module kind (:data:`KINDS`) of a tensor name; see the module docstring."""
    parts = name.split(".")
    mods = parts[:-1] if len(parts) > 1 else parts
    if len(parts) > 1 and parts[-1].endswith("_weight") and parts[-1] != "weight":
        # nn.MultiheadAttention: "...attn.in_proj_weight"
        mods = parts[:-1] + [parts[-1][: -len("_weight")]]
    low = [p.lower() for p in mods if not _LAYER_RE.match(p)]
    if not low:
        return "other"
    if any("norm" in p or p.startswith("ln_") or p in ("ln", "ln1", "ln2") for p in low[-2:]):
        return "norm"
    leaf = low[-1]
    parent = low[-2] if len(low) > 1 else ""
    if "pooler" in low:
        return "pooler"
    if leaf in _LEAF:
        return _LEAF[leaf]
    if leaf in ("q", "k", "v", "o") and parent in _ATTN:
        return leaf
    if leaf == "wo":
        return "o" if parent in _ATTN else "down"
    if leaf == "c_proj":
        return "o" if parent in _ATTN else "down"
    if leaf == "gate" and (parent in _MLP or parent.endswith("moe")):
        return "router"
    if leaf == "dense":
        if parent in _ATTN:
            return "o"
        if parent == "output":
            grand = low[-3] if len(low) > 2 else ""
            return "o" if grand in _ATTN else "down"
        if parent == "intermediate":
            return "up"
    if leaf == "shared" and len(low) == 1:
        return "embed"
    if leaf == "output" and len(low) == 1:
        return "lm_head"
    if leaf == "embeddings" or leaf.endswith("_embeddings") or leaf.endswith("_embedding"):
        return "embed"
    return "other"


def parse_name(name: str) -> NameInfo:
    """Layer index, module kind, parameter name and expert index of a tensor name."""
    parts = name.split(".")
    param = parts[-1]
    return NameInfo(layer=layer_index(name), module=module_kind(name), param=param,
                    expert=_expert(parts))


MapLike = Union[None, str, Mapping[str, str], Iterable[Union[str, tuple]]]


def parse_map(rules: MapLike) -> tuple[tuple[str, str], ...]:
    """Normalises a prefix map: None, one ``"OLD=NEW"`` string, a list of such strings or
    ``(OLD, NEW)`` pairs, or a dict ``{OLD: NEW}``. OLD must be non-empty.

    Raises:
        NameMapError: a rule without ``=``, an empty OLD, or a non-string part.
    """
    if rules is None:
        return ()
    if isinstance(rules, str):
        rules = [rules]
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for r in items:
        if isinstance(r, str):
            if "=" not in r:
                raise NameMapError(f"map rule {r!r} has no '=' (write OLD=NEW, e.g. 'model.=')")
            old, new = r.split("=", 1)
        elif isinstance(r, tuple) and len(r) == 2:
            old, new = r
        else:
            raise NameMapError(f"map rule {r!r} is neither 'OLD=NEW' nor a pair (OLD, NEW)")
        if not isinstance(old, str) or not isinstance(new, str):
            raise NameMapError(f"map rule {r!r}: OLD and NEW must be strings")
        if not old:
            raise NameMapError(f"map rule {r!r}: OLD must not be empty")
        out.append((old, new))
    return tuple(out)


def apply_map(names: Iterable[str], rules: Sequence[tuple[str, str]],
              side: str = "") -> dict[str, str]:
    """``{mapped name: original name}`` for one side; the first matching rule applies.

    Raises:
        NameMapError: two names map to the same one (naming both).
    """
    out: dict[str, str] = {}
    for n in names:
        m = n
        for old, new in rules:
            if n.startswith(old):
                m = new + n[len(old):]
                break
        if m in out:
            raise NameMapError(f"{side + ': ' if side else ''}the prefix map gives "
                               f"{out[m]!r} and {n!r} the same name {m!r}")
        out[m] = n
    return out
