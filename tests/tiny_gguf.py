"""A tiny Llama GGUF file written on the fly from a tiny Hugging Face model (tests/tiny.py).

Written with the ``gguf`` package the way llama.cpp's converter lays a Llama model out: tensor names
``token_embd`` / ``blk.{i}.attn_q`` ..., the query and key rows permuted per head for its rotary
layout, a byte-level ("gpt2") vocabulary with control tokens, and the chat template. Converting it
back must give the original model's logits and tokenization exactly.
"""

from __future__ import annotations

from pathlib import Path

# Hugging Face name inside a decoder layer -> GGUF name inside a block
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _rotary_permute(weight, heads: int):
    """Rows of each head reordered from halves to interleaved pairs (llama.cpp's q/k layout)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(hf_dir: str | Path, out: str | Path) -> Path:
    """Write the Llama model saved in ``hf_dir`` (float32, untied head) as a GGUF file ``out``."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    c = model.config
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    # one real merge ("a" + "b") so the vocabulary is a valid BPE, then unused slots up to vocab_size
    tokens += ["ab"] + [f"<unused{i}>" for i in range(c.vocab_size - len(tokens) - 1)]
    special = set(tok.all_special_tokens) | {"<|im_start|>", "<|im_end|>"}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control, 1 = normal
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_NAMES.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _rotary_permute(weight, c.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _rotary_permute(weight, c.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)
