"""Benchmark: issue 18's zoo target, measured on our own zoo of torchvision, timm and transformers architectures.

Every model is built with random weights (no download), in a tiny or small configuration, in float64, and
then, in order:

* ``symmetry_spec(model, x, check=False)`` and ``symmetry_spec(model, x, check=True)``: a **refusal** is a
  ValueError, a **crash** any other exception (both with their message), and the time of each call (with its
  ratio to one eval-mode forward of the same input, timed in the same process).
* **wrong**: for the spec *as derived* (check=False), one random element of each space alone is applied and the
  outputs compared in eval mode, and in train mode when the model has batch-norm running statistics (a
  train-mode forward, then eval with the updated statistics; dropout off, the same random state for both
  forwards); a space is wrong when the relative output error max|f'(x) - f(x)| / max|f(x)| exceeds 1e-9, or 1e-5
  when the captured graph casts to float32 inside (``spec.lower_precision_inside``). An element that cannot be
  applied is wrong too (with the exception). The all-spaces element of the check=True spec is compared as well.
* **safety pins**: spaces of the check=True spec whose reason says "safety check" (each is a rule bug).
* **heads**: attention blocks of the check=True spec whose heads permute, of all its attention blocks (heads kept
  in place do not show in the moved share: the projections still move through the per-head maps).
* **moved**: the share of parameter elements (tied parameters once) that one random element of the check=True
  spec changes at all (``new != old``); **reach**: changed by at least one of three elements (what the spec can
  move, apart from a permutation's fixed points). The parameters with the most unmoved elements are listed
  (layer indices folded to ``*``); ``const`` marks a parameter whose elements are all equal, which no
  permutation can change (only with ``--default-init``: by default every constant-initialised parameter --
  norm gains and biases, zero biases, layer scales, class tokens -- and every batch-norm running statistic is
  made random first, so that the share measures the symmetries, not the initialisation).

Each model runs in a worker process that is restarted after a crash or a timeout, so one failure never stops
the run. The summary line gives each target of issue 18: 0 wrong, 0 crashes, 0 refusals, 0 safety pins,
moved >= 95% on average and >= 80% on every model (a model that fails counts as 0% moved).

Needs torchvision, timm and transformers (the scratch venv /work/zoo-venv has them); measure a tree by putting
its ``src`` first on the path::

    PYTHONPATH=src /work/zoo-venv/bin/python benchmarks/bench_zoo.py [--family tv timm hf] [--only NAME ...]
        [--json out.json] [--timeout 240] [--default-init] [--reasons] [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import traceback
import types

# torchvision's CUDA wheel beside a CPU torch: its two registration modules must not run (the scratch venv's hack)
for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_name, types.ModuleType(_name))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from intertwiners.symmetries.compare import FLOOR_FACTOR  # noqa: E402 - rounding: the safety check's factor

RTOL, RTOL_F32 = 1e-9, 1e-5
BATCH = 2
TOKENS = 12
VOCAB = 100


# ----------------------------------------------------------------------------------------------------------------
# the zoo: name -> builder() -> (model, example input); built in float32 under a fixed seed, made float64 later


def _img(side: int, channels: int = 3):
    return torch.randn(BATCH, channels, side, side)


def _tv(fn: str, side: int = 64, **kw):
    def build():
        import torchvision

        return getattr(torchvision.models, fn)(num_classes=10, **kw), _img(side)
    return build


def _tv_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=128, mlp_dim=256,
                             num_classes=10), _img(32)


def _tv_maxvit():
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=32, partition_size=4, block_channels=[32, 64],
                  block_layers=[1, 1], head_dim=16, stochastic_depth_prob=0.0, num_classes=10), _img(64)


def _tv_wide_resnet():
    from torchvision.models.resnet import Bottleneck, ResNet

    # wide_resnet50_2's block (width_per_group=128) at depth [1, 1, 1, 1]: the full model has 69M parameters
    return ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=10), _img(64)


def _timm(name: str, side: int = 64, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw), _img(side)
    return build


def _timm_mixer(block: str | None = None, norm: str | None = None, mlp_layer: str | None = None, **kw):
    """timm's MLP-Mixer family with 2 blocks (mixer_s16 / resmlp_12 / gmlp_ti16 fix the depth in their
    factories): 64x64 images in 16x16 patches."""
    from timm.layers import GatedMlp
    from timm.models import mlp_mixer as mm

    if block:
        kw["block_layer"] = getattr(mm, block)
    if norm:
        kw["norm_layer"] = getattr(mm, norm)
    if mlp_layer:
        kw["mlp_layer"] = GatedMlp
    return mm.MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, **kw), _img(64)


TV = {
    "tv_resnet18": _tv("resnet18"),
    "tv_resnet50": _tv("resnet50"),
    "tv_resnext50_32x4d": _tv("resnext50_32x4d"),
    "tv_wide_resnet50_2": _tv_wide_resnet,
    "tv_mobilenet_v2": _tv("mobilenet_v2"),
    "tv_mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv_mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "tv_efficientnet_b0": _tv("efficientnet_b0"),
    "tv_efficientnet_v2_s": _tv("efficientnet_v2_s"),
    "tv_regnet_x_400mf": _tv("regnet_x_400mf"),
    "tv_regnet_y_400mf": _tv("regnet_y_400mf"),
    "tv_densenet121": _tv("densenet121"),
    "tv_shufflenet_v2_x1_0": _tv("shufflenet_v2_x1_0"),
    "tv_squeezenet1_1": _tv("squeezenet1_1"),
    "tv_mnasnet0_5": _tv("mnasnet0_5"),
    "tv_convnext_tiny": _tv("convnext_tiny"),
    "tv_vit": _tv_vit,
    "tv_swin_t": _tv("swin_t"),
    "tv_swin_v2_t": _tv("swin_v2_t"),
    "tv_maxvit": _tv_maxvit,
    "tv_googlenet": _tv("googlenet", aux_logits=False, init_weights=True),
    "tv_inception_v3": _tv("inception_v3", 80, aux_logits=False, init_weights=True),
}

_VIT = dict(img_size=32, patch_size=8, depth=2)
TIMM = {
    "timm_vit_tiny": _timm("vit_tiny_patch16_224", 32, **_VIT),
    "timm_deit_tiny_distilled": _timm("deit_tiny_distilled_patch16_224", 32, **_VIT),
    "timm_beit": _timm("beit_base_patch16_224", 32, **_VIT, embed_dim=64, num_heads=4),
    "timm_cait": _timm("cait_xxs24_224", 32, **_VIT, depth_token_only=1),
    "timm_xcit_nano": _timm("xcit_nano_12_p16_224", 32, **_VIT),
    "timm_levit_128s": _timm("levit_128s", img_size=64),
    "timm_mixer": lambda: _timm_mixer(embed_dim=512),
    "timm_resmlp": lambda: _timm_mixer("ResBlock", "Affine", embed_dim=384, mlp_ratio=4),
    "timm_gmlp": lambda: _timm_mixer("SpatialGatingBlock", mlp_layer="GatedMlp", embed_dim=128, mlp_ratio=6),
    "timm_convnext_atto": _timm("convnext_atto"),
    "timm_convnextv2_atto": _timm("convnextv2_atto"),
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
    "timm_mobilevit_xxs": _timm("mobilevit_xxs"),
    "timm_coatnet_nano": _timm("coatnet_nano_rw_224", img_size=64),
    "timm_maxvit_tiny": _timm("maxvit_tiny_rw_224", img_size=64),
    "timm_poolformer_s12": _timm("poolformer_s12"),
    "timm_pvt_v2_b0": _timm("pvt_v2_b0"),
    "timm_edgenext_xx_small": _timm("edgenext_xx_small"),
    "timm_nf_resnet26": _timm("nf_resnet26"),
    "timm_nfnet_l0": _timm("nfnet_l0"),
    "timm_resnetv2_50x1_bit": _timm("resnetv2_50x1_bit"),
    "timm_regnetz_b16": _timm("regnetz_b16"),
    "timm_eva02_tiny": _timm("eva02_tiny_patch14_224", 28, img_size=28, depth=2),
    "timm_ghostnet_100": _timm("ghostnet_100"),
    "timm_dla34": _timm("dla34"),
    "timm_hrnet_w18_small": _timm("hrnet_w18_small"),
    "timm_res2net50_26w_4s": _timm("res2net50_26w_4s"),
    "timm_skresnet18": _timm("skresnet18"),
    "timm_gcvit_xxtiny": _timm("gcvit_xxtiny", img_size=64),
    "timm_swin_tiny": _timm("swin_tiny_patch4_window7_224", 56, img_size=56, depths=(1, 1, 1, 1)),
    "timm_volo_d1": _timm("volo_d1_224", img_size=64),
    "timm_twins_svt_small": _timm("twins_svt_small", img_size=64, depths=(1, 1, 1, 1)),
    "timm_crossvit_tiny": _timm("crossvit_tiny_240", 120, img_size=120),
    "timm_repvgg_a0": _timm("repvgg_a0"),
    "timm_rexnet_100": _timm("rexnet_100"),
    "timm_inception_next_atto": _timm("inception_next_atto"),
    "timm_fastvit_t8": _timm("fastvit_t8"),
}


def _hf_ids(vocab: int = VOCAB, tokens: int = TOKENS):
    return torch.randint(3, vocab, (BATCH, tokens))


def _causal(config_cls: str, model_cls: str, **kw):
    def build():
        import transformers as tf

        config = getattr(tf, config_cls)(vocab_size=VOCAB, use_cache=False, bos_token_id=0, eos_token_id=0,
                                         pad_token_id=None, **kw)
        return getattr(tf, model_cls)(config), (_hf_ids(),)
    return build


_DEC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64)
_ENC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _encoder(config_cls: str, model_cls: str, **kw):
    def build():
        import transformers as tf

        config = getattr(tf, config_cls)(vocab_size=VOCAB, **{**_ENC, **kw})
        return getattr(tf, model_cls)(config), (_hf_ids(),)
    return build


def _hf_seq2seq(config_cls: str, model_cls: str, **kw):
    def build():
        import transformers as tf

        config = getattr(tf, config_cls)(vocab_size=VOCAB, use_cache=False, pad_token_id=1, bos_token_id=0,
                                         eos_token_id=2, decoder_start_token_id=0, **kw)
        return getattr(tf, model_cls)(config), {"input_ids": _hf_ids(), "decoder_input_ids": _hf_ids(tokens=7)}
    return build


def _hf_audio(config_cls: str, model_cls: str):
    def build():
        import transformers as tf

        config = getattr(tf, config_cls)(
            vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0, apply_spec_augment=False)
        return getattr(tf, model_cls)(config), (torch.randn(BATCH, 4000),)
    return build


def _hf_whisper():
    import transformers as tf

    config = tf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, encoder_layers=2, decoder_layers=2, d_model=64,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                              decoder_ffn_dim=128, max_source_positions=16, max_target_positions=32, use_cache=False,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                              begin_suppress_tokens=None, suppress_tokens=None)
    return tf.WhisperForConditionalGeneration(config), {"input_features": torch.randn(BATCH, 16, 32),
                                                        "decoder_input_ids": _hf_ids(tokens=7)}


def _hf_clip():
    import transformers as tf

    config = tf.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=32, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=8),
        projection_dim=48)
    return tf.CLIPModel(config), {"input_ids": _hf_ids(), "pixel_values": _img(32)}


def _hf_vision(config_cls: str, model_cls: str, side: int = 32, **kw):
    def build():
        import transformers as tf

        return getattr(tf, model_cls)(getattr(tf, config_cls)(num_labels=10, **kw)), _img(side)
    return build


def _hf_mamba():
    import transformers as tf

    config = tf.MambaConfig(vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                            conv_kernel=4, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    return tf.MambaForCausalLM(config), (_hf_ids(),)


HF = {
    "hf_gpt2": _causal("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=4, n_positions=64,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "hf_gpt_neo": _causal("GPTNeoConfig", "GPTNeoForCausalLM", hidden_size=64, num_layers=2, num_heads=4,
                          attention_types=[[["global", "local"], 1]], window_size=8, max_position_embeddings=64),
    "hf_gptj": _causal("GPTJConfig", "GPTJForCausalLM", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64),
    "hf_gpt_neox": _causal("GPTNeoXConfig", "GPTNeoXForCausalLM", **_DEC),
    "hf_bloom": _causal("BloomConfig", "BloomForCausalLM", hidden_size=64, n_layer=2, n_head=4),
    "hf_opt": _causal("OPTConfig", "OPTForCausalLM", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64),
    "hf_llama": _causal("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, **_DEC),
    "hf_mistral": _causal("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=8, **_DEC),
    "hf_qwen2": _causal("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, **_DEC),
    "hf_qwen3": _causal("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16, **_DEC),
    "hf_gemma": _causal("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=16, **_DEC),
    "hf_gemma2": _causal("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=16, sliding_window=8,
                         **_DEC),
    "hf_phi": _causal("PhiConfig", "PhiForCausalLM", **_DEC),
    "hf_phi3": _causal("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, **_DEC),
    "hf_falcon": _causal("FalconConfig", "FalconForCausalLM", hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4),
    "hf_mpt": _causal("MptConfig", "MptForCausalLM", d_model=64, n_heads=4, n_layers=2, max_seq_len=64),
    "hf_codegen": _causal("CodeGenConfig", "CodeGenForCausalLM", n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                          n_positions=64, n_ctx=64),
    "hf_xglm": _causal("XGLMConfig", "XGLMForCausalLM", d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                       max_position_embeddings=64),
    "hf_stablelm": _causal("StableLmConfig", "StableLmForCausalLM", num_key_value_heads=2, **_DEC),
    "hf_mixtral": _causal("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
                          num_experts_per_tok=2, experts_implementation="eager", **_DEC),
    "hf_qwen2_moe": _causal("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                            experts_implementation="eager", **_DEC),
    "hf_mamba": _hf_mamba,
    "hf_bert": _encoder("BertConfig", "BertForMaskedLM"),
    "hf_roberta": _encoder("RobertaConfig", "RobertaForMaskedLM", pad_token_id=1),
    "hf_distilbert": _encoder("DistilBertConfig", "DistilBertForSequenceClassification", dim=64, n_layers=2,
                              n_heads=4, hidden_dim=128, dropout=0.0, attention_dropout=0.0),
    "hf_albert": _encoder("AlbertConfig", "AlbertForMaskedLM", embedding_size=32),
    "hf_electra": _encoder("ElectraConfig", "ElectraForMaskedLM", embedding_size=32),
    "hf_deberta_v2": _encoder("DebertaV2Config", "DebertaV2ForMaskedLM", relative_attention=True,
                              position_buckets=16, max_relative_positions=32, pos_att_type=["p2c", "c2p"]),
    "hf_deberta": _encoder("DebertaConfig", "DebertaForMaskedLM", relative_attention=True, max_relative_positions=32,
                           pos_att_type=["p2c", "c2p"]),
    "hf_mobilebert": _encoder("MobileBertConfig", "MobileBertForMaskedLM", embedding_size=32, intra_bottleneck_size=32,
                              true_hidden_size=32, num_feedforward_networks=2),
    "hf_xlnet": _causal("XLNetConfig", "XLNetLMHeadModel", d_model=64, n_layer=2, n_head=4, d_inner=128, dropout=0.0),
    "hf_big_bird": _encoder("BigBirdConfig", "BigBirdForMaskedLM", attention_type="original_full"),
    "hf_t5": _hf_seq2seq("T5Config", "T5ForConditionalGeneration", d_model=64, d_kv=16, d_ff=128, num_layers=2,
                         num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8),
    "hf_bart": _hf_seq2seq("BartConfig", "BartForConditionalGeneration", d_model=64, encoder_layers=2,
                           decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, dropout=0.0),
    "hf_wav2vec2": _hf_audio("Wav2Vec2Config", "Wav2Vec2ForCTC"),
    "hf_hubert": _hf_audio("HubertConfig", "HubertForCTC"),
    "hf_whisper": _hf_whisper,
    "hf_vit": _hf_vision("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, hidden_size=64,
                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "hf_swin": _hf_vision("SwinConfig", "SwinForImageClassification", 32, image_size=32, patch_size=2, embed_dim=32,
                          depths=[1, 1], num_heads=[2, 4], window_size=4),
    "hf_clip": _hf_clip,
}

DEFAULT_FLOAT64 = {"hf_xglm"}
"""Models that only run in float64 with torch's default dtype float64 (XGLM fills its attention mask with
``torch.full((), finfo(float64).min)`` in the default dtype)."""

FAMILIES = {"tv": TV, "timm": TIMM, "hf": HF}
ZOO = {**TV, **TIMM, **HF}


def family_of(name: str) -> str:
    return next(f for f, zoo in FAMILIES.items() if name in zoo)


# ----------------------------------------------------------------------------------------------------------------
# comparison of a model and its transformed copy (written here so that the harness does not depend on how the
# library's own verifier is organised)

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextlib.contextmanager
def no_dropout():
    """Functional dropout and the attention dropout of scaled_dot_product_attention switched off."""
    orig_dropout, orig_sdpa = F.dropout, F.scaled_dot_product_attention

    def dropout(x, p=0.5, training=True, inplace=False):
        return orig_dropout(x, 0.0, False, inplace)

    def sdpa(*args, **kwargs):
        args = list(args)
        if len(args) > 4:
            args[4] = 0.0
        else:
            kwargs["dropout_p"] = 0.0
        return orig_sdpa(*args, **kwargs)

    F.dropout, F.scaled_dot_product_attention = dropout, sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = orig_dropout, orig_sdpa


def output_tensors(y) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict, transformers ModelOutput), in order."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in output_tensors(v)]
    if isinstance(y, list | tuple):
        return [t for v in y for t in output_tensors(v)]
    if hasattr(y, "to_tuple"):
        return output_tensors(y.to_tuple())
    return []


def call(model: nn.Module, x):
    return model(**x) if isinstance(x, dict) else model(*x) if isinstance(x, tuple) else model(x)


@torch.no_grad()
def forward(model: nn.Module, x, train: bool):
    """Dropout off; a fixed random state, so that stochastic depth drops the same samples in both models."""
    model.train(train)
    for m in model.modules():
        if isinstance(m, _DROPOUTS):
            m.eval()
    try:
        with torch.random.fork_rng(devices=[]), no_dropout():
            torch.manual_seed(0)
            return call(model, x)
    finally:
        model.eval()


def relative_error(a, b) -> float:
    """max|a - b| / max|a| over every floating output; NaN when the outputs do not match up or are not finite."""
    ta, tb = output_tensors(a), output_tensors(b)
    if len(ta) != len(tb):
        return math.nan
    err, scale = 0.0, 0.0
    for u, v in zip(ta, tb):
        if u.shape != v.shape:
            return math.nan
        if not u.is_floating_point():
            if not torch.equal(u, v):
                return math.inf
            continue
        if u.numel() == 0:
            continue
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            return math.nan
        err = max(err, float((u - v).abs().max()))
        scale = max(scale, float(u.abs().max()))
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


def has_running_stats(model: nn.Module) -> bool:
    return any(getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
               for m in model.modules())


def nanmax(values) -> float:
    out = 0.0
    for v in values:
        if math.isnan(v):
            return math.nan
        out = max(out, v)
    return out


@torch.no_grad()
def outputs(model: nn.Module, x, train: bool) -> dict:
    """The outputs to compare: {"eval": eval-mode output} and, with ``train``, {"train": a train-mode output,
    "after": the eval-mode output with the running statistics that train-mode forward left}. With ``train``
    the running statistics of ``model`` change: pass a copy you may modify."""
    out = {"eval": forward(model, x, False)}
    if train:
        out["train"] = forward(model, x, True)
        out["after"] = forward(model, x, False)
    return out


def output_error(reference: dict, new: nn.Module, x) -> dict[str, float]:
    """{"eval": error} and, when ``reference`` has train-mode outputs, {"train": the larger error of the
    train-mode forward and the eval forward after it}; ``new`` (a throw-away copy) is modified."""
    got = outputs(new, x, "train" in reference)
    out = {"eval": relative_error(reference["eval"], got["eval"])}
    if "train" in reference:
        out["train"] = nanmax([relative_error(reference["train"], got["train"]),
                               relative_error(reference["after"], got["after"])])
    return out


# ----------------------------------------------------------------------------------------------------------------
# one model


def first_line(err: BaseException, limit: int = 400) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {line[:limit]}"


def where(err: BaseException) -> str:
    """The innermost frame inside the intertwiners package (file:line function), for a crash."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "intertwiners" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename.split('intertwiners/')[-1]}:{f.lineno} {f.name}"


