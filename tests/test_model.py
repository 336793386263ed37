"""Megatron GPTModel built from a Hugging Face config gives the Hugging Face logits."""

import pytest
import torch

from megatron_simpo.model.architecture import ModelConfig
from tests.multiprocess import run_on_ranks
from tests.tiny import ARCHITECTURES, tiny_hf_config, tiny_hf_model

SEQ = 96  # long enough for rope-base and rope-scaling mistakes to exceed the tolerance


def _parity_worker(rank, tp, cases):
    from megatron.core import parallel_state

    from megatron_simpo.distributed import runtime
    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.training.logprob_head import LogprobHead
    from megatron_simpo.model.builder import build_model
    from megatron_simpo.distributed.parallel import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    runtime.initialize(parallel, seed=1)
    outputs = {}
    for arch, hf_config, hf_state, tokens in cases:
        config = ModelConfig.from_hf_config(hf_config)
        model = build_model(config, parallel)
        full = hf_to_megatron(hf_state, config, config.padded_vocab_size(tp))
        load_rank_state(model, full, config, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                        tp_size=tp, pp_rank=0, pp_size=1)
        model.eval()
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            outputs[arch] = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    # The step's log-prob head must match what the model returns: logits here ...
    outputs["mode_errors"] = []
    lean = build_model(config, parallel, output_mode="hidden_states")
    for built, chunk in ((model, 8), (lean, 0)):  # ... and hidden states when built lean.
        try:
            LogprobHead(chunk, config.vocab_size).check(built)
        except ValueError as error:
            outputs["mode_errors"].append(str(error))
    LogprobHead(8, config.vocab_size).check(lean)  # the matching heads pass
    LogprobHead(0, config.vocab_size).check(model)
    # Built lean, the last stage returns the final hidden states [b, s, h] (gathered along the
    # sequence), and keeps the output layer's parameters under their checkpoint names. The
    # output layer's forward pre-hooks still run (Megatron DDP waits there for its weight's
    # all-gather under --overlap-param-gather).
    hooked = []
    lean.output_layer.register_forward_pre_hook(lambda module, args: hooked.append(module))
    with torch.no_grad():
        hidden = lean.eval()(input_ids=tokens, position_ids=positions, attention_mask=None)
    outputs["lean_shape"] = tuple(hidden.shape)
    outputs["hooks_ran"] = hooked == [lean.output_layer]
    outputs["same_names"] = lean.state_dict().keys() == model.state_dict().keys()
    return outputs


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_hugging_face(tp):
    cases, expected = [], {}
    for seed, arch in enumerate(sorted(ARCHITECTURES)):
        hf_config = tiny_hf_config(arch)
        model = tiny_hf_model(hf_config, seed=seed)
        tokens = torch.randint(0, hf_config["vocab_size"], (2, SEQ),
                               generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected[arch] = model(tokens).logits
        cases.append((arch, hf_config, model.state_dict(), tokens))
    results = run_on_ranks(tp, _parity_worker, tp, cases)
    for result in results:
        assert [e.split(" but ")[1][:25] for e in result["mode_errors"]] == [
            "the model returns logits:", "the model returns hidden "]
        assert result["lean_shape"] == (2, SEQ, cases[-1][1]["hidden_size"])
        assert result["same_names"] and result["hooks_ran"]
    for arch, hf_logits in expected.items():
        logits = torch.cat([r[arch] for r in results], dim=-1)  # [b, s, V_padded]
        vocab = hf_logits.shape[-1]
        assert logits.shape[-1] == ModelConfig.from_hf_config(tiny_hf_config(arch)).padded_vocab_size(tp)
        diff = (logits[..., :vocab] - hf_logits).abs().max().item()
        assert diff <= 1e-5, f"{arch} TP={tp}: max |logit diff| {diff}"


def test_spec_selection():
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_simpo.model.builder import layer_spec

    config = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    assert isinstance(layer_spec(config, "local"), ModuleSpec)
    with pytest.raises(ValueError, match="--transformer-impl must be"):
        layer_spec(config, "apex")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs Transformer Engine, which is not installed"):
            layer_spec(config, "transformer_engine")


def test_memory_lean_logprobs_flag_is_validated():
    from megatron_simpo.training.logprob_head import LogprobHead
    from megatron_simpo.model.builder import build_model

    with pytest.raises(ValueError, match="--logprob-chunk-size must be an integer >= 0"):
        LogprobHead(-1, vocab_size=128)
    with pytest.raises(ValueError, match="output_mode must be one of logits, hidden_states"):
        build_model(ModelConfig.from_hf_config(tiny_hf_config("llama3")), None,
                    output_mode="hidden")


def _packed_worker(rank, hf_config, hf_state, sequences):
    from megatron_simpo.distributed import runtime
    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.data.collate import TokenizedPair, collate_packed
    from megatron_simpo.model.builder import build_model
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.training.step import _forward

    parallel = ParallelConfig()
    runtime.initialize(parallel, seed=1)
    config = ModelConfig.from_hf_config(hf_config)
    model = build_model(config, parallel)
    load_rank_state(model, hf_to_megatron(hf_state, config, config.padded_vocab_size(1)), config,
                    tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    model.eval()
    # One pair = two sequences (prompt token + response); the row ends in padding.
    pair = TokenizedPair(sequences[0][:1], sequences[0][1:], sequences[1][1:])
    length = len(sequences[0]) + len(sequences[1]) - 2 + 5
    batch = collate_packed([pair], length)
    from megatron_simpo.model.attention import segment_causal_mask

    with torch.no_grad():
        masked = model(input_ids=batch.tokens, position_ids=batch.position_ids,
                       attention_mask=segment_causal_mask(batch.cu_seqlens, length))
        segments = _forward(batch, model)  # the step's way: segments, no mask tensor
    return ([logits[0, :, :config.vocab_size] for logits in (masked, segments)],
            batch.cu_seqlens.tolist())


def test_packed_row_equals_each_sequence_alone():
    """A packed row (block-diagonal mask or its segments, positions restarting per sequence)
    gives each sequence the logits Hugging Face gives it alone; the second sequence starts
    1,500 positions in, where RoPE at the row's positions instead of the sequence's drifts."""
    hf_config = tiny_hf_config("llama3.1")
    model = tiny_hf_model(hf_config, seed=2)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (1501, 40)]
    sequences[1][0] = sequences[0][0]  # a pair's two sequences share the prompt
    [(both, starts)] = run_on_ranks(1, _packed_worker, hf_config, model.state_dict(), sequences)
    for index, sequence in enumerate(sequences):
        with torch.no_grad():
            expected = model(torch.tensor([sequence[:-1]])).logits[0]
        for way, logits in zip(("explicit mask", "segments (PackedSeqParams sbhd)"), both):
            got = logits[starts[index]:starts[index + 1]]
            assert (got - expected).abs().max().item() <= 2e-5, f"sequence {index}, {way}"


def _rope_worker(rank, positions):
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.gpt_model import _rotary_at_positions
    from megatron_simpo.distributed.parallel import ParallelConfig

    runtime.initialize(ParallelConfig(), seed=1)  # CPU redirections for Megatron's RoPE
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000,
                           use_cpu_initialization=True)
    model = SimpleNamespace(rotary_pos_emb=rope, max_sequence_length=64)
    shared = rope(positions.shape[1])  # [s, 1, 1, d]: what GPTModel hands its layers
    plain = torch.arange(positions.shape[1]).expand_as(positions)
    # a CP rank's share of a packed row: positions 0..s-1 inside a longer segment, whose
    # length GPTModel sizes its angles by
    longest = rope(positions.shape[1] + 6)
    return (_rotary_at_positions(model, shared, positions),
            _rotary_at_positions(model, shared, plain) is shared,
            _rotary_at_positions(model, longest, plain))


