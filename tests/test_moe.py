"""Mixture of experts (Mixtral, Qwen3-MoE): architecture, conversion and logits at EP/TP/PP
against transformers, round trip from an expert-parallel checkpoint, refused layouts.

The multi-rank checks run in the suite's reused 4-rank world (tests/multiprocess.py)."""

import json
from pathlib import Path

import pytest
import torch

from megatron_simpo.cli import convert as cli
from megatron_simpo.distributed.parallel import ParallelConfig
from megatron_simpo.model.architecture import ModelConfig, hf_config_dict
from tests.multiprocess import run_on_ranks
from tests.test_convert import _megatron_logits
from tests.tiny import MOE_ARCHITECTURES, tiny_hf_config, tiny_hf_model

SEQ = 16
WORLD = 4


def _moe_config(arch: str) -> dict:
    return tiny_hf_config(arch, num_hidden_layers=2)


@pytest.fixture(scope="module")
def hf_moe_models(tmp_path_factory):
    from megatron_simpo.model.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("hf_moe")
    models = {}
    for seed, arch in enumerate(sorted(MOE_ARCHITECTURES)):
        # routers with larger weights than the default 0.02 make clear top-2 choices
        model = tiny_hf_model(_moe_config(arch), seed=seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".gate.weight"):
                    param.normal_(0.0, 0.5)
        model.save_pretrained(root / arch)
        build_tokenizer().save_pretrained(root / arch)
        models[arch] = (model, root / arch)
    return models


