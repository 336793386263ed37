"""Model FLOPs against torch's own FLOP counter on a Hugging Face forward pass."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_simpo.model.flops import (bf16_peak_flops, decoder_forward_flops, output_layer_flops,
                                        step_flops)
from megatron_simpo.model.architecture import ModelConfig
from tests.tiny import MOE_ARCHITECTURES, tiny_hf_config, tiny_hf_model


@pytest.mark.parametrize("arch", ["llama3", "gemma2", "gemma3", "mixtral", "qwen3_moe"])
def test_forward_flops_equal_torch_flop_counter_on_hf_model(arch):
    """HF's eager attention multiplies full [s, s] score matrices and its lm_head scores every
    position, so the non-causal count over all tokens must match the counter exactly (Gemma-2:
    GeGLU, four norms, soft-capping and the embedding scale add no matrix products; Gemma-3:
    neither do its q/k norms and two RoPE tables; MoE: the
    router and each token's top-k experts, transformers running each expert on its tokens
    only, and Qwen3-MoE's dense layer)."""
    hf_config = tiny_hf_config(arch, attn_implementation="eager")
    if arch in MOE_ARCHITECTURES:  # the expert loop (transformers' default batches them)
        hf_config["experts_implementation"] = "eager"
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


def test_sliding_window_layers_count_only_the_window():
    """Gemma-2's sliding layers attend to the window's keys only: count the mask's entries."""
    config = ModelConfig.from_hf_config(tiny_hf_config("gemma2"))
    seq, window = 20, config.sliding_window
    assert seq > window and 0 < sum(config.sliding_layers) < config.num_layers
    i, j = torch.arange(seq).unsqueeze(1), torch.arange(seq).unsqueeze(0)
    causal_pairs = int((j <= i).sum())
    window_pairs = int(((j <= i) & (i - j < window)).sum())
    full = ModelConfig.from_hf_config(tiny_hf_config("gemma2", layer_types=["full_attention"] * 4))
    q = config.num_attention_heads * config.kv_channels
    assert decoder_forward_flops(full, [seq]) - decoder_forward_flops(config, [seq]) == \
        sum(config.sliding_layers) * 4 * q * (causal_pairs - window_pairs)


def test_peaks_by_device_name():
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bf16_peak_flops("cpu") is None


def test_shared_prompt_rows_count_the_attention_their_mask_allows():
    """--share-prompt's FLOPs: the row's tokens through every layer, and the (query, key) pairs
    its mask (data/shared_rows.py) lets attend; less than the two unshared rows by the prompt."""
    from megatron_simpo.data.collate import TokenizedPair, collate_shared
    from megatron_simpo.training.metrics import pair_flops

    config = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    pairs = [TokenizedPair(list(range(1, 8)), [20, 21, 22], [30, 31, 32, 33, 34]),
             TokenizedPair([1, 2], [20], [30, 31])]
    batch = collate_shared(pairs, 16)
    real = batch.position_ids.new_zeros(batch.position_ids.shape, dtype=torch.bool)
    for row, pair in enumerate(pairs):
        real[row, :len(pair.prompt) + len(pair.chosen) + len(pair.rejected) - 2] = True
    allowed = (~batch.attention_mask[:, 0]) & real[:, :, None] & real[:, None, :]
    q = config.num_attention_heads * config.kv_channels
    per_token = decoder_forward_flops(config, [1]) // config.num_layers - 4 * q
    expected = config.num_layers * (per_token * int(real.sum()) + 4 * q * int(allowed.sum()))
    scored = sum(len(p.chosen) + len(p.rejected) for p in pairs)
    assert pair_flops(config, pairs, [0, 1], share_prompt=True) == 3 * (
        expected + output_layer_flops(config, scored))
    unshared = pair_flops(config, pairs, [0, 1])
    assert pair_flops(config, pairs, [0, 1], share_prompt=True) < unshared


def test_the_log_line_shows_a_small_models_throughput():
    from megatron_simpo.training.metrics import _tflops

    assert [_tflops(v) for v in (412.345, 1.0, 0.0, 0.0123456)] == ["412.3", "1.0", "0.0", "0.0123"]