def test_rope_follows_restarting_position_ids():
    """RoPE angles of a packed row are those of each sequence's own positions (RoPE is
    relative, so the logits above barely see an offset; the angles must still restart)."""
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 5, 0, 1]])
    [(got, plain_untouched, in_longer_segment)] = run_on_ranks(1, _rope_worker, positions)
    inverse = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)

    def expected(at):
        angles = at.t().double().unsqueeze(-1) * inverse  # [s, b, d/2]
        return torch.cat([angles, angles], dim=-1).unsqueeze(2)  # [s, b, 1, d]

    assert got.shape == (10, 2, 1, 8)
    assert (got.double() - expected(positions)).abs().max().item() <= 1e-6
    assert plain_untouched  # unpacked rows keep GPTModel's shared angles, bit for bit
    plain = torch.arange(10).expand(2, -1)
    assert in_longer_segment.shape == (10, 2, 1, 8)
    assert (in_longer_segment.double() - expected(plain)).abs().max().item() <= 1e-6


def test_gemma2_test_config_really_caps_and_slides():
    """The tiny Gemma-2 the parity tests use exercises what they claim: both soft-cappings
    change the logits, the final one bounds them, and the window hides keys from the rows."""
    hf_config = tiny_hf_config("gemma2")
    model = tiny_hf_model(hf_config, seed=0)
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    assert SEQ > 2 * hf_config["sliding_window"]
    with torch.no_grad():
        capped = model(tokens).logits
        for change in ({"final_logit_softcapping": None}, {"attn_logit_softcapping": None},
                       {"sliding_window": SEQ}):
            other = tiny_hf_model(dict(hf_config, **change), seed=0)
            other.load_state_dict(model.state_dict())
            assert (other(tokens).logits - capped).abs().max() > 0.1, change
    assert capped.abs().max() <= hf_config["final_logit_softcapping"]
    assert capped.abs().max() > 0.5 * hf_config["final_logit_softcapping"]


