"""Vocab-parallel log-probs equal a one-process log_softmax + gather, values and gradients."""

import pytest
import torch

from megatron_simpo.training.logprobs import (sequence_logprobs, vocab_parallel_logprobs,
                                              vocab_slice_sums)
from tests.multiprocess import run_on_ranks

BATCH, SEQ, PADDED_VOCAB, TRUE_VOCAB = 3, 5, 48, 41  # 7 padded ids, spread over the last ranks


def _inputs():
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(BATCH, SEQ, PADDED_VOCAB, generator=generator)
    labels = torch.randint(0, TRUE_VOCAB, (BATCH, SEQ), generator=generator)
    labels[0, :] = TRUE_VOCAB - 1  # the last real id, on the last rank
    upstream = torch.randn(BATCH, SEQ, generator=generator)
    return logits, labels, upstream


def _reference(logits, labels, upstream):
    logits = logits[..., :TRUE_VOCAB].clone().requires_grad_(True)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (logps * upstream).sum().backward()
    grad = torch.cat([logits.grad, torch.zeros(BATCH, SEQ, PADDED_VOCAB - TRUE_VOCAB)], dim=-1)
    return logps.detach(), grad


def _tp_worker(rank, tp):
    import torch.distributed as dist

    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig

    runtime.initialize(ParallelConfig(tensor_model_parallel_size=tp))
    from megatron.core import parallel_state

    logits, labels, upstream = _inputs()
    shard = torch.chunk(logits, tp, dim=-1)[rank].clone()
    before = shard.clone()
    shard.requires_grad_(True)
    logps = vocab_parallel_logprobs(shard, labels, vocab_size=TRUE_VOCAB,
                                    tp_group=parallel_state.get_tensor_model_parallel_group())
    (logps * upstream).sum().backward()
    assert torch.equal(shard.detach(), before), "input logits were modified"
    assert dist.get_world_size() == tp
    sums = vocab_slice_sums(shard.detach(), vocab_size=TRUE_VOCAB,
                            tp_group=parallel_state.get_tensor_model_parallel_group())
    return logps.detach(), shard.grad, sums


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_logprobs_match_full_log_softmax(tp):
    """Also each rank's share of the mean logit (TRL's mean_logits: over the true vocabulary,
    padding excluded): summed over the ranks."""
    logits, labels, upstream = _inputs()
    expected, expected_grad = _reference(logits, labels, upstream)
    results = run_on_ranks(tp, _tp_worker, tp)
    for rank, (logps, grad, _) in enumerate(results):
        torch.testing.assert_close(logps, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, torch.chunk(expected_grad, tp, dim=-1)[rank],
                                   atol=1e-6, rtol=0)
    mean_logits = sum(sums for _, _, sums in results) / TRUE_VOCAB
    torch.testing.assert_close(mean_logits, logits[..., :TRUE_VOCAB].mean(-1), atol=1e-5, rtol=0)


def test_unsplit_logprobs_in_process_and_padding_excluded():
    logits, labels, upstream = _inputs()
    expected, expected_grad = _reference(logits, labels, upstream)
    x = logits.clone().requires_grad_(True)
    got = vocab_parallel_logprobs(x, labels, vocab_size=TRUE_VOCAB)
    (got * upstream).sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, expected_grad, atol=1e-6, rtol=0)
    # Padding really is excluded: including it would lower every log-prob.
    with_padding = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    gap = got.detach() - with_padding
    assert (gap >= 0).all() and gap.max() > 0.1


def test_bf16_logits_give_fp32_logprobs_close_to_fp32():
    logits, labels, _ = _inputs()
    got = vocab_parallel_logprobs(logits.bfloat16(), labels, vocab_size=TRUE_VOCAB)
    assert got.dtype == torch.float32
    expected = vocab_parallel_logprobs(logits.bfloat16().float(), labels, vocab_size=TRUE_VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_sequence_logprobs_sum_and_count_only_masked_positions():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -9.0, -9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    total, count = sequence_logprobs(token_logps, mask)
    assert total.tolist() == [-5.0, -1.0]
    assert count.tolist() == [2.0, 2.0]


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 8), torch.zeros(2, 4, dtype=torch.long),
                                vocab_size=8)


HIDDEN, TOKENS = 16, 23  # 23 tokens in chunks of 5: the last chunk is short


def _fused_inputs():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=g) / 2
    labels = torch.randint(0, TRUE_VOCAB, (TOKENS,), generator=g)
    upstream = torch.randn(TOKENS, generator=g)
    return hidden, weight, labels, upstream


def _fused_reference(softcap=None):
    hidden, weight, labels, upstream = _fused_inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits = hidden @ weight[:TRUE_VOCAB].t()
    if softcap is not None:  # Gemma-2's final-logit soft-capping, as transformers writes it
        assert logits.abs().max() > 2 * softcap  # it bites
        logits = torch.tanh(logits / softcap) * softcap
    logps = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (logps * upstream).sum().backward()
    return logps.detach(), hidden.grad, weight.grad, logits.detach().mean(-1)


def _fused_worker(rank, tp, softcap=None):
    import torch.distributed as dist

    from megatron_simpo.distributed import runtime
    from megatron_simpo.training.logprobs import fused_output_logprobs
    from megatron_simpo.distributed.parallel import ParallelConfig

    runtime.initialize(ParallelConfig(tensor_model_parallel_size=tp))
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    hidden, weight, labels, upstream = _fused_inputs()
    hidden.requires_grad_(True)
    shard = torch.chunk(weight, tp, dim=0)[rank].clone().requires_grad_(True)
    logps, sums = fused_output_logprobs(hidden, shard, labels, vocab_size=TRUE_VOCAB,
                                        tp_group=group, chunk_size=5, softcap=softcap,
                                        with_sums=True)
    assert not sums.requires_grad
    (logps * upstream).sum().backward()
    grad_hidden = hidden.grad.clone()
    dist.all_reduce(grad_hidden, group=group)  # what Megatron's copy-to-TP-region does
    return logps.detach(), grad_hidden, shard.grad, sums


@pytest.mark.parametrize("tp, softcap", [(1, None), (2, None), (1, 2.0), (2, 2.0)])
def test_fused_chunked_logprobs_match_full_logits(tp, softcap):
    """Values and gradients; and each token's mean (capped) logit over the true vocabulary,
    TRL's mean_logits, from the chunks' sums over each rank's slice."""
    expected, grad_hidden, grad_weight, mean_logits = _fused_reference(softcap)
    results = run_on_ranks(tp, _fused_worker, tp, softcap)
    for rank, (logps, g_hidden, g_weight, _) in enumerate(results):
        torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(g_hidden, grad_hidden, atol=1e-5, rtol=0)
        # grad_weight is [V_p, h] with zero rows for the padded ids; each rank owns a slice.
        torch.testing.assert_close(g_weight, torch.chunk(grad_weight, tp)[rank], atol=1e-5, rtol=0)
    torch.testing.assert_close(sum(sums for *_, sums in results) / TRUE_VOCAB, mean_logits,
                               atol=1e-5, rtol=0)