# ---- in-process: architecture ----------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_architecture_reads_and_writes_the_moe_fields(arch):
    hf = _moe_config(arch)
    config = ModelConfig.from_hf_config(hf)
    assert config.num_experts == 4 and config.moe_router_topk == 2
    if arch == "mixtral":
        assert config.moe_ffn_hidden_size == 64 and config.moe_norm_topk_prob
        assert config.moe_layer_pattern == [True, True]
    else:
        assert config.moe_ffn_hidden_size == 48 and config.ffn_hidden_size == 64
        assert config.moe_norm_topk_prob == hf["norm_topk_prob"] and config.qk_layernorm
        assert config.moe_layer_pattern == [True, not hf["mlp_only_layers"]]
    out = hf_config_dict(config, None, torch.float32)
    assert ModelConfig.from_hf_config(out) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_qwen3_moe_decoder_sparse_step_and_refusals():
    hf = tiny_hf_config("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2)
    assert ModelConfig.from_hf_config(hf).moe_layer_pattern == [False, True, False, True]
    with pytest.raises(ValueError, match="router_jitter_noise"):
        ModelConfig.from_hf_config(tiny_hf_config("mixtral", router_jitter_noise=0.1))
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf_config(tiny_hf_config("mixtral", sliding_window=4096))


def test_parallel_check_names_the_expert_flags():
    moe = ModelConfig.from_hf_config(_moe_config("mixtral"))
    dense = ModelConfig.from_hf_config(tiny_hf_config("llama3"))
    cases = [
        (dict(expert_model_parallel_size=3), moe, "--expert-model-parallel-size \\(3\\) must "
                                                  "divide the number of experts \\(4\\)"),
        (dict(expert_model_parallel_size=2), dense, "--expert-model-parallel-size \\(2\\) needs "
                                                    "a mixture-of-experts model"),
        (dict(tensor_model_parallel_size=2, expert_model_parallel_size=2), moe,
         "needs --sequence-parallel"),
        (dict(expert_tensor_parallel_size=3), moe, "--expert-tensor-parallel-size \\(3\\) must "
                                                   "divide the expert hidden size"),
    ]
    for sizes, model, message in cases:
        with pytest.raises(ValueError, match=message):
            ParallelConfig(**sizes).check_model(model)
    with pytest.raises(ValueError, match="--expert-model-parallel-size \\(4\\) x "
                                         "--expert-tensor-parallel-size \\(1\\) x "
                                         "--pipeline-model-parallel-size \\(2\\) = 8 does not "
                                         "divide the world size \\(4\\)"):
        ParallelConfig(pipeline_model_parallel_size=2, expert_model_parallel_size=4
                       ).check_world_size(4)
    from megatron_simpo.model.builder import check_shared_prompt_attention
    from megatron_simpo.model.moe import MoESettings

    check_shared_prompt_attention("local", moe)
    MoESettings().check_shared_prompt(moe)
    with pytest.raises(ValueError, match="--share-prompt with --moe-aux-loss-coeff and "
                                         "--moe-expert-capacity-factor: shared rows route"):
        MoESettings(moe_aux_loss_coeff=0.01, moe_expert_capacity_factor=1.0
                    ).check_shared_prompt(moe)


@pytest.mark.parametrize("arch", sorted(MOE_ARCHITECTURES))
def test_mapping_round_trip_is_exact(arch, tmp_path):
    """HF file tensors -> unsplit Megatron -> HF, and Megatron -> EP/ETP rank shards -> back."""
    from safetensors.torch import load_file

    from megatron_simpo.convert.llama import (expected_hf_shape, hf_to_megatron, megatron_to_hf,
                                              rank_state_dict)

    model = tiny_hf_model(_moe_config(arch))
    model.save_pretrained(tmp_path)
    original = load_file(tmp_path / "model.safetensors")
    config = ModelConfig.from_hf_config(tmp_path)
    full = hf_to_megatron(original, config, config.padded_vocab_size(1))
    back = megatron_to_hf(full, config)
    assert set(back) == set(original)
    assert all(torch.equal(back[n], t) and expected_hf_shape(n, config) == t.shape
               for n, t in original.items())
    shards = [rank_state_dict(full, config, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                              ep_rank=r, ep_size=2) for r in range(2)]
    name = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc2.weight"
    assert torch.equal(shards[1][name.format(1)], full[name.format(3)])
    assert name.format(2) not in shards[0]


# ---- 4 ranks: conversion and logits ----------------------------------------------------------
# Renormalised routings at EP 2; TP 2 x EP 2 on Mixtral; PP 2 x EP 2 on Qwen3-MoE without
# renormalisation, whose stages then
# hold a sparse and a dense layer.
# Expert TP 2 (each expert's weights split over 2 ranks, the uneven token gather): Qwen3-MoE.
LOGIT_CASES = {"ep2": ("mixtral", "qwen3_moe_norm"), "tp2xep2": ("mixtral",),
               "tp2xep2xetp2": ("qwen3_moe_norm",), "pp2xep2": ("qwen3_moe",), "cp2xep2": ()}
LAYOUTS = {"ep2": dict(expert_model_parallel_size=2),
           "tp2xep2": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                           expert_model_parallel_size=2, expert_tensor_parallel_size=1),
           "tp2xep2xetp2": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                expert_model_parallel_size=2, expert_tensor_parallel_size=2),
           "pp2xep2": dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2),
           "cp2xep2": dict(context_parallel_size=2, expert_model_parallel_size=2)}


def _convert_and_run(rank, layouts, cases, out_dir):
    from megatron.core import parallel_state as ps

    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.convert.hf_to_megatron import convert_rank
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.builder import build_model

    results = {}
    for layout in layouts:
        parallel = ParallelConfig(**LAYOUTS[layout])
        runtime.initialize(parallel, seed=0)
        for arch, hf_dir, tokens in cases:
            if arch not in LOGIT_CASES[layout]:
                continue
            config = ModelConfig.from_hf_config(hf_dir)
            save = Path(out_dir) / f"{arch}-{layout}"
            convert_rank(hf_dir, save, config, parallel, torch.float32)
            model = build_model(config, parallel)  # random weights, replaced by the load
            checkpointing.load_checkpoint(checkpointing.find_checkpoint(save), model,
                                          model_config=config)
            logits = _megatron_logits(model, tokens)
            if ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0:
                results[layout, arch, ps.get_tensor_model_parallel_rank()] = logits
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    return results


