"""Model FLOPs against torch's own FLOP counter on a Hugging Face forward pass."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_simpo.model.flops import (bf16_peak_flops, decoder_forward_flops, output_layer_flops,
                                        step_flops)
from megatron_simpo.model.architecture import ModelConfig
from tests.tiny import tiny_hf_config, tiny_hf_model


def test_forward_flops_equal_torch_flop_counter_on_hf_llama():
    """HF's eager attention multiplies full [s, s] score matrices and its lm_head scores every
    position, so the non-causal count over all tokens must match the counter exactly."""
    hf_config = tiny_hf_config("llama3", attn_implementation="eager")
    model = tiny_hf_model(hf_config)
    config = ModelConfig.from_hf_config(hf_config)
    rows, seq = 3, 20
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, 100, (rows, seq)))
    ours = (decoder_forward_flops(config, [seq] * rows, causal=False)
            + output_layer_flops(config, rows * seq))
    assert ours == counter.get_total_flops()


def test_causal_attention_and_step_accounting():
    config = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    full = decoder_forward_flops(config, [16], causal=False)
    causal = decoder_forward_flops(config, [16])
    q = config.num_attention_heads * config.kv_channels
    # Causal skips the (16 * 15 / 2) future keys of each layer's two attention products.
    assert full - causal == config.num_layers * 4 * q * (16 * 15 // 2)
    assert step_flops(config, [16, 8], 5) == 3 * (decoder_forward_flops(config, [16, 8])
                                                   + output_layer_flops(config, 5))


def test_peaks_by_device_name():
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_flops("cpu") is None
