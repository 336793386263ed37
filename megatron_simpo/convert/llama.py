"""Llama-family (Llama 2/3/3.x, Mistral, Qwen2, Qwen3) and Gemma-2/3 weights: Hugging Face <-> Megatron local spec.

Three layers of pure functions:

1. ``hf_to_megatron`` / ``megatron_to_hf``: whole-model maps between HF names and Megatron names
   in the unsplit (TP=1, PP=1) layout; exact inverses (vocabulary padding added / stripped).
2. ``split_tensor`` / ``merge_tensors``: one Megatron tensor to and from its TP shards.
3. ``rank_state_dict``: the shard of a given TP rank and pipeline stage, with stage-local names.

Layouts (h = hidden, d = head_dim, H heads, G query groups, F = ffn hidden):
- ``linear_qkv.weight`` [(H + 2G) d, h]: per group g the H/G query heads of g, then k_g, then v_g.
  TP splits whole groups, so a plain split of dim 0 is the TP layout.
- ``linear_fc1.weight`` [2F, h] = [gate; up]; TP rank i holds [gate_i; up_i].
- ``linear_proj`` and ``linear_fc2`` split dim 1; ``word_embeddings`` / ``output_layer`` dim 0.
- HF already uses rotate-half RoPE, so no permutation of q/k is needed.
- Qwen3's per-head ``q_norm`` / ``k_norm`` [d] are ``self_attention.q_layernorm`` /
  ``k_layernorm``, replicated on every TP rank.
- Gemma-2's four norms per layer: ``input_layernorm``, ``post_attention_layernorm`` ->
  ``self_attention.linear_proj.post_layernorm``, ``pre_feedforward_layernorm`` ->
  ``pre_mlp_layernorm``, ``post_feedforward_layernorm`` -> ``mlp.linear_fc2.post_layernorm``
  (Megatron-Bridge's names); the (1 + weight) weights are copied as they are (Megatron's
  zero-centred gamma is the same convention).
- Gemma-3: Gemma-2's names plus the q/k norms above (Megatron's ``qk_layernorm``); a multimodal
  checkpoint's text tensors are read under these names (``hf_io.HFCheckpointReader``).
- Mixture-of-experts layers (Mixtral, Qwen3-MoE): the router ``mlp.router.weight`` [E, h] is
  HF's ``gate`` (replicated on every rank); expert e is
  ``mlp.experts.local_experts.<e>.linear_fc1`` [2F, h] = [gate; up] (Mixtral ``w1``, ``w3``) and
  ``.linear_fc2`` [h, F] (``w2``), split like the dense MLP over the expert-TP ranks; EP rank r
  holds experts r E/EP .. (r + 1) E/EP - 1 under local indices from 0.
"""

from __future__ import annotations

import re

import torch

from megatron_simpo.model.architecture import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)\.")
# HF names of a MoE layer's router and of expert e's (gate, up, down) projections
_HF_MOE = {"MixtralForCausalLM": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{}.",
                                  ("w1", "w3", "w2")),
           "Qwen3MoeForCausalLM": ("mlp.gate.weight", "mlp.experts.{}.",
                                   ("gate_proj", "up_proj", "down_proj"))}

# Megatron suffix within a layer -> HF suffix within a layer, for the one-to-one tensors.
_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
# Gemma: the norms differ (the other one-to-one tensors are _DIRECT's).
_GEMMA_NORMS = {
    "pre_mlp_layernorm.weight": "pre_feedforward_layernorm.weight",
    "self_attention.linear_proj.post_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.post_layernorm.weight": "post_feedforward_layernorm.weight",
}
# ... and those of the query/key norms (``qk_layernorm``).
_QK_NORMS = {
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
_SPLIT_DIM0 = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
               "word_embeddings.weight", "output_layer.weight")
_SPLIT_DIM1 = ("self_attention.linear_proj.weight", "linear_fc2.weight")


