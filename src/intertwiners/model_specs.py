"""Models named by a spec string, with an input that fits them (used by ``intertwiners verify``).

Specs: a built-in architecture (``myrtle_cnn``, ``resnet20``, ``mlp``), a saved model folder,
``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``: random weights, nothing downloaded),
``hf:gpt2`` / ``hf:bert`` / ``hf:llama`` (tiny Hugging Face configurations with random weights, see
:func:`hf_tiny`) and ``package.module:factory`` (imported and called with no arguments; it returns a model
or a ``(model, example_input)`` pair). timm and transformers are imported only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HF_TINY = ("gpt2", "bert", "bert-mlm", "llama")
"""The Hugging Face families :func:`hf_tiny` builds."""


@dataclass
class LoadedModel:
    """A model and how to make inputs for it.

    ``kind`` is ``"float"`` (inputs of shape (batch, *shape), standard normal) or ``"tokens"`` (integer ids
    in [0, vocab) of shape (batch, *shape)); ``example`` is a fixed input given by a factory (then
    :meth:`batch` returns it, perturbed for warm-up batches when it is floating point).
    """

    model: nn.Module
    kind: str = "float"
    shape: tuple[int, ...] = ()
    vocab: int | None = None
    example: torch.Tensor | None = None
    description: str = ""

    def batch(self, n: int, generator: torch.Generator, dtype: torch.dtype, warmup: int = 0) -> torch.Tensor:
        """An input batch of size ``n`` (``warmup`` > 0: a shifted, wider batch for batch-norm warm-up)."""
        if self.example is not None:
            x = self.example
            if warmup and x.is_floating_point():
                x = x * 1.5 + 0.2 * warmup
            return x.to(dtype) if x.is_floating_point() else x
        if self.kind == "tokens":
            return torch.randint(0, int(self.vocab), (n, *self.shape), generator=generator)
        x = torch.randn(n, *self.shape, generator=generator, dtype=dtype)
        return 1.5 * x + 0.2 * warmup if warmup else x


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _import(package: str, spec: str):
    try:
        return importlib.import_module(package)
    except Exception as err:  # an optional package can fail in many ways (e.g. a broken torchvision)
        raise ValueError(f"{spec} needs the {package} package, which could not be imported "
                         f"({_first_line(err)})") from err


def hf_tiny(family: str, *, layers: int = 2, width: int = 64, heads: int = 4, vocab: int = 1000,
            positions: int = 128, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised Hugging Face model: ``gpt2`` (GPT2LMHeadModel, tied unembedding),
    ``bert`` (BertModel: its output is the residual stream itself), ``bert-mlm`` (BertForMaskedLM: a
    prediction head and a decoder tied to the word embeddings) or ``llama`` (LlamaForCausalLM, grouped-query
    attention with heads/2 key-value heads, rotary embeddings, gated MLP, RMSNorm).

    ``layers`` blocks of ``width`` channels, ``heads`` heads, MLP width 4·width (Llama: 11/4·width rounded
    to a multiple of 8), ``vocab`` tokens, ``positions`` positions; dropout 0 and no KV cache, so that the
    outputs are deterministic in train mode. The weights are drawn under ``seed`` without touching the
    global random state. ValueError when transformers is missing or the family is unknown.
    """
    family = family.lower()
    if family not in HF_TINY:
        raise ValueError(f"unknown Hugging Face family {family!r}; known: {', '.join(HF_TINY)}")
    if min(layers, width, heads, vocab, positions) < 1 or width % heads:
        raise ValueError(f"hf:{family}: layers, width, heads, vocab and positions must be positive and width a "
                         f"multiple of heads (got layers={layers}, width={width}, heads={heads})")
    tf = _import("transformers", f"hf:{family}")
    if family == "gpt2":
        config = tf.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=positions,
                               vocab_size=vocab, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        cls = tf.GPT2LMHeadModel
    elif family in ("bert", "bert-mlm"):
        config = tf.BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                               intermediate_size=4 * width, vocab_size=vocab, max_position_embeddings=positions,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cls = tf.BertModel if family == "bert" else tf.BertForMaskedLM
    else:
        config = tf.LlamaConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                                num_key_value_heads=max(1, heads // 2), intermediate_size=8 * round(11 * width / 32),
                                vocab_size=vocab, max_position_embeddings=positions, use_cache=False,
                                bos_token_id=0, eos_token_id=0, pad_token_id=None)
        cls = tf.LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval()


def _factory(spec: str) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise ValueError(f"model {spec!r}: could not import {module_name!r} ({_first_line(err)})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    try:
        made = factory()
    except Exception as err:
        raise ValueError(f"model {spec!r}: the factory raised {_first_line(err)}") from err
    example = None
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
        if not isinstance(example, torch.Tensor):
            raise ValueError(f"model {spec!r}: the example input must be a tensor, got {type(example).__name__}")
    if not isinstance(made, nn.Module):
        raise ValueError(f"model {spec!r}: the factory must return an nn.Module or (nn.Module, example input), "
                         f"got {type(made).__name__}")
    return LoadedModel(made, example=example, description=spec)


def _timm(name: str, input_size: int | None) -> LoadedModel:
    timm = _import("timm", f"timm:{name}")
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as err:
        raise ValueError(f"timm:{name}: {_first_line(err)}") from err
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    shape = tuple(cfg.get("input_size", (3, 224, 224)))
    if input_size:
        shape = (shape[0], input_size, input_size)
    return LoadedModel(model.eval(), shape=shape, description=f"timm:{name}")


def load_model_spec(spec: str, *, input_size: int | None = None, tokens: int = 16,
                    input_shape: tuple[int, ...] | None = None,
                    builtin: Callable[[str], LoadedModel] | None = None) -> LoadedModel:
    """The model a spec names, and how to make its inputs (see the module docstring).

    ``builtin(spec)`` builds the library's own architectures and saved folders (the CLI passes its own,
    which knows their options); ``input_shape`` (without the batch axis) overrides the input shape of
    float models; ``tokens`` is the sequence length for ``hf:`` models. ValueError for anything else.
    """
    spec = spec.strip()
    if builtin is not None and (Path(spec).exists() or ":" not in spec):
        loaded = builtin(spec)
    elif spec.startswith("timm:"):
        loaded = _timm(spec[5:], input_size)
    elif spec.startswith("hf:"):
        family = spec[3:].lower()
        model = hf_tiny(family)
        loaded = LoadedModel(model, kind="tokens", shape=(tokens,), vocab=model.config.vocab_size,
                             description=f"{spec} (tiny random {type(model).__name__})")
    elif ":" in spec and all(p.isidentifier() for p in spec.split(":", 1)[0].split(".")) \
            and spec.split(":", 1)[1].isidentifier():
        loaded = _factory(spec)
    else:
        raise ValueError(f"{spec!r} is neither a saved model folder, an architecture, timm:NAME, "
                         f"hf:{{{','.join(HF_TINY)}}} nor package.module:factory")
    if input_shape is not None and loaded.kind == "float" and loaded.example is None:
        loaded.shape = tuple(input_shape)
    return loaded


__all__ = ["HF_TINY", "LoadedModel", "hf_tiny", "load_model_spec"]