@torch.no_grad()
def randomize(model: nn.Module, generator: torch.Generator) -> None:
    """Make every constant-initialised parameter random (norm gains 1 + 0.3·N, zero biases 0.03·N, layer scales,
    class tokens) and batch-norm running statistics random, so that a permutation can change them."""
    for p in model.parameters():
        if p.is_floating_point() and p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
            c = float(p.reshape(-1)[0])
            p.add_(0.3 * max(abs(c), 0.1) * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(torch.exp(0.3 * torch.randn(m.running_var.shape, generator=generator)))


def to_double(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: to_double(v) for k, v in x.items()}
    return tuple(to_double(v) for v in x)


def fold(name: str) -> str:
    """A parameter name with its layer indices folded: ``blocks.3.attn.qkv.bias`` -> ``blocks.*.attn.qkv.bias``."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def changed_masks(model: nn.Module, new: nn.Module) -> dict[str, torch.Tensor]:
    """Per parameter of ``model`` (tied ones once), which elements ``new`` changed (a missing or reshaped
    parameter counts as all changed)."""
    new_params = dict(new.named_parameters())
    out = {}
    for name, p in model.named_parameters():
        q = new_params.get(name)
        out[name] = (torch.ones(p.shape, dtype=torch.bool) if q is None or q.shape != p.shape
                     else (q.detach() != p.detach()).cpu())
    return out


def kind_of(space) -> str:
    return str(getattr(space, "kind", "") or getattr(getattr(space, "group", None), "kind", ""))


def errors_text(errs: dict) -> str:
    return ", ".join(f"{m} {v:.2e}" for m, v in errs.items())


def moved_masks(model: nn.Module, spec, seeds) -> tuple[list[float], dict[str, torch.Tensor], nn.Module]:
    """Shares of parameter elements changed by one random element per seed, the union of the changed masks,
    and the copy made with the first seed."""
    from intertwiners.symmetries import apply_symmetry, random_symmetry

    shares, reach, first = [], None, None
    for seed in seeds:
        new = apply_symmetry(model, random_symmetry(spec, torch.Generator().manual_seed(seed)), spec)
        masks = changed_masks(model, new)
        total = sum(m.numel() for m in masks.values())
        shares.append(sum(int(m.sum()) for m in masks.values()) / max(total, 1))
        reach = masks if reach is None else {k: reach[k] | m for k, m in masks.items()}
        first = new if first is None else first
    return shares, reach, first


def unmoved_groups(model: nn.Module, reach: dict[str, torch.Tensor], top: int) -> list[dict]:
    """The parameter groups (layer indices folded) with the most elements no element changed."""
    params = dict(model.named_parameters())
    groups: dict[str, list] = {}
    for pname, m in reach.items():
        unmoved = m.numel() - int(m.sum())
        if unmoved:
            p = params[pname]
            const = bool((p == p.reshape(-1)[0]).all()) if p.numel() > 1 else False
            gr = groups.setdefault(fold(pname), [0, 0, tuple(p.shape), True])
            gr[0] += unmoved
            gr[1] += m.numel()
            gr[3] = gr[3] and const
    return [{"params": k, "unmoved": v[0], "of": v[1], "shape": list(v[2]), "const": v[3]}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]]


def measure(name: str, default_init: bool, top: int, per_space: bool = False) -> dict:
    from intertwiners.symmetries import apply_symmetry, random_symmetry, symmetry_spec
    from intertwiners.symmetries.compare import noise_floor  # the safety check judges rounding by the same floor

    row: dict = {"name": name, "family": family_of(name)}
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, x = ZOO[name]()
    except Exception as err:  # noqa: BLE001 - recorded as skipped with the reason
        row["status"] = "skipped"
        row["error"] = f"could not be built offline: {first_line(err)}"
        return row
    model = model.double().eval()
    x = to_double(x)
    for m in model.modules():
        if isinstance(m, _DROPOUTS):
            m.p = 0.0
    if not default_init:
        randomize(model, torch.Generator().manual_seed(1))
    row["t_build"] = time.perf_counter() - t0
    row["params"] = sum(p.numel() for p in model.parameters())
    train = has_running_stats(model)
    row["modes"] = ["eval", "train"] if train else ["eval"]
    try:
        forward(model, x, False)
        t0 = time.perf_counter()
        forward(model, x, False)
        row["t_forward"] = time.perf_counter() - t0
        reference = outputs(copy.deepcopy(model) if train else model, x, train)
        floor = noise_floor(model, x if isinstance(x, tuple | dict) else (x,), tuple(row["modes"]),
                            torch.Generator().manual_seed(3))
    except Exception as err:  # noqa: BLE001
        row["status"] = "skipped"
        row["error"] = f"the model does not run on its example input: {first_line(err)}"
        return row
    row["noise_floor"] = floor

    specs = {}
    for check in (False, True):
        key = "check" if check else "nocheck"
        t0 = time.perf_counter()
        try:
            specs[key] = symmetry_spec(model, x, check=check)
        except ValueError as err:
            row[f"refusal_{key}"] = first_line(err)
        except Exception as err:  # noqa: BLE001
            row[f"crash_{key}"] = first_line(err) + (f" [{where(err)}]" if where(err) else "")
        row[f"t_spec_{key}"] = time.perf_counter() - t0
    refused = any(k.startswith("refusal") for k in row)
    crashed = any(k.startswith("crash") for k in row)
    row["status"] = "crash" if crashed else "refusal" if refused else "ok"

    def judge(errs: dict, tol: float) -> str:
        """ok | wrong | rounding (above the tolerance, within FLOOR_FACTOR x the noise floor)."""
        if all(v <= tol for v in errs.values()):
            return "ok"
        if all(v <= max(tol, FLOOR_FACTOR * floor.get(m, 0.0)) for m, v in errs.items()):
            return "rounding"
        return "wrong"

    # the spec as derived (check=False): one random element of each space alone
    spec0 = specs.get("nocheck")
    row["wrong"], row["rounding"] = [], []
    if spec0 is not None:
        f32 = bool(getattr(spec0, "lower_precision_inside", False))
        tol = RTOL_F32 if f32 else RTOL
        row["f32_inside"] = f32
        row["spaces_nocheck"] = len(spec0.spaces)
        row["space_errors"], row["verify_applies"] = {}, 0
        elements = random_symmetry(spec0, torch.Generator().manual_seed(2))
        t0 = time.perf_counter()

        def check(names: list[str]) -> None:
            """Apply the elements of ``names`` together; when the outputs change, halve the group until the
            spaces that change them are found (every space alone with --per-space)."""
            row["verify_applies"] += 1
            try:
                errs = output_error(reference, apply_symmetry(model, {k: elements[k] for k in names}, spec0), x)
                verdict = judge(errs, tol)
            except Exception as err:  # noqa: BLE001 - an element that cannot be applied is wrong
                errs, verdict = None, f"apply failed: {first_line(err)}"
            if len(names) > 1 and verdict != "ok":
                check(names[: len(names) // 2])
                check(names[len(names) // 2:])
                return
            if errs is not None:
                row["space_errors"][names[0] if len(names) == 1 else f"<{len(names)} spaces together>"] = errs
            if verdict != "ok":
                space = spec0.spaces[names[0]]
                entry = {"space": names[0], "kind": kind_of(space), "size": space.size}
                if errs is None:
                    row["wrong"].append({**entry, "error": verdict})
                else:
                    row[verdict].append({**entry, "error": errors_text(errs)})

        for group in ([[k] for k in spec0.spaces] if per_space else [list(spec0.spaces)] if spec0.spaces else []):
            check(group)
        row["t_verify"] = time.perf_counter() - t0
        row["max_err_nocheck"] = nanmax(nanmax(e.values()) for e in row["space_errors"].values())
        try:
            shares0, _, _ = moved_masks(model, spec0, [10])
            row["moved_nocheck"] = shares0[0]
        except Exception as err:  # noqa: BLE001
            row["crash_apply_nocheck"] = first_line(err) + (f" [{where(err)}]" if where(err) else "")
            row["status"] = "crash"

    # the spec with the safety check: pins, and how much one random element moves
    spec1 = specs.get("check")
    if spec1 is not None:
        sizes = getattr(spec1, "pinned_sizes", {}) or {}
        row["spaces"] = len(spec1.spaces)
        attention = [s.group for s in spec1.spaces.values() if s.group.kind == "attention_heads"]
        row["heads"] = [sum(g.permute_heads for g in attention), len(attention)]
        row["pinned"] = {k: {"reason": str(v), "size": sizes.get(k)} for k, v in spec1.pinned.items()}
        row["safety_pins"] = [k for k, v in spec1.pinned.items() if "safety check" in str(v)]
        for k in row["safety_pins"]:  # the pinned space's own error as derived, when bisection did not reach it
            if spec0 is not None and k in spec0.spaces and k not in row["space_errors"]:
                with contextlib.suppress(Exception):
                    el = random_symmetry(spec0, torch.Generator().manual_seed(4))
                    row["space_errors"][k] = output_error(reference, apply_symmetry(model, {k: el[k]}, spec0), x)
        try:
            shares, reach, new = moved_masks(model, spec1, [10, 11, 12])
            errs = output_error(reference, new, x)
            row["err_all_check"] = nanmax(errs.values())
            tol = RTOL_F32 if getattr(spec1, "lower_precision_inside", False) else RTOL
            if judge(errs, tol) == "wrong":
                row["wrong"].append({"space": "<all spaces of the check=True spec>", "kind": "", "size": None,
                                     "error": errors_text(errs)})
            row["moved"] = shares[0]
            total = sum(m.numel() for m in reach.values())
            row["reach"] = sum(int(m.sum()) for m in reach.values()) / max(total, 1)
            row["unmoved_total"] = total - sum(int(m.sum()) for m in reach.values())
            row["unmoved"] = unmoved_groups(model, reach, top)
        except Exception as err:  # noqa: BLE001
            row["status"] = "crash"
            row["crash_apply"] = first_line(err) + (f" [{where(err)}]" if where(err) else "")
    return row


# ----------------------------------------------------------------------------------------------------------------
# worker processes: one at a time, restarted after a crash or a timeout

MARK = "@@zoo@@ "


def worker(names: list[str], default_init: bool, top: int, threads: int, per_space: bool) -> None:
    if threads:
        torch.set_num_threads(threads)
    for name in names:
        print(MARK + json.dumps({"start": name}), flush=True)
        torch.set_default_dtype(torch.float64 if name in DEFAULT_FLOAT64 else torch.float32)
        try:
            row = measure(name, default_init, top, per_space)
        except Exception as err:  # noqa: BLE001 - the harness itself failed on this model
            row = {"name": name, "family": family_of(name), "status": "crash",
                   "crash_harness": first_line(err) + f" [{where(err)}]"}
        torch.set_default_dtype(torch.float32)
        print(MARK + json.dumps({"row": row}, default=str), flush=True)


def last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [s.strip() for s in f if s.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_all(names: list[str], args, on_row=None) -> list[dict]:
    """Measure ``names`` in worker processes, one model at a time; a worker that dies or runs past
    ``args.timeout`` on a model is killed, the model recorded as a crash, and a new worker goes on."""
    rows: dict[str, dict] = {}
    todo = list(names)
    while todo:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--top", str(args.top), "--threads",
               str(args.threads), "--only", *todo] + (["--default-init"] if args.default_init else []) \
            + (["--per-space"] if args.per_space else [])
        log = f"{args.log_prefix}.{len(names) - len(todo)}.log"
        with open(log, "w") as err_file:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
        current, deadline = None, time.monotonic() + args.timeout + 120  # the first model waits for the imports
        while True:
            try:
                line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                line = "timeout"
            if line == "timeout" or line is None:
                if line == "timeout":
                    proc.kill()
                proc.wait()
                left = [n for n in todo if n not in rows]
                if line is None and current is None and len(left) < len(todo):
                    todo = left  # finished (or stopped between two models): go on with what is left
                    break
                victim = current or left[0]
                why = (f"timeout: more than {args.timeout:.0f} s" if line == "timeout"
                       else f"the worker process died (exit code {proc.returncode}): {last_line(log)}")
                rows[victim] = {"name": victim, "family": family_of(victim), "status": "crash", "crash_worker": why}
                print(f"{victim}: {why}", file=sys.stderr, flush=True)
                if on_row:
                    on_row(rows)
                todo = [n for n in todo if n not in rows]
                break
            if not line.startswith(MARK):
                continue
            msg = json.loads(line[len(MARK):])
            if "start" in msg:
                current, deadline = msg["start"], time.monotonic() + args.timeout
            else:
                rows[msg["row"]["name"]] = msg["row"]
                current = None
                print(brief(msg["row"]), file=sys.stderr, flush=True)
                if on_row:
                    on_row(rows)
        proc.wait()
    return [rows[n] for n in names]


# ----------------------------------------------------------------------------------------------------------------
# report


def brief(r: dict) -> str:
    if r["status"] == "skipped":
        return f"{r['name']}: skipped ({r['error']})"
    bits = [r["status"]]
    if "moved" in r:
        bits.append(f"moved {100 * r['moved']:.1f}%")
    for key, label in (("wrong", "wrong"), ("rounding", "over tolerance within rounding noise"),
                       ("safety_pins", "safety pins")):
        if r.get(key):
            bits.append(f"{len(r[key])} {label}")
    return f"{r['name']}: {', '.join(bits)}"


def fmt_pct(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, float) else "-"


def fmt_heads(v) -> str:
    """'2/3': attention blocks whose heads permute, of all attention blocks ('-' without any)."""
    return f"{v[0]}/{v[1]}" if v and v[1] else "-"


def table(rows: list[dict]) -> str:
    """One line per model; * marks a model whose graph computes in float32 inside (tolerance 1e-5); ``heads``:
    the attention blocks whose heads permute, of all (the moved share does not show heads kept in place: every
    projection still moves through its per-head maps and the stream's columns)."""
    head = (f"{'model':<26}{'params':>10}{'status':>9}{'spaces':>7}{'pins':>5}{'safety':>7}{'wrong':>6}{'noisy':>6}"
            f"{'moved':>8}{'reach':>8}{'heads':>7}{'max err':>9}{'floor':>9}{'spec s':>8}{'/fwd':>6}{'check s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"{r['name']:<26}  skipped: {r['error']}")
            continue
        t, tc = r.get("t_spec_nocheck"), r.get("t_spec_check")
        ratio = t / r["t_forward"] if t and r.get("t_forward") else None
        err = r.get("max_err_nocheck")
        floor = nanmax(r["noise_floor"].values()) if r.get("noise_floor") else None
        lines.append(
            f"{r['name'] + ('*' if r.get('f32_inside') else ''):<26}{r.get('params', 0):>10}{r['status']:>9}"
            f"{r.get('spaces', r.get('spaces_nocheck', '-')):>7}{len(r.get('pinned', {})):>5}"
            f"{len(r.get('safety_pins', [])):>7}{len(r.get('wrong', [])):>6}{len(r.get('rounding', [])):>6}"
            f"{fmt_pct(r.get('moved')):>8}{fmt_pct(r.get('reach')):>8}{fmt_heads(r.get('heads')):>7}"
            f"{(f'{err:.0e}' if err is not None else '-'):>9}{(f'{floor:.0e}' if floor is not None else '-'):>9}"
            f"{(f'{t:.1f}' if t else '-'):>8}{(f'{ratio:.0f}x' if ratio else '-'):>6}{(f'{tc:.1f}' if tc else '-'):>8}")
    return "\n".join(lines)


def details(rows: list[dict], reasons: bool) -> str:
    lines = []
    for r in rows:
        out = []
        for k in ("refusal_nocheck", "refusal_check", "crash_nocheck", "crash_check", "crash_apply_nocheck",
                  "crash_apply", "crash_harness", "crash_worker"):
            if k in r:
                out.append(f"  {k}: {r[k]}")
        for w in r.get("wrong", []):
            out.append(f"  WRONG {w['space']} ({w['kind']}, n={w['size']}): {w['error']}")
        floor = errors_text(r["noise_floor"]) if r.get("noise_floor") else ""
        for w in r.get("rounding", []):
            out.append(f"  over tolerance, within {FLOOR_FACTOR:.0f}x the noise floor ({floor}): {w['space']} "
                       f"({w['kind']}, n={w['size']}): {w['error']}")
        for k in r.get("safety_pins", []):
            derived = r.get("space_errors", {}).get(k)
            out.append(f"  SAFETY PIN {k} (n={r['pinned'][k]['size']}): {r['pinned'][k]['reason']}"
                       + (f" [check=False error: {errors_text(derived)}]" if derived else ""))
        if reasons:
            for k, v in r.get("pinned", {}).items():
                if k not in r.get("safety_pins", []):
                    out.append(f"  pinned {k} (n={v['size']}): {v['reason']}")
            for u in r.get("unmoved", []):
                out.append(f"  unmoved {u['unmoved']:>8} of {u['of']:>8} {u['params']} {tuple(u['shape'])}"
                           + (" (constant)" if u["const"] else ""))
        if out:
            lines.append(r["name"] + ":")
            lines.extend(out)
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    built = [r for r in rows if r["status"] != "skipped"]
    wrong = [r for r in built if r.get("wrong")]
    noisy = [r for r in built if r.get("rounding")]
    crash = [r for r in built if r["status"] == "crash"]
    refusal = [r for r in built if r["status"] == "refusal"]
    safety = [r for r in built if r.get("safety_pins")]
    moved = [r.get("moved", 0.0) for r in built]
    avg = sum(moved) / max(len(moved), 1)
    low = min(moved, default=0.0)
    low_name = min(built, key=lambda r: r.get("moved", 0.0))["name"] if built else "-"
    blocks = [r["heads"] for r in built if r.get("heads") and r["heads"][1]]
    in_place = [r for r in built if r.get("heads") and r["heads"][0] < r["heads"][1]]

    def met(ok):
        return "met" if ok else "NOT met"

    def names(rs):
        return f" ({', '.join(r['name'] for r in rs)})" if rs else ""

    return "\n".join([
        f"{len(built)} models measured, {len(rows) - len(built)} skipped",
        f"wrong symmetries: {sum(len(r['wrong']) for r in wrong)} spaces in {len(wrong)} models{names(wrong)} -- "
        f"target 0: {met(not wrong)}",
        f"  (over the tolerance but within {FLOOR_FACTOR:.0f}x the rounding-noise floor, not counted: "
        f"{sum(len(r['rounding']) for r in noisy)} spaces in {len(noisy)} models{names(noisy)})",
        f"crashes: {len(crash)}{names(crash)} -- target 0: {met(not crash)}",
        f"refusals: {len(refusal)}{names(refusal)} -- target 0: {met(not refusal)}",
        f"spaces pinned by the safety check: {sum(len(r['safety_pins']) for r in safety)} in {len(safety)} models"
        f"{names(safety)} -- target 0: {met(not safety)}",
        f"moved by one random element: {100 * avg:.1f}% on average (a failed model counts 0%) -- target >= 95%: "
        f"{met(avg >= 0.95)}; smallest {100 * low:.1f}% ({low_name}) -- target >= 80% on every model: "
        f"{met(low >= 0.8)}",
        f"attention blocks whose heads permute: {sum(b[0] for b in blocks)} of {sum(b[1] for b in blocks)}; "
        f"models with heads kept in place: {len(in_place)}{names(in_place)}",
    ])


def write_json(path: str, rows: list[dict], **extra) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rows": rows, **extra}, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="only these models (names as --list prints them)")
    p.add_argument("--family", nargs="*", choices=sorted(FAMILIES), default=None,
                   help="only these families: tv (torchvision), timm, hf (transformers)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write every row as JSON (rewritten after each model)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per model before its worker is killed")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the worker (0: torch's default)")
    p.add_argument("--default-init", action="store_true",
                   help="keep each library's initialisation (constant norm gains, zero biases, ...) instead of "
                        "making every constant parameter random")
    p.add_argument("--per-space", action="store_true",
                   help="check every space of the check=False spec on its own (default: all together, then halves "
                        "of a group whose outputs change, down to the spaces that change them)")
    p.add_argument("--top", type=int, default=6, help="unmoved parameter groups kept per model")
    p.add_argument("--reasons", action="store_true", help="print every pinned space and the unmoved parameters")
    p.add_argument("--list", action="store_true", help="print the zoo's names and exit")
    p.add_argument("--log-prefix", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(ZOO))
    if unknown:
        p.error(f"unknown models: {', '.join(unknown)} (see --list)")
    names = [n for n in ZOO if (args.family is None or family_of(n) in args.family)
             and (args.only is None or n in args.only)]
    if args.list:
        print("\n".join(f"{family_of(n):<5} {n}" for n in names))
        return
    if args.worker:
        worker(names, args.default_init, args.top, args.threads, args.per_space)
        return
    if args.log_prefix is None:
        import tempfile

        args.log_prefix = os.path.join(tempfile.mkdtemp(prefix="bench_zoo_"), "worker")
    t0 = time.perf_counter()
    extra = {"default_init": args.default_init, "pythonpath": os.environ.get("PYTHONPATH", "")}
    rows = run_all(names, args, on_row=(lambda done: write_json(args.json, list(done.values()), **extra))
                   if args.json else None)
    wall = time.perf_counter() - t0
    print(table(rows))
    print()
    text = details(rows, args.reasons)
    if text:
        print(text)
        print()
    print(summary(rows))
    init = "default initialisation" if args.default_init else "constant parameters made random"
    print(f"wall time {wall:.0f} s; {init}; worker logs: {os.path.dirname(args.log_prefix)}")
    if args.json:
        write_json(args.json, rows, wall_s=wall, **extra)


if __name__ == "__main__":
    main()
