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
    # Mistral v0.1 (and zephyr-7b, the SimPO base recipe's model): every layer slides; a window
    # of 8 that the tests' longer rows outgrow
    "mistral0.1": dict(model_type="mistral", architectures=["MistralForCausalLM"],
                       rope_theta=10000.0, sliding_window=8),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0,
                  rms_norm_eps=1e-6),
    # head_dim 16 != hidden / heads (32 / 4), as Qwen3's own (e.g. 4B: 2560 / 32 heads, 128);
    # tied embeddings as the small Qwen3s
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=1000000.0,
                  rms_norm_eps=1e-6, head_dim=16, tie_word_embeddings=True),
    # Gemma-2 with every feature showing at toy size: head_dim 16 != 32 / 4 and a
    # query_pre_attn_scalar of neither; a window of 8 (tests run longer rows), on layers that do
    # not alternate (a pipeline stage that numbered its layers locally would pick the wrong
    # ones); weights large enough (initializer_range) and caps small enough that both
    # soft-cappings bite (tests/test_model.py checks they do). No pad_token_id: transformers
    # builds the embedding with padding_idx = pad_token_id (Gemma's 0) and never gives that row
    # an input gradient; the random test tokens use id 0 as an ordinary token.
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], rope_theta=10000.0,
                   hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                   rms_norm_eps=1e-6, head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=8, attn_logit_softcapping=0.5, final_logit_softcapping=2.0,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                "sliding_attention"],
                   tie_word_embeddings=True, initializer_range=0.1, attn_implementation="eager",
                   pad_token_id=None),
    # Gemma-3 text: q/k norms, two RoPE bases (the sliding layers' local one, the full layers'
    # global one with linear scaling, as the 4B-27B releases), no soft-capping; window, layer
    # pattern, head_dim and query_pre_attn_scalar as the Gemma-2 config above.
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                   rope_theta=10000.0, rope_local_base_freq=100.0,
                   rope_scaling={"rope_type": "linear", "factor": 8.0},
                   hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                   rms_norm_eps=1e-6, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                "sliding_attention"],
                   tie_word_embeddings=True, initializer_range=0.02, attn_implementation="eager",
                   pad_token_id=None),
}

# Mixture of experts (tests/test_moe.py): 4 experts, top-2. Qwen3-MoE both ways of
# norm_topk_prob, with a dense layer (mlp_only_layers) after a sparse one.
MOE_ARCHITECTURES = {
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"],
                    rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=None, router_aux_loss_coef=0.02),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                      rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=16, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
                      mlp_only_layers=[1], decoder_sparse_step=1, router_aux_loss_coef=0.02),
    "qwen3_moe_norm": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                           rope_theta=1000000.0, rms_norm_eps=1e-6, head_dim=16, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                           mlp_only_layers=[], decoder_sparse_step=1,
                           router_aux_loss_coef=0.02),
}


def tiny_hf_config(arch: str = "llama3", **overrides) -> dict:
    """config.json of a tiny model: 4 layers, GQA (4 heads, 2 groups), vocab 100 (padding needed)."""
    config = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                  rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                  torch_dtype="float32")
    config.update(ARCHITECTURES.get(arch) or MOE_ARCHITECTURES[arch])
    config.update(overrides)
    return config


def tiny_hf_model(config: dict, seed: int = 0):
    """A random fp32 HF causal LM in eval mode; norm weights randomised so their mapping shows.

    Gemma-3's norms scale by ``1 + weight``: randomised around 0 there (a scale near 1, as in
    its releases), since nothing caps its activations; around 1 they double at every norm and
    its fp32 gradients reach the size where summation order shows at 1e-5."""
    import transformers

    centre = 0.0 if config.get("model_type") == "gemma3_text" else 1.0

    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(centre + 0.1 * torch.randn_like(param))
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()
