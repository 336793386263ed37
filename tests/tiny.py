"""Tiny random Hugging Face models built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch

ARCHITECTURES = {
    "llama2": dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0),
    "llama3": dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0),
    "llama3.1": dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}),
    "llama3.2": dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                     tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"],
                    rope_theta=1000000.0, sliding_window=None),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0,
                  rms_norm_eps=1e-6),
    # head_dim 16 != hidden / heads (32 / 4), as Qwen3's own (e.g. 4B: 2560 / 32 heads, 128);
    # tied embeddings as the small Qwen3s
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1000000.0,
                  rms_norm_eps=1e-6, head_dim=16, tie_word_embeddings=True),
}


def tiny_hf_config(arch: str = "llama3", **overrides) -> dict:
    """config.json of a tiny model: 4 layers, GQA (4 heads, 2 groups), vocab 100 (padding needed)."""
    config = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                  rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                  torch_dtype="float32")
    config.update(ARCHITECTURES[arch])
    config.update(overrides)
    return config


def tiny_hf_model(config: dict, seed: int = 0):
    """A random fp32 HF causal LM in eval mode; norm weights randomised so their mapping shows."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()
