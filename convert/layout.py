"""How Hugging Face tensors map onto glm-jax parameters, for both published layouts.

Each HF tensor is a stack, along its first dim, of one or more glm-jax parameters (the fused QKV
weight is [Q | K | V], the fused MLP input is [gate | up]). glm-jax keeps torch's orientation
([out..., in...]) and only splits dims, so every part is a reshape of its rows: conversion copies
bytes and never transposes.
"""

from __future__ import annotations

import dataclasses
import math

from glm_jax.config import GLMConfig

CHATGLM, GLM = "chatglm", "glm"
IGNORED = {CHATGLM: ("transformer.rotary_pos_emb.inv_freq",), GLM: ()}  # present, never used


@dataclasses.dataclass(frozen=True)
class Part:
    param: str                   # glm-jax flat name
    shape: tuple[int, ...]       # glm-jax shape
    hf_shape: tuple[int, ...]    # the same elements as HF stores them (rows first)

    @property
    def rows(self) -> int:
        return self.hf_shape[0]

    def to_param(self, block):
        """HF rows of this part -> the glm-jax array (numpy or jax)."""
        return block.reshape(self.shape)

    def to_hf(self, value):
        return value.reshape(self.hf_shape)


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str
    parts: tuple[Part, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].hf_shape
        return (sum(p.hf_shape[0] for p in self.parts), *first[1:])


def hf_tensors(config: GLMConfig, layout: str) -> list[HFTensor]:
    """Every HF tensor of a checkpoint of this config, in the layout's own order."""
    c = config
    h, d, hq, g, f, v = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads,
                         c.intermediate_size, c.vocab_size)

    def t(name, *parts):
        return HFTensor(name, tuple(Part(*p) for p in parts))

    def linear(param, out_dims, in_dims):  # torch [out, in] split into glm-jax [*out_dims, *in_dims]
        return param, (*out_dims, *in_dims), (math.prod(out_dims), math.prod(in_dims))

    def vector(param, dims):               # stored flat by HF
        return param, dims, (math.prod(dims),)

    def layer(i, names):
        p = f"layers.{i}."
        q, k, vv = (linear(p + "attn.q_proj", (hq, d), (h,)), linear(p + "attn.k_proj", (g, d), (h,)),
                    linear(p + "attn.v_proj", (g, d), (h,)))
        qb, kb, vb = (vector(p + "attn.q_bias", (hq, d)), vector(p + "attn.k_bias", (g, d)),
                      vector(p + "attn.v_bias", (g, d)))
        gate_up = linear(p + "mlp.gate_up_proj", (2, f), (h,))   # HF's [gate | up] rows, stacked
        out = [t(names["in_norm"], vector(p + "input_norm.weight", (h,)))]
        if layout == CHATGLM:
            out.append(t(names["qkv"] + ".weight", q, k, vv))
            if c.qkv_bias:
                out.append(t(names["qkv"] + ".bias", qb, kb, vb))
        else:
            for proj, w, b in (("q", q, qb), ("k", k, kb), ("v", vv, vb)):
                out.append(t(names["qkv"] + f".{proj}_proj.weight", w))
                if c.qkv_bias:
                    out.append(t(names["qkv"] + f".{proj}_proj.bias", b))
        out += [
            t(names["o"], linear(p + "attn.o_proj", (h,), (hq, d))),
            t(names["post_norm"], vector(p + "post_attn_norm.weight", (h,))),
            t(names["gate_up"], gate_up),
            t(names["down"], linear(p + "mlp.down_proj", (h,), (f,))),
        ]
        return out

    if layout == CHATGLM:
        pre = "transformer.encoder.layers.{}."
        names = dict(in_norm="input_layernorm.weight", qkv="self_attention.query_key_value",
                     o="self_attention.dense.weight", post_norm="post_attention_layernorm.weight",
                     gate_up="mlp.dense_h_to_4h.weight", down="mlp.dense_4h_to_h.weight")
        head = [t("transformer.embedding.word_embeddings.weight", linear("embed", (v,), (h,)))]
        tail = [t("transformer.encoder.final_layernorm.weight", vector("final_norm.weight", (h,))),
                t("transformer.output_layer.weight", linear("lm_head", (v,), (h,)))]
    elif layout == GLM:
        pre = "model.layers.{}."
        names = dict(in_norm="input_layernorm.weight", qkv="self_attn", o="self_attn.o_proj.weight",
                     post_norm="post_attention_layernorm.weight", gate_up="mlp.gate_up_proj.weight",
                     down="mlp.down_proj.weight")
        head = [t("model.embed_tokens.weight", linear("embed", (v,), (h,)))]
        tail = [t("model.norm.weight", vector("final_norm.weight", (h,))),
                t("lm_head.weight", linear("lm_head", (v,), (h,)))]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    layers = []
    for i in range(c.num_layers):
        prefixed = {k: pre.format(i) + n for k, n in names.items()}
        layers += layer(i, prefixed)
    return head + layers + tail


def hf_config(config: GLMConfig, layout: str) -> dict:
    """A Hugging Face config.json for this config, in the given layout."""
    c = config
    if layout == CHATGLM:
        return {
            "model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "add_bias_linear": False, "add_qkv_bias": c.qkv_bias,
            "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
            "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
            "ffn_hidden_size": c.intermediate_size, "fp32_residual_connection": False,
            "hidden_dropout": 0.0, "hidden_size": c.hidden_size, "kv_channels": c.head_dim,
            "layernorm_epsilon": c.rms_norm_eps, "multi_query_attention": True,
            "multi_query_group_num": c.num_kv_heads, "num_attention_heads": c.num_heads,
            "num_hidden_layers": c.num_layers, "num_layers": c.num_layers,
            "rope_ratio": c.rope_theta / 10000.0, "original_rope": True,
            "padded_vocab_size": c.vocab_size, "post_layer_norm": True, "rmsnorm": True,
            "seq_length": c.max_seq_len, "use_cache": True, "torch_dtype": c.dtype,
            "tie_word_embeddings": False, "eos_token_id": list(c.eos_token_ids),
            "pad_token_id": c.pad_token_id,
        }
    if layout == GLM:
        return {
            "model_type": "glm", "architectures": ["GlmForCausalLM"], "attention_bias": c.qkv_bias,
            "attention_dropout": 0.0, "head_dim": c.head_dim, "hidden_act": "silu",
            "hidden_size": c.hidden_size, "initializer_range": 0.02,
            "intermediate_size": c.intermediate_size, "max_position_embeddings": c.max_seq_len,
            "num_attention_heads": c.num_heads, "num_hidden_layers": c.num_layers,
            "num_key_value_heads": c.num_kv_heads, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "partial_rotary_factor": c.partial_rotary_factor,
            "tie_word_embeddings": False, "vocab_size": c.vocab_size, "torch_dtype": c.dtype,
            "eos_token_id": list(c.eos_token_ids), "pad_token_id": c.pad_token_id, "use_cache": True,
        }
    raise ValueError(f"unknown layout {layout!r}")
