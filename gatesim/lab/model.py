"""Loading a local Hugging Face model folder, the candidate policy, and real checkpoints.

:func:`load_model` reads a model folder with ``transformers`` and its tokenizer with
``tokenizers`` (through ``transformers.AutoTokenizer``), **only from local files**
(``local_files_only=True`` and ``HF_HUB_OFFLINE=1``: nothing is ever downloaded). Default:
the bundled MiniLM (:func:`gatesim.weights.bundled_model_path`). Two kinds of model:

* ``"masked"`` (a BERT-style encoder, e.g. the bundled MiniLM): ``AutoModel`` (the encoder
  without a pooler); the answer slot is the mask token, and the policy's logits are the
  final hidden state at that position times the *tied word embeddings* of the candidates
  (MiniLM's checkpoint has no separate MLM head).
* ``"causal"`` (a config whose architecture ends in ``ForCausalLM`` or with
  ``is_decoder``): ``AutoModelForCausalLM``; the answer slot is the token after the prompt,
  and the logits are the last hidden state times the output embeddings of the candidates.

Either way :meth:`Policy.logits` gives ``(batch, candidates)`` logits, so every training
method sees the same categorical policy. Dropout is off (``eval()``): RLVR trainers disable
it, and it keeps a run deterministic.

:func:`save_checkpoint` writes a Hugging Face style folder: ``model.safetensors`` (every
parameter under its ``state_dict`` name, in the requested dtype; tensors that share storage,
such as tied heads, written once), ``config.json`` and the tokenizer files, so the same
:func:`load_model` (or ``gatesim diff``) reads it back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from gatesim.formats import FORMATS

__all__ = ["Policy", "load_model", "save_checkpoint", "model_kind", "resolve_model_path",
           "make_tiny_model", "ModelError"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelError(ValueError):
    """The model folder cannot be used (missing, not a model folder, unsupported kind)."""


def resolve_model_path(path: Union[str, os.PathLike, None]) -> Path:
    """The model folder: ``path`` or, when None, the bundled MiniLM's folder."""
    if path is None:
        from gatesim.weights import bundled_model_path
        return bundled_model_path().parent
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"--model must be a local model folder (config.json, weights, "
                         f"tokenizer); {str(p)!r} is not a folder. Nothing is downloaded.")
    if not (p / "config.json").is_file():
        raise ModelError(f"{p} has no config.json: not a Hugging Face model folder")
    return p


def model_kind(config) -> str:
    """``"causal"`` or ``"masked"`` from a transformers config (module docstring)."""
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in archs):
        return "causal"
    return "masked"


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass
    return transformers