def _pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    groups, d = config.num_query_groups, config.kv_channels
    heads_per_group = config.num_attention_heads // groups
    trailing = q.shape[1:]
    q = q.reshape(groups, heads_per_group * d, *trailing)
    k = k.reshape(groups, d, *trailing)
    v = v.reshape(groups, d, *trailing)
    return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)


def _unpack_qkv(qkv: torch.Tensor, config: ModelConfig):
    groups, d = config.num_query_groups, config.kv_channels
    heads_per_group = config.num_attention_heads // groups
    trailing = qkv.shape[1:]
    grouped = qkv.reshape(groups, (heads_per_group + 2) * d, *trailing)
    q, k, v = torch.split(grouped, [heads_per_group * d, d, d], dim=1)
    return (q.reshape(-1, *trailing), k.reshape(-1, *trailing), v.reshape(-1, *trailing))


def _pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    if weight.shape[0] > padded_rows:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size {padded_rows}")
    padding = weight.new_zeros(padded_rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, padding], dim=0)


def _direct(config: ModelConfig) -> dict[str, str]:
    """Megatron suffix -> HF suffix of a layer's one-to-one tensors under ``config``."""
    direct = dict(_DIRECT, **_GEMMA_NORMS) if config.is_gemma else dict(_DIRECT)
    if config.qk_layernorm:
        direct.update(_QK_NORMS)
    return direct


