"""What only a GPU can show: Transformer Engine's layers, FP8 training, bf16 numerics.

Skipped (with the reason) on machines without CUDA or Transformer Engine; run on the lent GPU
machine or in the NGC container with ``pytest -m gpu``. Each test runs in its own spawned
process (one rank, NCCL) so Megatron's global parallel state never leaks between tests.
"""

import pytest
import torch

from megatron_simpo.data.collate import TokenizedPair, collate_pairs
from tests.multiprocess import run_on_ranks
from tests.tiny import tiny_hf_config, tiny_hf_model


def _has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(not (torch.cuda.is_available() and _has_transformer_engine()),
                              reason="needs a CUDA GPU and Transformer Engine")
pytestmark = pytest.mark.gpu

# Wide enough for FP8 GEMMs (every dimension a multiple of 16) and fused attention (head dim 64).
GPU_MODEL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2)
SEQ = 64


def _batch(vocab: int, pairs: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return collate_pairs([TokenizedPair(ids(4, 24), ids(8, 40), ids(8, 40)) for _ in range(pairs)],
                         SEQ)


def _build(hf_state, config, parallel, transformer_impl, dtype, tmp_dir=None, **overrides):
    """A GPTModel of either spec holding the HF weights (through a dist checkpoint for TE)."""
    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.convert.llama import hf_to_megatron, load_rank_state
    from megatron_simpo.model.builder import build_model

    local = build_model(config, parallel, params_dtype=dtype)
    load_rank_state(local, hf_to_megatron(hf_state, config, config.padded_vocab_size(1)), config,
                    tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    if transformer_impl == "local" and not overrides:
        return local
    # The TE spec fuses the norms into the next linear layer; the dist checkpoint maps the names
    # (the path users take: convert once, train with either spec).
    checkpoint = checkpointing.save_model_only(tmp_dir, 0, local, config)
    model = build_model(config, parallel, transformer_impl=transformer_impl, params_dtype=dtype,
                        **overrides)
    checkpointing.load_checkpoint(checkpoint, model, model_config=config)
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.tokens.cuda(), position_ids=batch.position_ids.cuda(),
                     attention_mask=None).float()


def _te_matches_local(rank, hf_state, hf_config, tmp_dir):
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.distributed.parallel import ParallelConfig

    config, parallel = ModelConfig.from_hf_config(hf_config), ParallelConfig()
    runtime.initialize(parallel, seed=0, model_config=config)
    batch = _batch(config.vocab_size)
    local = _build(hf_state, config, parallel, "local", torch.bfloat16).eval()
    te = _build(hf_state, config, parallel, "transformer_engine", torch.bfloat16, tmp_dir).eval()
    reference = _build(hf_state, config, parallel, "local", torch.float32).eval()
    vocab = config.vocab_size
    local_logits, te_logits, fp32_logits = (_logits(m, batch)[..., :vocab]
                                            for m in (local, te, reference))
    return {"te_vs_local": (te_logits - local_logits).abs().max().item(),
            "local_vs_fp32": (local_logits - fp32_logits).abs().max().item(),
            "te_vs_fp32": (te_logits - fp32_logits).abs().max().item(),
            "scale": fp32_logits.abs().max().item()}


@needs_te
def test_transformer_engine_spec_matches_local_spec_in_bf16(tmp_path):
    hf_config = tiny_hf_config("llama3", **GPU_MODEL)
    hf_state = tiny_hf_model(hf_config, seed=1).state_dict()
    diffs = run_on_ranks(1, _te_matches_local, hf_state, hf_config, str(tmp_path / "ckpt"))[0]
    # Both bf16 forwards sit within bf16 rounding of the fp32 one, and of each other: a wrong
    # weight mapping (e.g. a norm not fused into the right linear layer) is off by O(scale).
    tolerance = 0.05 * max(1.0, diffs["scale"])
    assert diffs["local_vs_fp32"] <= tolerance, diffs
    assert diffs["te_vs_fp32"] <= tolerance, diffs
    assert diffs["te_vs_local"] <= tolerance, diffs


def _fp8_steps(rank, hf_state, hf_config, tmp_dir, recipe, steps):
    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.precision import Fp8Config, check_fp8_support
    from megatron_simpo.training.step import train_step

    config, parallel = ModelConfig.from_hf_config(hf_config), ParallelConfig()
    runtime.initialize(parallel, seed=0, model_config=config)
    fp8 = Fp8Config(format="hybrid", recipe=recipe)
    check_fp8_support(fp8)
    local = _build(hf_state, config, parallel, "local", torch.bfloat16)
    checkpoint = checkpointing.save_model_only(tmp_dir, 0, local, config)
    parts = build_components(
        config, parallel, OptimizerSettings(lr=1e-3, use_distributed_optimizer=True),
        params_dtype=torch.bfloat16, transformer_impl="transformer_engine",
        transformer_overrides=fp8.transformer_overrides(), logprob_chunk_size=64,
        load_policy=lambda m: checkpointing.load_checkpoint(checkpoint, m, model_config=config))
    assert parts.model.config.fp8 == "hybrid" and parts.model.config.fp8_recipe == recipe
    batch = _batch(config.vocab_size).to(torch.device("cuda"))
    losses = []
    for _ in range(steps):
        result = train_step([parts.model], parts.optimizer, batch.split(2),
                            LossConfig(beta=2.5, gamma=1.375), head=parts.head)
        losses.append(result.metrics["loss"])
    return losses


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_training_step_runs_and_loss_falls(tmp_path, recipe):
    from megatron_simpo.model.precision import Fp8Config, check_fp8_support

    try:
        check_fp8_support(Fp8Config(format="hybrid", recipe=recipe))
    except RuntimeError as unsupported:
        pytest.skip(str(unsupported))
    hf_config = tiny_hf_config("llama3", **GPU_MODEL)
    hf_state = tiny_hf_model(hf_config, seed=1).state_dict()
    losses = run_on_ranks(1, _fp8_steps, hf_state, hf_config, str(tmp_path / "ckpt"), recipe, 8)[0]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.9 * losses[0], losses  # the same batch 8 times: it must be learned


def _bf16_logprobs(rank, vocab, tokens, hidden_size, chunk):
    from megatron_simpo.training.logprobs import fused_output_logprobs, vocab_parallel_logprobs

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", generator=g)
    weight = torch.randn(vocab, hidden_size, device="cuda", generator=g) / hidden_size ** 0.5 * 3
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    exact = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(
        -1, labels.unsqueeze(-1)).squeeze(-1)
    plain = vocab_parallel_logprobs((hidden.bfloat16() @ weight.bfloat16().t()).unsqueeze(0),
                                    labels.unsqueeze(0), vocab_size=vocab)[0]
    lean = fused_output_logprobs(hidden.bfloat16(), weight.bfloat16(), labels, vocab_size=vocab,
                                 chunk_size=chunk)
    fp32 = fused_output_logprobs(hidden, weight, labels, vocab_size=vocab, chunk_size=chunk)
    return {name: ((value.double() - exact).abs().max().item(),
                   (value.double() - exact).mean().abs().item())
            for name, value in (("plain_bf16", plain), ("lean_bf16", lean), ("lean_fp32", fp32))}


@needs_gpu
def test_bf16_logprobs_match_fp32():
    """Llama-3's vocabulary, logits of unit-ish scale: bf16 GEMMs with fp32 softmax stay within
    bf16 rounding per token, and the per-sequence mean (SimPO's reward) far closer."""
    errors = run_on_ranks(1, _bf16_logprobs, 128256, 512, 1024, 128)[0]
    assert errors["lean_fp32"][0] <= 1e-3, errors
    for name in ("plain_bf16", "lean_bf16"):
        worst, mean = errors[name]
        assert worst <= 0.1, errors
        assert mean <= 0.01, errors


def _gpu_pairs(vocab: int):
    """Four random pairs (prompts 4-23 tokens, responses 8-39) and the positions they fill
    packed."""
    g = torch.Generator().manual_seed(1)

    def ids(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    pairs = [TokenizedPair(ids(4, 24), ids(8, 40), ids(8, 40)) for _ in range(4)]
    return pairs, sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) - 2 for p in pairs)