def test_converted_moe_gives_hugging_face_logits_at_ep_tp_pp(hf_moe_models, tmp_path):
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    cases = [(arch, str(path), tokens) for arch, (_, path) in hf_moe_models.items()]
    results = {}
    for rank_results in run_on_ranks(WORLD, _convert_and_run, list(LAYOUTS), cases,
                                     str(tmp_path)):
        results.update(rank_results)
    for arch, (model, _) in hf_moe_models.items():
        with torch.no_grad():
            expected = model(tokens).logits
        for layout in LAYOUTS:
            if arch not in LOGIT_CASES[layout]:
                continue
            shards = [results[layout, arch, r] for r in range(2) if (layout, arch, r) in results]
            logits = torch.cat(shards, dim=-1)[..., :expected.shape[-1]]
            diff = (logits - expected).abs().max().item()
            assert diff <= 1e-5, f"{arch} {layout}: max |logit diff| {diff}"


def test_round_trip_from_ep2_and_etp2_checkpoints_is_bit_exact(hf_moe_models, tmp_path, capsys):
    import transformers
    from safetensors.torch import load_file

    # Qwen3-MoE at EP 2; Mixtral at TP 2 x EP 2, whose expert TP is then 2 as well
    for arch, tp in (("qwen3_moe", "1"), ("mixtral", "2")):
        model, hf_dir = hf_moe_models[arch]
        cli.hf_to_megatron_main(["--hf-path", str(hf_dir), "--save", str(tmp_path / arch / "mg"),
                                 "--expert-model-parallel-size", "2", "--dtype", "fp32",
                                 "--tensor-parallel-size", tp], run_on_ranks=run_on_ranks)
        assert f"TP={tp}, PP=1, EP=2" in capsys.readouterr().out
        cli.megatron_to_hf_main(["--load", str(tmp_path / arch / "mg"),
                                 "--save", str(tmp_path / arch / "hf")],
                                run_on_ranks=run_on_ranks)
        original = load_file(hf_dir / "model.safetensors")
        exported = load_file(tmp_path / arch / "hf" / "model.safetensors")
        assert set(original) == set(exported)
        assert any(".experts.3." in name for name in exported)
        for name, tensor in original.items():
            assert torch.equal(tensor, exported[name]), name
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch / "hf")
        tokens = torch.randint(0, 100, (2, SEQ))
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(tokens).logits, model(tokens).logits)


# ---- 4 ranks: one training step against transformers ------------------------------------------
PAIRS, STEP_SEQ, LR, ADAM_EPS = 8, 16, 1e-2, 1e-3
BETA, GAMMA = 2.5, 1.375


def _step_pairs(vocab: int):
    from megatron_simpo.data.collate import TokenizedPair

    g = torch.Generator().manual_seed(3)

    def ids(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(1, 5), ids(1, 10), ids(1, 10)) for _ in range(PAIRS)]


def _step_batch(vocab: int):
    from megatron_simpo.data.collate import collate_pairs

    return collate_pairs(_step_pairs(vocab), STEP_SEQ)


def _packed(pairs, dp_rank: int, dp_size: int):
    """This rank's packed micro-batches of ``pairs``, laid out as training lays them out."""
    from megatron_simpo.data.batching import BatchingConfig, PairLengths, plan_global_batch
    from megatron_simpo.data.collate import collate_microbatch

    plan = plan_global_batch(list(range(len(pairs))), [PairLengths.of(p) for p in pairs],
                             dp_size=dp_size, micro_batch_size=1, seq_length=STEP_SEQ,
                             config=BatchingConfig(pack_sequences=True,
                                                   max_tokens_per_microbatch=48))
    return [collate_microbatch(pairs, mb) for mb in plan.ranks[dp_rank]]