class Policy(torch.nn.Module):
    """The model plus how to read its answer distribution over candidate tokens."""

    def __init__(self, model: torch.nn.Module, tokenizer, kind: str, path: Path):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.path = path

    def encode(self, prompts: list) -> dict:
        """Tokenized, right-padded prompts plus the index of each answer position
        (``"answer_pos"``)."""
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        enc = tok(prompts, return_tensors="pt", padding=True,
                  add_special_tokens=self.kind == "masked")
        ids = enc["input_ids"]
        if self.kind == "masked":
            hits = ids == tok.mask_token_id
            if not bool((hits.sum(1) == 1).all()):
                raise ValueError("each masked-LM prompt needs exactly one mask token")
            pos = hits.float().argmax(1)
        else:
            pos = enc["attention_mask"].sum(1) - 1
        out = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                      "token_type_ids")}
        out["answer_pos"] = pos
        return out

    def head_weight(self) -> torch.Tensor:
        if self.kind == "masked":
            return self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        return head.weight if head is not None else self.model.get_input_embeddings().weight

    def logits(self, enc: dict, candidate_ids: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(batch, len(candidate_ids))`` logits at the answer positions of the encoded
        prompts ``enc`` (``rows`` selects a subset of them)."""
        args = {k: (v if rows is None else v[rows]) for k, v in enc.items()
                if k != "answer_pos"}
        pos = enc["answer_pos"] if rows is None else enc["answer_pos"][rows]
        if self.kind == "masked":
            h = self.model(**args).last_hidden_state
        else:
            h = self.model(**args, output_hidden_states=True).hidden_states[-1]
        h = h[torch.arange(h.shape[0]), pos]
        w = self.head_weight()[candidate_ids]
        out = h @ w.to(h.dtype).T
        if self.kind == "causal":
            bias = getattr(self.model.get_output_embeddings(), "bias", None)
            if bias is not None:
                out = out + bias[candidate_ids].to(out.dtype)
        return out.float()


def load_model(path: Union[str, os.PathLike, None] = None,
               dtype: torch.dtype = torch.float32) -> Policy:
    """The model and tokenizer of a local folder (default: bundled MiniLM) as a
    :class:`Policy` in ``dtype``, dropout off. Never downloads."""
    p = resolve_model_path(path)
    tf = _quiet_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(p), local_files_only=True)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the config/tokenizer of {p}: {exc}") from exc
    kind = model_kind(config)
    cls = tf.AutoModelForCausalLM if kind == "causal" else tf.AutoModel
    kw = {"add_pooling_layer": False} if config.model_type == "bert" else {}
    try:
        model = cls.from_pretrained(str(p), local_files_only=True, dtype=dtype, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the weights of {p}: {exc}") from exc
    model.eval()
    return Policy(model, tokenizer, kind, p)


#: Checkpoint dtypes by format name (gatesim.formats is the one table of formats).
_DTYPES = {name: FORMATS[name].torch_dtype for name in ("bf16", "fp32", "fp16")}


def save_checkpoint(policy: Policy, folder: Union[str, os.PathLike], dtype: str = "fp32",
                    tensors: Optional[dict] = None) -> Path:
    """Writes ``policy``'s weights (or ``tensors``, name -> tensor, in place of them) as a
    Hugging Face folder (module docstring). ``dtype`` ``"bf16"`` expects values already on
    the bf16 grid (the emulated bf16 storage): the conversion is then exact, which is
    checked."""
    from safetensors.torch import save_file
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    target = _DTYPES[dtype]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = tensors if tensors is not None else policy.model.state_dict()
    out, seen = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # a tied tensor: written once, re-tied by the loader
            continue
        seen[key] = name
        c = t.detach().to(target).contiguous()
        if t.dtype == torch.float32 and target != torch.float32:
            if not torch.equal(c.float(), t.detach()):
                raise ValueError(f"{name}: float32 values are not on the {dtype} grid; "
                                 "round them first (the checkpoint would not be what was "
                                 "trained)")
        out[name] = c
    tmp = folder / "model.safetensors.tmp"
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    cfg = policy.model.config.to_dict()
    cfg["torch_dtype"] = cfg["dtype"] = str(target).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    policy.tokenizer.save_pretrained(str(folder))
    return folder


def make_tiny_model(folder: Union[str, os.PathLike], kind: str = "masked", *,
                    hidden: int = 32, layers: int = 2, seed: int = 0,
                    tokenizer_from: Union[str, os.PathLike, None] = None) -> Path:
    """Writes a small randomly initialised model folder (``"masked"``: a BERT encoder;
    ``"causal"``: a Llama decoder with an untied head) with the tokenizer of
    ``tokenizer_from`` (default: the bundled MiniLM's), for tests and quick tries of the lab
    on a causal LM. Nothing is downloaded."""
    if kind not in ("masked", "causal"):
        raise ValueError(f"kind must be 'masked' or 'causal', got {kind!r}")
    tf = _quiet_transformers()
    src = resolve_model_path(tokenizer_from)
    tok = tf.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=2, intermediate_size=2 * hidden,
                  max_position_embeddings=64)
    if kind == "masked":
        model = tf.BertModel(tf.BertConfig(**common), add_pooling_layer=False)
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2,
                                                   tie_word_embeddings=False,
                                                   pad_token_id=tok.pad_token_id, **common))
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