def _te_packed_logps(rank, hf_state, hf_config, tmp_dir):
    """Per-sequence summed log-probs of the same pairs through Transformer Engine, padded rows
    vs one THD-packed row (and the local spec's packed row with its explicit mask)."""
    from megatron.core import parallel_state

    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.data.collate import collate_packed
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.training.logprob_head import LogprobHead
    from megatron_simpo.training.step import _forward, _policy_logp_sums

    config, parallel = ModelConfig.from_hf_config(hf_config), ParallelConfig()
    runtime.initialize(parallel, seed=0, model_config=config)
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    pairs, used = _gpu_pairs(config.vocab_size)
    length = -(-used // 64) * 64
    padded = collate_pairs(pairs, SEQ).to(torch.device("cuda"))
    thd = collate_packed(pairs, length, thd=True).to(torch.device("cuda"))
    masked = collate_packed(pairs, length).to(torch.device("cuda"))
    te = _build(hf_state, config, parallel, "transformer_engine", torch.bfloat16, tmp_dir).eval()
    local = _build(hf_state, config, parallel, "local", torch.bfloat16).eval()
    sums = {}
    with torch.no_grad():
        for name, model, batch in (("te_padded", te, padded), ("te_thd", te, thd),
                                   ("local_masked", local, masked)):
            sums[name] = _policy_logp_sums(batch, _forward(batch, model), model,
                                           LogprobHead(0, config.vocab_size))[0].float().cpu()
    return sums


@needs_te
def test_transformer_engine_thd_packing_matches_padded_rows(tmp_path):
    """--pack-sequences on Transformer Engine: THD segments give each sequence the log-probs
    of its own padded row (bf16 rounding apart), as the local spec's masked row does."""
    from megatron_simpo.model.builder import check_packed_attention

    try:
        check_packed_attention("transformer_engine")
    except RuntimeError as unsupported:
        pytest.skip(str(unsupported))
    hf_config = tiny_hf_config("llama3", **GPU_MODEL)
    hf_state = tiny_hf_model(hf_config, seed=1).state_dict()
    sums = run_on_ranks(1, _te_packed_logps, hf_state, hf_config, str(tmp_path / "ckpt"))[0]
    scale = sums["te_padded"].abs().max().item()
    for name in ("te_thd", "local_masked"):
        assert (sums[name] - sums["te_padded"]).abs().max().item() <= 0.02 * scale, sums


@needs_gpu
def test_weight_gradient_product_in_bf16_equals_fp32_gemm():
    """The lean log-probs' weight gradient: a bf16 GEMM accumulating into fp32 on a GPU adds
    what the fp32 GEMM of the same (upcast) values adds, up to summation order."""
    from megatron_simpo.model.wgrad import add_product_

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(4096, 512, device="cuda", generator=g).bfloat16()
    b = torch.randn(512, 256, device="cuda", generator=g).bfloat16()
    start = torch.randn(4096, 256, device="cuda", generator=g)
    fast, exact = start.clone(), start.clone()
    add_product_(fast, a.t().contiguous().t(), b)  # a transposed view, as in backward
    exact.addmm_(a.float(), b.float())
    assert fast.dtype == torch.float32
    assert (fast - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()


def _lean_gradients(rank, vocab, tokens, hidden_size, chunk):
    """Lean log-probs and their gradients on a GPU in bf16 (weight gradient into an fp32
    main_grad, as under DDP) and in fp32 on the CPU from the same bf16 values."""
    from megatron_simpo.training.logprobs import fused_output_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).bfloat16()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size ** 0.5 * 3).bfloat16()
    labels = torch.randint(0, vocab - 7, (tokens,), generator=g)
    upstream = torch.randn(tokens, generator=g)
    results = {}
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        h = hidden.to(device, dtype).requires_grad_()
        w = weight.to(device, dtype).requires_grad_()
        w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=device)
        logps, sums = fused_output_logprobs(h, w, labels.to(device), vocab_size=vocab - 7,
                                            chunk_size=chunk, with_sums=True)
        (logps * upstream.to(device)).sum().backward()
        results[device] = [t.detach().float().cpu() for t in (logps, h.grad, w.main_grad, sums)]
    return results


