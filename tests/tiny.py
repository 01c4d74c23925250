"""Tiny random models of every supported family, saved as Hugging Face folders on the fly.

Shared by the tests and the benchmarks. Each model has hidden size 64, a few layers, a byte-level
tokenizer with a ChatML-style template, and is saved with a small ``max_shard_size`` so that one
layer spans several shards. Norm weights are randomized so that gains are never trivially one.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HIDDEN = 64
VOCAB = 300  # 256 bytes + special tokens, rounded up

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
)


def _config(family: str, layers: int):
    import transformers as tf

    c = dict(_COMMON, num_hidden_layers=layers)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if family == "llama":
        return tf.LlamaConfig(intermediate_size=128, **c)
    if family == "mistral":
        return tf.MistralConfig(intermediate_size=128, **c)
    if family == "qwen2":
        return tf.Qwen2Config(intermediate_size=128, **c)
    if family == "qwen3":
        return tf.Qwen3Config(intermediate_size=128, head_dim=16, **c)
    if family == "phi3":
        return tf.Phi3Config(intermediate_size=128, **c)
    if family == "gemma2":
        return tf.Gemma2Config(intermediate_size=128, head_dim=16, **c)
    if family == "gemma3":
        return tf.Gemma3TextConfig(intermediate_size=128, head_dim=16, **c)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=128, shared_expert_intermediate_size=48, **moe, **c)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=128, head_dim=16, **moe, **c)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, **c)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=32, num_experts=4, num_experts_per_tok=2, **c)
    if family in ("deepseek_v2", "deepseek_v3"):
        cls = tf.DeepseekV2Config if family == "deepseek_v2" else tf.DeepseekV3Config
        extra = dict(
            intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
        )
        c["num_key_value_heads"] = 4  # multi-head latent attention: as many KV heads as heads
        return cls(**extra, **c)
    if family == "gpt_oss":
        return tf.GptOssConfig(
            intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
            sliding_window=16, **c,
        )
    if family == "llama4":
        return tf.Llama4TextConfig(
            intermediate_size=48, intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1,
            head_dim=16, interleave_moe_layer_step=1, **c,
        )
    if family == "qwen3_next":
        return tf.Qwen3NextConfig(
            intermediate_size=128, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
            shared_expert_intermediate_size=48, full_attention_interval=2, **moe, **c,
        )
    raise ValueError(f"unknown family {family}")


FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "qwen2_moe", "qwen3_moe",
    "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4", "qwen3_next",
)


def make_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte) plus chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(family: str, path: str | Path, layers: int = 3, seed: int = 0, dtype: str = "float32",
               max_shard_size: str = "200KB", chat_template: bool = True, **overrides):
    """Build a random ``family`` model, randomize its norm weights, save it (model + tokenizer).

    ``overrides``: config attributes to change (e.g. ``intermediate_size=64``)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family, layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                # Gemma-style norms store (gain - 1): random around 0.3; others random around 1.
                base = 0.3 if family.startswith("gemma") else 1.0
                param.copy_(base + 0.5 * torch.rand_like(param))
            elif param.ndim >= 1 and param.abs().sum() == 0 and "bias" in name:
                param.copy_(0.02 * torch.randn_like(param))
    model = model.to(getattr(torch, dtype))
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer = make_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(path)
    return path