def _file_layout(state: dict, arch: str) -> dict:
    """transformers 5's in-memory expert tensors (fused [E, 2F, h] gate_up, [E, h, F] down)
    -> the per-expert names its checkpoints use (what the converters read)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("mlp.experts.gate_up_proj")
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                if arch == "mixtral":
                    out[f"{prefix}block_sparse_moe.experts.{e}.w1.weight"] = tensor[e, :half]
                    out[f"{prefix}block_sparse_moe.experts.{e}.w3.weight"] = tensor[e, half:]
                else:
                    out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = tensor[e, :half]
                    out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = tensor[e, half:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("mlp.experts.down_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}block_sparse_moe.experts.{e}.w2.weight" if arch == "mixtral" else
                    f"{prefix}mlp.experts.{e}.down_proj.weight"] = tensor[e]
        elif arch == "mixtral" and name.endswith("mlp.gate.weight"):
            out[name.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = tensor
        else:
            out[name] = tensor
    return out


def _reference_step(model, batch, dp: int, aux_coef: float, freeze: bool):
    """transformers on one process: mean SimPO loss over the pairs + router_aux_loss_coef x
    transformers' load-balancing loss (``load_balancing_loss_func``) of each MoE layer, summed
    over the layers (transformers pools the layers' tokens into one loss instead: the same with
    one MoE layer), averaged over the data-parallel shards Megatron computes it on; AdamW.
    Returns (loss, aux, grads, params) in transformers' in-memory layout."""
    import copy

    import transformers

    model = copy.deepcopy(model).train()
    for name, param in model.named_parameters():
        param.requires_grad_(not (freeze and name.endswith("mlp.gate.weight")))
    logits = model(batch.tokens).logits
    token = torch.log_softmax(logits, -1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
    total, count = (token * batch.loss_mask).sum(-1), batch.loss_mask.sum(-1)
    score = total / count
    loss = -torch.nn.functional.logsigmoid(BETA * (score[0::2] - score[1::2]) - GAMMA).mean()
    aux = torch.zeros(())
    if aux_coef:
        rows = 2 * PAIRS // dp
        module = transformers.models.mixtral.modeling_mixtral
        for d in range(dp):
            output = model(batch.rows(d * rows, (d + 1) * rows).tokens, output_router_logits=True)
            if len(output.router_logits) == 1:
                assert torch.equal(output.aux_loss, module.load_balancing_loss_func(
                    output.router_logits, 4, 2))
            aux = aux + sum(module.load_balancing_loss_func((layer,), 4, 2)
                            for layer in output.router_logits) / dp
    (loss + aux_coef * aux).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.AdamW(params, lr=LR, eps=ADAM_EPS, weight_decay=0.0).step()
    return loss.item(), aux.item(), grads, dict(model.state_dict())


STEP_CASES = {  # name: (architecture, layout, aux loss on, router frozen, distributed optimizer)
    "ep2_aux": ("qwen3_moe", "ep2", True, False, False),
    "ep2_frozen": ("mixtral", "ep2", False, True, True),
    # packed rows (several sequences per row, restarting positions): the same step
    "ep2_frozen_packed": ("mixtral", "ep2", False, True, True),
    "tp2xep2_aux": ("mixtral", "tp2xep2", True, False, False),
    "tp2xep2_frozen": ("qwen3_moe_norm", "tp2xep2", False, True, True),
    "tp2xep2xetp2_aux": ("mixtral", "tp2xep2xetp2", True, False, False),
    "cp2xep2_aux": ("qwen3_moe", "cp2xep2", True, False, False),
    # shared-prompt rows (--share-prompt), each prompt routed once: the unshared step
    "ep2_shared": ("mixtral", "ep2", False, False, False),
}


def _megatron_steps(rank, cases, batch, pairs):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_simpo.convert.llama import (hf_to_megatron, is_expert, load_rank_state,
                                              merge_tensors, to_global_name)
    from megatron_simpo.data.collate import collate_shared
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.moe import MoESettings
    from megatron_simpo.training.components import build_components, release
    from megatron_simpo.training.losses import LossConfig
    from megatron_simpo.training.optimizer import OptimizerSettings, finish_param_sync
    from megatron_simpo.training.step import train_step

    out = {}
    for name, (hf_config, state, layout, aux_coeff, freeze, distopt) in cases.items():
        config = ModelConfig.from_hf_config(hf_config)
        parallel = ParallelConfig(**LAYOUTS[layout])
        runtime.initialize(parallel, seed=0, model_config=config)
        tp, tp_rank = parallel.tensor_model_parallel_size, ps.get_tensor_model_parallel_rank()
        ep, ep_rank = parallel.expert_model_parallel_size, ps.get_expert_model_parallel_rank()
        etp = parallel.expert_tensor_parallel_size
        where = dict(tp_rank=tp_rank, tp_size=tp, pp_rank=0, pp_size=1, ep_rank=ep_rank,
                     ep_size=ep, etp_rank=ps.get_expert_tensor_parallel_rank(), etp_size=etp)
        full = hf_to_megatron(state, config, config.padded_vocab_size(tp))
        moe = MoESettings(moe_aux_loss_coeff=aux_coeff, freeze_moe_router=freeze)
        parts = build_components(
            config, parallel, OptimizerSettings(lr=LR, adam_eps=ADAM_EPS, clip_grad=1e9,
                                                use_distributed_optimizer=distopt),
            transformer_overrides=moe.transformer_overrides(), freeze_router=freeze,
            logprob_chunk_size=7, load_policy=lambda m: load_rank_state(m, full, config, **where))
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        rows = 2 * PAIRS // dp
        microbatches = (_packed(pairs, dp_rank, dp) if name.endswith("_packed") else
                        [collate_shared(pairs[dp_rank * PAIRS // dp:(dp_rank + 1) * PAIRS // dp],
                                        24)] if name.endswith("_shared") else
                        [batch.rows(dp_rank * rows, (dp_rank + 1) * rows)])
        assert name.endswith("_packed") == all(mb.packed for mb in microbatches)
        assert name.endswith("_shared") == all(mb.shared for mb in microbatches)
        result = train_step([parts.model], parts.optimizer, microbatches,
                            LossConfig(beta=BETA, gamma=GAMMA), head=parts.head)
        finish_param_sync([parts.model])

        def gather(tensors):
            gathered = {}
            for local, tensor in tensors:
                global_name = to_global_name(local, config, 0, 1, ep_rank, ep)
                size, group = ((etp, ps.get_expert_tensor_parallel_group()) if
                               is_expert(global_name) else
                               (tp, ps.get_tensor_model_parallel_group()))
                shards = [torch.empty_like(tensor) for _ in range(size)]
                dist.all_gather(shards, tensor.contiguous(), group=group)
                gathered[global_name] = merge_tensors(local, shards)
            return gathered

        named = list(parts.model.module.named_parameters())
        out[name] = dict(
            metrics=result.metrics, frozen=[n for n, p in named if not p.requires_grad],
            params=gather((n, p.detach()) for n, p in named),
            grads=None if distopt else gather((n, p.main_grad) for n, p in named
                                              if p.requires_grad))
        release(parts)
        ps.destroy_model_parallel()
    return out


def test_moe_step_matches_transformers_with_aux_loss_and_frozen_router(hf_moe_models):
    from safetensors.torch import load_file

    from megatron_simpo.convert.llama import hf_to_megatron

    batch = _step_batch(100)
    cases, expected = {}, {}
    for name, (arch, layout, aux, freeze, distopt) in STEP_CASES.items():
        model, hf_dir = hf_moe_models[arch]
        hf_config = json.loads((hf_dir / "config.json").read_text())
        coef = hf_config["router_aux_loss_coef"] if aux else 0.0
        dp = WORLD // (LAYOUTS[layout].get("tensor_model_parallel_size", 1) *
                       LAYOUTS[layout].get("context_parallel_size", 1))
        # Megatron's per-layer loss is transformers' / top-k (f_i counts the k choices)
        cases[name] = (hf_config, load_file(hf_dir / "model.safetensors"), layout,
                       coef * hf_config["num_experts_per_tok"], freeze, distopt)
        expected[name] = _reference_step(model, batch, dp, coef, freeze)
    results = {}
    for rank_result in run_on_ranks(WORLD, _megatron_steps, cases, batch, _step_pairs(100)):
        for name, values in rank_result.items():
            merged = results.setdefault(name, dict(params={}, grads={}))
            merged["metrics"], merged["frozen"] = values["metrics"], values["frozen"]
            merged["params"].update(values["params"])
            merged["grads"].update(values["grads"] or {})
    for name, (arch, layout, aux, freeze, distopt) in STEP_CASES.items():
        loss, aux_value, grads, params = expected[name]
        got = results[name]
        config = ModelConfig.from_hf_config(cases[name][0])
        assert abs(got["metrics"]["loss"] - loss) <= 1e-5, name
        if aux:
            k = config.moe_router_topk
            assert aux_value > 0.5 and abs(got["metrics"]["aux_loss"] * k - aux_value) <= 1e-5, \
                (name, got["metrics"]["aux_loss"] * k, aux_value)
        else:
            assert "aux_loss" not in got["metrics"]
        assert bool(got["frozen"]) == freeze
        original = hf_to_megatron(cases[name][1], config, config.padded_vocab_size(1))
        for what, reference in (("params", params), ("grads", grads)):
            if what == "grads" and distopt:
                continue
            mapped = hf_to_megatron(_file_layout(reference, arch), config,
                                    config.padded_vocab_size(1)) if what == "params" else None
            if what == "grads":
                file_grads = _file_layout(grads, arch)
                mapped = {n: t for n, t in original.items()}  # shapes; values below
                for n in mapped:
                    sources = __import__("megatron_simpo.convert.llama", fromlist=["x"]
                                         ).hf_names_for(n, config)
                    if all(s in file_grads for s in sources):
                        mapped[n] = __import__("megatron_simpo.convert.llama", fromlist=["x"]
                                               ).megatron_tensor(n, file_grads.__getitem__,
                                                                 config,
                                                                 config.padded_vocab_size(1))
                    else:
                        mapped[n] = None
            assert set(got[what]) <= set(mapped), name
            for n, value in got[what].items():
                if mapped[n] is None:
                    continue
                reference_value = mapped[n][:value.shape[0]]
                diff = (value[:reference_value.shape[0]] - reference_value).abs().max().item()
                assert diff <= 1e-5, f"{name}: {what} of {n}: max diff {diff}"
        routers = [n for n in got["params"] if n.endswith("mlp.router.weight")]
        experts = [n for n in got["params"] if ".local_experts." in n]
        assert routers and len(experts) == 2 * config.num_experts * sum(config.moe_layer_pattern)
        for n in routers:
            assert torch.equal(got["params"][n], original[n]) == freeze, (name, n)
        for n in experts:
            assert not torch.equal(got["params"][n], original[n]), (name, n)


# ---- 4 ranks: training, save at EP2, resume at EP1 ---------------------------------------------
def _train(rank, argv):
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.loop import run

    return run(parse_args(argv)).losses


def test_save_at_ep2_resume_at_ep1_gives_the_uninterrupted_losses(tmp_path):
    from megatron_simpo.model.tiny import write_default

    tiny = write_default(tmp_path / "data", train_pairs=64, valid_pairs=8, seed=7)
    hf = json.loads(Path(tiny["config"]).read_text())
    hf.update(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=32,
              intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    (tmp_path / "moe.json").write_text(json.dumps(hf))

    def argv(save, ep, **flags):
        out = ["--model-config", str(tmp_path / "moe.json"), "--tokenizer", str(tiny["tokenizer"]),
               "--train-data-path", str(tiny["train"]), "--seq-length", "64",
               "--max-prompt-length", "48", "--micro-batch-size", "1", "--global-batch-size", "8",
               "--lr", "1e-2", "--seed", "3", "--train-iters", "2", "--save", str(save),
               "--use-distributed-optimizer", "--moe-aux-loss-coeff", "0.01",
               "--expert-model-parallel-size", str(ep)]
        for flag, value in flags.items():
            out += ["--" + flag.replace("_", "-"), str(value)]
        return out

    straight = run_on_ranks(2, _train, argv(tmp_path / "a", 2, save_interval=1))[0]
    (tmp_path / "a" / "latest_checkpointed_iteration.txt").write_text("1\n")
    same_ep = run_on_ranks(2, _train, argv(tmp_path / "b", 2, load=tmp_path / "a"))[0]
    other_ep = run_on_ranks(2, _train, argv(tmp_path / "c", 1, load=tmp_path / "a"))[0]
    assert len(straight) == 2 and same_ep == straight[1:]
    assert other_ep == pytest.approx(straight[1:], abs=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows if "aux_loss" in row] == [2]
    assert all(row["aux_loss"] > 0 for row in rows if "aux_loss" in row)


# ---- 2 ranks: expert parallelism under a token budget -------------------------------------------
def _reference_sums(rank, argv):
    """Run megatron-simpo-reference-logps; its file's sums by pair key."""
    import contextlib
    import io

    from megatron_simpo.cli.reference_logps import main
    from megatron_simpo.training.reference_logps import ReferenceLogps

    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    path = argv[argv.index("--reference-logps") + 1]
    stored = ReferenceLogps.load(path)
    return {key: stored.sums[row].tolist() for key, row in stored.rows.items()}


def test_expert_parallel_ranks_run_as_many_microbatches_under_a_token_budget(tmp_path):
    """EP2 on DP2 ranks: every micro-batch's expert all-to-all spans both ranks, so a token
    budget that dealt them 2 and 1 micro-batches hung (training, evaluation, the reference
    pass). Now the planner gives each rank as many: the losses of budgets 288 and 192 and of
    fixed micro-batches agree (same weights, same pairs), 5 held-out pairs evaluate 4, and the
    reference log-probs of 61 pairs (not a multiple of 2) equal EP1's."""
    from megatron_simpo.model.tiny import write_default

    tiny = write_default(tmp_path / "data", train_pairs=56, valid_pairs=5, seed=7)
    hf = json.loads(Path(tiny["config"]).read_text())
    hf.update(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=32,
              intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    (tmp_path / "moe.json").write_text(json.dumps(hf))

    def argv(ep, *flags, source=("--pretrained-checkpoint", str(tmp_path / "sft"))):
        return [*source, "--tokenizer", str(tiny["tokenizer"]), "--train-data-path",
                str(tiny["train"]), "--valid-data-path", str(tiny["valid"]), "--seq-length", "64",
                "--max-prompt-length", "48", "--global-batch-size", "8", "--lr", "1e-2",
                "--seed", "3", "--train-iters", "2", "--expert-model-parallel-size", str(ep),
                *flags]

    run_on_ranks(2, _train, argv(1, "--micro-batch-size", "1", "--save", str(tmp_path / "sft"),
                                 source=("--model-config", str(tmp_path / "moe.json"))))
    runs = {name: run_on_ranks(2, _train, argv(2, *flags), timeout=180)[0] for name, flags in (
        ("fixed", ("--micro-batch-size", "1")),
        ("budget 288", ("--max-tokens-per-microbatch", "288")),
        ("budget 192", ("--max-tokens-per-microbatch", "192")),
        ("packed", ("--max-tokens-per-microbatch", "288", "--pack-sequences")))}
    for name, losses in runs.items():
        assert losses == pytest.approx(runs["fixed"], abs=1e-5), name
    found = {}
    for ep in (1, 2):
        logps = tmp_path / f"reference-ep{ep}.pt"
        found[ep] = run_on_ranks(2, _reference_sums, argv(
            ep, "--algorithm", "dpo", "--max-tokens-per-microbatch", "192",
            "--reference-logps", str(logps)), timeout=180)[0]
    assert len(found[2]) == 61 and found[2].keys() == found[1].keys()
    for key, sums in found[1].items():
        assert found[2][key] == pytest.approx(sums, abs=1e-5)