@needs_gpu
def test_lean_logprobs_in_bf16_match_fp32_on_cpu():
    """The GPU path of the lean log-probs (bf16 GEMMs, fp32 softmax, bf16 weight-gradient GEMMs
    into fp32) against the CPU-exact fp32 path on the same bf16 values (padded vocabulary,
    a short last chunk): log-probs, both gradients and each token's sum of its vocabulary
    slice (logits/chosen, logits/rejected) within bf16 rounding."""
    results = run_on_ranks(1, _lean_gradients, 32000, 700, 256, 256)[0]
    for name, gpu, cpu in zip(("logps", "grad_hidden", "main_grad", "sums"), results["cuda"],
                              results["cpu"]):
        scale = cpu.abs().max().item()
        assert (gpu - cpu).abs().max().item() <= 0.02 * scale, (name, scale)
    assert (results["cuda"][2][-7:] == 0).all()  # padded vocabulary rows get no gradient


def _local_packed_logps(rank, hf_state, hf_config):
    """Summed log-probs of the same pairs on the local spec in bf16: padded rows (SDPA, flash
    first), one packed row through variable-length flash attention, and fp32 padded rows."""
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.attention import uses_varlen
    from megatron_simpo.data.collate import collate_packed
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.training.logprob_head import LogprobHead
    from megatron_simpo.training.step import _forward, _policy_logp_sums

    config, parallel = ModelConfig.from_hf_config(hf_config), ParallelConfig()
    runtime.initialize(parallel, seed=0, model_config=config)
    pairs, used = _gpu_pairs(config.vocab_size)
    padded = collate_pairs(pairs, SEQ).to(torch.device("cuda"))
    packed = collate_packed(pairs, -(-used // 64) * 64).to(torch.device("cuda"))
    sums = {}
    with torch.no_grad():
        for name, dtype, batch in (("bf16_padded", torch.bfloat16, padded),
                                   ("bf16_packed_varlen", torch.bfloat16, packed),
                                   ("fp32_padded", torch.float32, padded)):
            model = _build(hf_state, config, parallel, "local", dtype).eval()
            sums[name] = _policy_logp_sums(batch, _forward(batch, model), model,
                                           LogprobHead(0, config.vocab_size))[0].float().cpu()
    q = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    return sums, uses_varlen(q)


@needs_gpu
def test_local_spec_packed_rows_through_varlen_attention_match_padded_rows():
    """--pack-sequences on the local spec on a GPU: each sequence of the packed row gets the
    log-probs of its own padded row, through variable-length flash attention (no mask)."""
    from megatron_simpo.model.attention import varlen_attn

    if varlen_attn is None:
        pytest.skip("this PyTorch has no torch.nn.attention.varlen")
    hf_config = tiny_hf_config("llama3", **GPU_MODEL)
    hf_state = tiny_hf_model(hf_config, seed=1).state_dict()
    sums, varlen_used = run_on_ranks(1, _local_packed_logps, hf_state, hf_config)[0]
    assert varlen_used
    scale = sums["fp32_padded"].abs().max().item()
    for name in ("bf16_padded", "bf16_packed_varlen"):
        assert (sums[name] - sums["fp32_padded"]).abs().max().item() <= 0.02 * scale, sums


def _te_context_parallel_steps(rank, hf_state, hf_config, tmp_dir):
    """One SimPO step of the same global batch at DP 2 and at CP 2 (Transformer Engine's
    attention, bf16; Megatron's own CP path, keys and values passed around a ring), and at DP 2
    on the local spec in fp32: loss and grad norm of each."""
    from megatron.core import parallel_state as ps

    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.training.components import build_components, release
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings
    from megatron_simpo.training.step import train_step

    config = ModelConfig.from_hf_config(hf_config)
    batch = _batch(config.vocab_size)
    out = {}
    for name, cp, impl, dtype in (("te_dp2", 1, "transformer_engine", torch.bfloat16),
                                  ("te_cp2", 2, "transformer_engine", torch.bfloat16),
                                  ("local_fp32_dp2", 1, "local", torch.float32)):
        parallel = ParallelConfig(context_parallel_size=cp)
        runtime.initialize(parallel, seed=0, model_config=config)
        checkpoint = checkpointing.save_model_only(f"{tmp_dir}/{name}", 0, _build(
            hf_state, config, ParallelConfig(), "local", dtype), config)
        parts = build_components(
            config, parallel, OptimizerSettings(lr=1e-3), params_dtype=dtype,
            transformer_impl=impl, logprob_chunk_size=64,
            load_policy=lambda m: checkpointing.load_checkpoint(checkpoint, m,
                                                                model_config=config))
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        rows = batch.tokens.shape[0] // dp
        mine = batch.rows(dp_rank * rows, (dp_rank + 1) * rows).to(torch.device("cuda"))
        result = train_step([parts.model], parts.optimizer, [mine],
                            LossConfig(beta=2.5, gamma=1.375), head=parts.head)
        out[name] = (result.metrics["loss"], result.grad_norm)
        release(parts)
        ps.destroy_model_parallel()
    return out


@needs_te
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism needs 2 GPUs")
def test_transformer_engine_context_parallel_step_matches_data_parallel(tmp_path):
    """--context-parallel-size 2 with --transformer-impl transformer_engine: Megatron's CP
    attention gives the step of the unsplit rows (bf16 rounding apart), and both that of the
    local spec in fp32."""
    hf_config = tiny_hf_config("llama3", **GPU_MODEL)
    hf_state = tiny_hf_model(hf_config, seed=1).state_dict()
    results = run_on_ranks(2, _te_context_parallel_steps, hf_state, hf_config, str(tmp_path))
    for steps in results:
        exact_loss, exact_norm = steps["local_fp32_dp2"]
        for name in ("te_dp2", "te_cp2"):
            loss, norm = steps[name]
            assert abs(loss - exact_loss) <= 0.02 * max(1.0, exact_loss), steps
            assert abs(norm - exact_norm) <= 0.05 * exact_norm, steps
        assert abs(steps["te_cp2"][0] - steps["te_dp2"][0]) <= 0.01 * max(1.0, exact_loss), steps


def _moe_logits(rank, hf_state, hf_config):
    """A Mixtral on one GPU (the all-to-all dispatcher at EP 1, Megatron-Core's MoE layer) in
    bf16 and fp32: its logits."""
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig

    config, parallel = ModelConfig.from_hf_config(hf_config), ParallelConfig()
    runtime.initialize(parallel, seed=0, model_config=config)
    batch = _batch(config.vocab_size)
    return {name: _logits(_build(hf_state, config, parallel, "local", dtype).eval(), batch
                          )[..., :config.vocab_size].cpu()
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}, batch


@needs_gpu
def test_mixture_of_experts_on_a_gpu_matches_transformers(tmp_path):
    """Mixtral through Megatron-Core's MoE layer on a GPU: fp32 logits equal transformers'
    (CPU, fp32) as on the CPU, bf16 within bf16 rounding."""
    from safetensors.torch import load_file

    hf_config = tiny_hf_config("mixtral", **GPU_MODEL)
    model = tiny_hf_model(hf_config, seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gate.weight"):  # clear top-2 choices: bf16 cannot flip them
                param.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path)  # the per-expert tensors of the files, which converters read
    logits, batch = run_on_ranks(1, _moe_logits, load_file(tmp_path / "model.safetensors"),
                                 hf_config)[0]
    with torch.no_grad():
        expected = model.eval()(batch.tokens).logits
    scale = expected.abs().max().item()
    assert (logits["fp32"] - expected).abs().max().item() <= 1e-3 * max(1.0, scale)
    assert (logits["bf16"] - expected).abs().max().item() <= 0.05 * max(1.0, scale)


def _grouped_causal_attention(rank, hf_config):
    """SDPAttention on causal rows with grouped keys/values: bf16 on CUDA (the flash kernel
    takes the groups as they are) and fp32 on the CPU; outputs and input gradients of each."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.attention import SDPAttention, grouped_sdpa
    from megatron_simpo.model.builder import transformer_config

    config = ModelConfig.from_hf_config(hf_config)
    runtime.initialize(ParallelConfig(), seed=0, model_config=config)
    module = SDPAttention(transformer_config(config, ParallelConfig()), layer_number=1,
                          attn_mask_type=AttnMaskType.causal, attention_type="self")
    g = torch.Generator().manual_seed(0)
    s, b, hn = 256, 2, config.kv_channels
    inputs = [torch.randn(s, b, n, hn, generator=g) for n in
              (config.num_attention_heads, config.num_query_groups, config.num_query_groups)]
    upstream = torch.randn(s, b, config.num_attention_heads * hn, generator=g)
    results = {}
    for name, device, dtype in (("cuda_bf16", "cuda", torch.bfloat16),
                                ("cpu_fp32", "cpu", torch.float32)):
        leaves = [t.to(device, dtype).requires_grad_(True) for t in inputs]
        out = module(*leaves, attention_mask=None)
        out.backward(upstream.to(device, dtype))
        results[name] = [out.detach().float().cpu()] + [t.grad.float().cpu() for t in leaves]
    used = grouped_sdpa(torch.zeros(1, device="cuda", dtype=torch.bfloat16))
    return results, used


@needs_gpu
def test_grouped_query_causal_attention_on_cuda_matches_cpu():
    """Plain causal rows with GQA on a GPU: SDPA's flash kernel takes the key/value groups
    unrepeated (enable_gqa); output and q/k/v gradients equal the CPU's fp32 attention."""
    hf_config = tiny_hf_config("llama3", **GPU_MODEL)
    results, used = run_on_ranks(1, _grouped_causal_attention, hf_config)[0]
    assert used
    for got, want in zip(results["cuda_bf16"], results["cpu_fp32"]):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