def megatron_names(config: ModelConfig) -> list[str]:
    """Every tensor name of the unsplit Megatron model, in order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(config.num_layers):
        layer = f"decoder.layers.{i}."
        names += [layer + suffix for suffix in _direct(config)]
        names.append(layer + "self_attention.linear_qkv.weight")
        if config.qkv_bias:
            names.append(layer + "self_attention.linear_qkv.bias")
        if config.moe_layer_pattern[i]:
            names.remove(layer + "mlp.linear_fc2.weight")
            names.append(layer + "mlp.router.weight")
            for e in range(config.num_experts):
                names += [f"{layer}mlp.experts.local_experts.{e}.linear_fc{k}.weight"
                          for k in (1, 2)]
        else:
            names.append(layer + "mlp.linear_fc1.weight")
    names.append("decoder.final_layernorm.weight")
    if not config.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def hf_names_for(name: str, config: ModelConfig) -> list[str]:
    """The Hugging Face tensors one unsplit Megatron tensor is built from."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "output_layer.weight":
        return ["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    match = _LAYER.match(name)
    if not match:
        raise KeyError(f"unknown Megatron tensor {name}")
    hf, suffix = f"model.layers.{match.group(1)}.", match.group(2)
    if config.is_moe and config.moe_layer_pattern[int(match.group(1))]:
        router, expert, (gate, up, down) = _HF_MOE[config.architecture]
        expert_match = _EXPERT.match(suffix)
        if suffix == "mlp.router.weight":
            return [hf + router]
        if expert_match:
            prefix = hf + expert.format(expert_match.group(1))
            if expert_match.group(2) == "linear_fc1.weight":
                return [f"{prefix}{gate}.weight", f"{prefix}{up}.weight"]
            return [f"{prefix}{down}.weight"]
    direct = _direct(config)
    if suffix in direct:
        return [hf + direct[suffix]]
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        return [f"{hf}self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
    if suffix == "mlp.linear_fc1.weight":
        return [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
    raise KeyError(f"unknown Megatron tensor {name}")


def megatron_tensor(name: str, get, config: ModelConfig, padded_vocab_size: int) -> torch.Tensor:
    """Build one unsplit Megatron tensor from HF tensors fetched by ``get(hf_name)``."""
    sources = [get(hf_name) for hf_name in hf_names_for(name, config)]
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return _pack_qkv(*sources, config)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(sources, dim=0)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return _pad_vocab(sources[0], padded_vocab_size)
    return sources[0]


def hf_to_megatron(hf_state: dict[str, torch.Tensor], config: ModelConfig,
                   padded_vocab_size: int) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM``-style state dict -> Megatron names, unsplit layout."""
    return {name: megatron_tensor(name, hf_state.__getitem__, config, padded_vocab_size)
            for name in megatron_names(config)}


def hf_tensors_from(name: str, tensor: torch.Tensor, config: ModelConfig
                    ) -> dict[str, torch.Tensor]:
    """Inverse of ``megatron_tensor``: the HF tensors (in ``hf_names_for`` order) of one tensor.

    The results are views of ``tensor`` (padding rows dropped); the tied output layer has none.
    """
    if name == "output_layer.weight" and config.tie_word_embeddings:
        return {}
    hf_names = hf_names_for(name, config)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return dict(zip(hf_names, _unpack_qkv(tensor, config)))
    if name.endswith("linear_fc1.weight"):
        return dict(zip(hf_names, torch.chunk(tensor, 2, dim=0)))
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return {hf_names[0]: tensor[:config.vocab_size]}
    return {hf_names[0]: tensor}


def megatron_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``hf_to_megatron`` (vocabulary padding stripped)."""
    out: dict[str, torch.Tensor] = {}
    for name in megatron_names(config):
        out.update(hf_tensors_from(name, state[name], config))
    return out


def split_tensor(name: str, tensor: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """One unsplit Megatron tensor -> its ``tp_size`` shards (replicated tensors are repeated)."""
    if tp_size == 1:
        return [tensor]
    if name.endswith("linear_fc1.weight"):
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [torch.cat([g, u], dim=0)
                for g, u in zip(torch.chunk(gate, tp_size, 0), torch.chunk(up, tp_size, 0))]
    if name.endswith(_SPLIT_DIM0):
        return list(torch.chunk(tensor, tp_size, dim=0))
    if name.endswith(_SPLIT_DIM1):
        return list(torch.chunk(tensor, tp_size, dim=1))
    return [tensor] * tp_size


def merge_tensors(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``split_tensor``: TP shards -> the unsplit tensor."""
    if len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if name.endswith(_SPLIT_DIM0):
        return torch.cat(shards, dim=0)
    if name.endswith(_SPLIT_DIM1):
        return torch.cat(shards, dim=1)
    return shards[0]


def is_expert(name: str) -> bool:
    """Whether a Megatron tensor is one expert's (split over the expert-TP ranks, not TP)."""
    return ".mlp.experts.local_experts." in name


def expert_range(config: ModelConfig, ep_rank: int, ep_size: int) -> range:
    """Global indices of the experts on expert-parallel rank ``ep_rank``."""
    per_rank = (config.num_experts or 0) // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def stage_layer_range(config: ModelConfig, pp_rank: int, pp_size: int) -> range:
    """Global indices of the layers on pipeline stage ``pp_rank`` (even split)."""
    per_stage = config.num_layers // pp_size
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def to_global_name(local_name: str, config: ModelConfig, pp_rank: int, pp_size: int,
                   ep_rank: int = 0, ep_size: int = 1) -> str:
    """A stage-local Megatron name (``decoder.layers.0...``, ``local_experts.0``) -> its global
    layer and expert indices."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    first = stage_layer_range(config, pp_rank, pp_size).start
    name = f"decoder.layers.{int(match.group(1)) + first}.{match.group(2)}"
    offset = expert_range(config, ep_rank, ep_size).start
    return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}.", name)


def rank_state_dict(full_state: dict[str, torch.Tensor], config: ModelConfig, *,
                    tp_rank: int, tp_size: int, pp_rank: int, pp_size: int,
                    ep_rank: int = 0, ep_size: int = 1, etp_rank: int | None = None,
                    etp_size: int | None = None) -> dict[str, torch.Tensor]:
    """This rank's tensors, named as its ``GPTModel`` names them (stage-local layer and expert
    indices; expert-TP rank and size default to the TP ones).

    With tied embeddings and several stages, the last stage holds its own copy of the embedding
    as ``output_layer.weight`` (Megatron keeps the two in sync through the embedding group).
    """
    first_stage, last_stage = pp_rank == 0, pp_rank == pp_size - 1
    layers = stage_layer_range(config, pp_rank, pp_size)
    experts = expert_range(config, ep_rank, ep_size)
    etp_rank = tp_rank if etp_rank is None else etp_rank
    etp_size = tp_size if etp_size is None else etp_size
    out = {}
    for name, tensor in full_state.items():
        match = _LAYER.match(name)
        if match:
            index = int(match.group(1))
            if index not in layers:
                continue
            local = f"decoder.layers.{index - layers.start}.{match.group(2)}"
            expert = _LOCAL_EXPERT.search(local)
            if expert:
                if int(expert.group(2)) not in experts:
                    continue
                local = _LOCAL_EXPERT.sub(
                    lambda m: f"{m.group(1)}{int(m.group(2)) - experts.start}.", local)
                out[local] = split_tensor(name, tensor, etp_size)[etp_rank]
                continue
        elif name.startswith("embedding."):
            if not first_stage:
                continue
            local = name
        else:  # final norm, output layer
            if not last_stage:
                continue
            local = name
        out[local] = split_tensor(name, tensor, tp_size)[tp_rank]
    if config.tie_word_embeddings and last_stage and not first_stage:
        embedding = full_state["embedding.word_embeddings.weight"]
        out["output_layer.weight"] = split_tensor("output_layer.weight", embedding, tp_size)[tp_rank]
    return out


def load_rank_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor],
                    config: ModelConfig, *, tp_rank: int, tp_size: int, pp_rank: int,
                    pp_size: int, **expert_layout: int) -> None:
    """Copy this rank's share of an unsplit Megatron state dict into ``model`` (all keys must
    match); ``expert_layout``: ``rank_state_dict``'s EP/ETP ranks and sizes."""
    state = rank_state_dict(full_state, config, tp_rank=tp_rank, tp_size=tp_size,
                            pp_rank=pp_rank, pp_size=pp_size, **expert_layout)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"tensor {name}: checkpoint shape {tuple(tensor.shape)} != model "
                             f"shape {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def expected_hf_shape(hf_name: str, config: ModelConfig) -> tuple[int, ...] | None:
    """The shape a Hugging Face tensor must have under ``config`` (None if not a model tensor)."""
    h, d, f = config.hidden_size, config.kv_channels, config.ffn_hidden_size
    q_rows, kv_rows = config.num_attention_heads * d, config.num_query_groups * d
    if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (config.vocab_size, h)
    if hf_name == "model.norm.weight":
        return (h,)
    match = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
    if not match or int(match.group(1)) >= config.num_layers:
        return None
    if config.is_moe and config.moe_layer_pattern[int(match.group(1))]:
        router, expert, (gate, up, down) = _HF_MOE[config.architecture]
        fe, suffix = config.moe_ffn_hidden_size, match.group(2)
        if suffix == router:
            return (config.num_experts, h)
        found = re.match("^" + re.escape(expert).replace(r"\{\}", r"(\d+)") + r"(\w+)\.weight$",
                         suffix)
        if found and int(found.group(1)) < config.num_experts:
            return {gate: (fe, h), up: (fe, h), down: (h, fe)}.get(found.group(2))
        if suffix.startswith("mlp.") or suffix.startswith("block_sparse_moe."):
            return None
    return {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_rows, h), "self_attn.k_proj.weight": (kv_rows, h),
        "self_attn.v_proj.weight": (kv_rows, h), "self_attn.o_proj.weight": (h, q_rows),
        "self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
        "self_attn.v_proj.bias": (kv_rows,),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }.get(match.group(2))