def test_gemma3_test_config_really_uses_its_features():
    """The tiny Gemma-3 the parity tests use exercises what they claim: the local RoPE base, the
    global layers' linear scaling, the window, the local:global pattern and the q/k norms each
    change the logits well beyond the parity tolerance."""
    hf_config = tiny_hf_config("gemma3")
    model = tiny_hf_model(hf_config, seed=0)
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    assert SEQ > 2 * hf_config["sliding_window"]
    assert hf_config["head_dim"] * hf_config["num_attention_heads"] != hf_config["hidden_size"]
    with torch.no_grad():
        logits = model(tokens).logits
        for change in ({"rope_local_base_freq": hf_config["rope_theta"]}, {"rope_scaling": None},
                       {"sliding_window": SEQ}, {"layer_types": ["sliding_attention"] * 4}):
            other = tiny_hf_model(dict(hf_config, **change), seed=0)
            other.load_state_dict(model.state_dict())
            assert (other(tokens).logits - logits).abs().max() > 0.1, change
        state = {name: torch.zeros_like(t) if "_norm" in name and ".self_attn." in name else t
                 for name, t in model.state_dict().items()}
        model.load_state_dict(state)
        assert (model(tokens).logits - logits).abs().max() > 0.1  # q/k norms at 1 + 0


def _build_run_and_shut_down(rank, hf_config):
    """A TP2 model's forward, then the teardown every run ends with; this rank's threads after."""
    import gc
    import os

    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.builder import build_model

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    runtime.initialize(parallel, seed=1)
    model = build_model(ModelConfig.from_hf_config(hf_config), parallel)
    tokens = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        model(input_ids=tokens, position_ids=torch.arange(8).expand_as(tokens), attention_mask=None)
    del model
    runtime.shutdown()
    gc.collect()
    return len(os.listdir("/proc/self/task"))


def test_a_shut_down_model_leaves_no_process_group_behind():
    # Megatron-Core's rotary embedding caches its forward on the module, which holds its
    # process group: without runtime.shutdown emptying that cache, each model built in a
    # process that goes on kept its gloo groups' threads (3-4 per rank each time).
    config = tiny_hf_config("llama3")
    threads = [run_on_ranks(2, _build_run_and_shut_down, config) for _ in range(3)]
    assert threads[1] == threads[2], threads
