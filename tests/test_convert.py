"""HF <-> Megatron conversion: logit parity per architecture, bit-exact round trip, bad inputs."""

import io
import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from megatron_simpo.cli import convert as cli
from tests.multiprocess import run_on_ranks
from tests.tiny import ARCHITECTURES, tiny_hf_config, tiny_hf_model

# The converters' ranks run in the suite's reused worlds; the truncated-shard test goes through
# the command's own fresh processes, as a user's run does.
hf_to_megatron_main = partial(cli.hf_to_megatron_main, run_on_ranks=run_on_ranks)
megatron_to_hf_main = partial(cli.megatron_to_hf_main, run_on_ranks=run_on_ranks)

SEQ = 64


# A second, named chat template, as tool-calling fine-tunes carry: apply_chat_template picks it
# for rows with tools; transformers saves it as additional_chat_templates/tool_use.jinja.
TOOL_USE_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ tools | tojson }}"


def _save_hf(model, path: Path) -> Path:
    from megatron_simpo.model.tiny import build_tokenizer

    model.save_pretrained(path)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = {"default": tokenizer.chat_template, "tool_use": TOOL_USE_TEMPLATE}
    tokenizer.save_pretrained(path)
    return path


def _megatron_logits(model, tokens):
    """Forward through Megatron's schedule (so PP works); logits [b, s, V_p/tp] on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, m):
        batch = next(data_iterator)
        output = m(input_ids=batch, position_ids=torch.arange(batch.shape[1]).expand_as(batch),
                   attention_mask=None)
        return output, lambda out: (out.sum() * 0, torch.tensor(0, dtype=torch.int), out.detach())

    model.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True)
    return outputs[0] if outputs else None


def _convert_and_run(rank, tp, pp, cases, out_dir):
    from megatron.core import parallel_state as ps

    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.distributed import runtime
    from megatron_simpo.convert.hf_to_megatron import convert_rank
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.builder import build_model
    from megatron_simpo.distributed.parallel import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    runtime.initialize(parallel, seed=0)
    results = {}
    for arch, hf_dir, tokens in cases:
        config = ModelConfig.from_hf_config(hf_dir)
        save = Path(out_dir) / f"{arch}-tp{tp}-pp{pp}"
        convert_rank(hf_dir, save, config, parallel, torch.float32)
        model = build_model(config, parallel)  # fresh random weights, replaced by the load
        checkpointing.load_checkpoint(checkpointing.find_checkpoint(save), model, model_config=config)
        results[arch] = _megatron_logits(model, tokens)
    return ps.get_pipeline_model_parallel_rank() == pp - 1, results


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {}
    for seed, arch in enumerate(sorted(ARCHITECTURES)):
        model = tiny_hf_model(tiny_hf_config(arch), seed=seed)
        models[arch] = (model, _save_hf(model, root / arch))
    # Gemma-3's text model inside a multimodal checkpoint: converted from its text weights
    text_model = models["gemma3"][0]
    models["gemma3_multimodal"] = (text_model, _save_hf(_gemma3_multimodal(text_model),
                                                        root / "gemma3_multimodal"))
    return models


def _gemma3_multimodal(text_model):
    """A Gemma3ForConditionalGeneration (tiny SigLIP tower) holding ``text_model``'s weights."""
    import transformers

    text = {k: v for k, v in tiny_hf_config("gemma3").items()
            if k not in ("architectures", "torch_dtype", "attn_implementation")}
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text_model.model.state_dict())
    return model


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_converted_checkpoint_gives_hugging_face_logits(hf_models, tmp_path, tp, pp):
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    cases = [(arch, str(path), tokens) for arch, (_, path) in hf_models.items()]
    results = run_on_ranks(tp * pp, _convert_and_run, tp, pp, cases, str(tmp_path))
    last_stage = [logits for is_last, logits in results if is_last]
    assert len(last_stage) == tp
    for arch, (model, _) in hf_models.items():
        with torch.no_grad():
            expected = model(tokens).logits
        logits = torch.cat([r[arch] for r in last_stage], dim=-1)[..., :expected.shape[-1]]
        diff = (logits - expected).abs().max().item()
        assert diff <= 1e-5, f"{arch} TP={tp} PP={pp}: max |logit diff| {diff}"


@pytest.mark.parametrize("arch", ["llama3.2", "mistral0.1", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_models, tmp_path, arch, capsys):
    import transformers
    from safetensors.torch import load_file

    model, hf_dir = hf_models[arch]
    hf_to_megatron_main(["--hf-path", str(hf_dir), "--save", str(tmp_path / "mg"),
                         "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                         "--dtype", "fp32"])
    megatron_to_hf_main(["--load", str(tmp_path / "mg"), "--save", str(tmp_path / "hf"),
                         "--max-shard-size", "40KB"])
    files = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    original, exported = load_file(hf_dir / "model.safetensors"), {}
    for file in files:
        exported.update(load_file(tmp_path / "hf" / file))
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation=model.config._attn_implementation).eval()
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)
    if arch.startswith("gemma"):  # answers are generated from the export: greedy, past the window
        prompt = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
        options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(reloaded.generate(prompt, **options), model.generate(prompt, **options))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == \
        json.loads((hf_dir / "config.json").read_text())["architectures"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.chat_template == transformers.AutoTokenizer.from_pretrained(hf_dir).chat_template
    assert tokenizer.chat_template["tool_use"] == TOOL_USE_TEMPLATE  # every named template
    if arch != "llama3.2":
        return  # the rest is about the folder format, the same for every architecture
    # The sharded export is itself a valid input: import it again and export unsharded. With
    # no --dtype both directions keep the checkpoint's own (fp32 here: no silent downcast).
    capsys.readouterr()
    hf_to_megatron_main(["--hf-path", str(tmp_path / "hf"), "--save", str(tmp_path / "mg2"),
                         "--tensor-parallel-size", "2"])
    megatron_to_hf_main(["--load", str(tmp_path / "mg2"), "--save", str(tmp_path / "hf3")])
    out = capsys.readouterr().out
    assert f"(TP=2, PP=1, fp32: as saved, from {tmp_path / 'hf' / 'config.json'})" in out
    assert "(fp32: as saved in the checkpoint)" in out
    again = load_file(tmp_path / "hf3" / "model.safetensors")
    assert all(torch.equal(tensor, again[name]) for name, tensor in original.items())
    exported_config = json.loads((tmp_path / "hf3" / "config.json").read_text())
    assert exported_config["torch_dtype"] == "float32"
    assert exported_config.get("dtype", "float32") == "float32"


def test_multimodal_gemma3_exports_its_text_model(hf_models, tmp_path):
    """Imported from a Gemma3ForConditionalGeneration folder, the text model exports as a
    Gemma3ForCausalLM that transformers loads, with the text model's logits."""
    import transformers

    model, hf_dir = hf_models["gemma3_multimodal"]
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == [
        "Gemma3ForConditionalGeneration"]
    hf_to_megatron_main(["--hf-path", str(hf_dir), "--save", str(tmp_path / "mg")])
    megatron_to_hf_main(["--load", str(tmp_path / "mg"), "--save", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "text_config" not in config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    tokens = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def _train_two_steps(rank, argv):
    from megatron_simpo.cli.arguments import parse_args
    from megatron_simpo.training.loop import run

    run(parse_args(argv))


def _trained_logits(rank, load, tokens):
    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.builder import build_model
    from megatron_simpo.distributed.parallel import ParallelConfig

    runtime.initialize(ParallelConfig(tensor_model_parallel_size=2))
    checkpoint = checkpointing.find_checkpoint(load)
    config = checkpointing.read_model_config(checkpoint)
    model = build_model(config, ParallelConfig(tensor_model_parallel_size=2))
    checkpointing.load_checkpoint(checkpoint, model, model_config=config)
    return _megatron_logits(model, tokens)


def test_trained_checkpoint_exports_and_loads_in_transformers(tmp_path):
    import transformers

    from megatron_simpo.model.tiny import write_default

    tiny = write_default(tmp_path / "tiny", train_pairs=64, valid_pairs=8)
    # --tokenizer given as a whole model folder (tokenizer, config.json, weights): the saved
    # iterations carry its tokenizer only, and the export writes the trained weights, not its.
    base = shutil.copytree(tiny["tokenizer"], tmp_path / "base-model")
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(tiny["config"])).save_pretrained(base)
    argv = ["--model-config", str(tiny["config"]), "--tokenizer", str(base),
            "--train-data-path", str(tiny["train"]), "--seq-length", "64",
            "--max-prompt-length", "48", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--train-iters", "3", "--lr", "1e-3", "--use-distributed-optimizer",
            "--pipeline-model-parallel-size", "2", "--save", str(tmp_path / "run"),
            "--save-interval", "2"]
    run_on_ranks(2, _train_two_steps, argv)
    # A named iteration exports too, and differs from the latest (training moved the weights).
    megatron_to_hf_main(["--load", str(tmp_path / "run"), "--save", str(tmp_path / "hf_it2"),
                         "--iteration", "2"])
    megatron_to_hf_main(["--load", str(tmp_path / "run"), "--save", str(tmp_path / "hf")])
    assert not list((tmp_path / "run" / "iter_0000003" / "tokenizer").glob("*.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 52, (2, 24))
    expected = torch.cat(run_on_ranks(2, _trained_logits, str(tmp_path / "run"), tokens), dim=-1)
    with torch.no_grad():
        logits = model(tokens).logits
    assert (expected[..., :logits.shape[-1]] - logits).abs().max() <= 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    # A run from --model-config has no original config.json: the special tokens come from its
    # tokenizer, so transformers' generate stops at the tokenizer's end of turn.
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(generation, name) == \
            getattr(tokenizer, name) is not None, name
    from safetensors.torch import load_file

    at_2 = load_file(tmp_path / "hf_it2" / "model.safetensors")
    at_3 = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(at_2) == set(at_3)
    assert not torch.equal(at_2["model.norm.weight"], at_3["model.norm.weight"])


def test_an_export_stands_when_its_tokenizer_cannot_be_loaded(tmp_path, capsys):
    # The special-token ids are filled from the run's tokenizer where config.json has none; a
    # tokenizer that does not load (a damaged file, a missing package) leaves them out, said.
    from megatron_simpo.convert.megatron_to_hf import _with_special_tokens

    (tmp_path / "tokenizer_config.json").write_text("{damaged")
    assert _with_special_tokens({"eos_token_id": 2}, tmp_path) == {"eos_token_id": 2}
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: {tmp_path} cannot be loaded as a tokenizer (")
    assert line.endswith("config.json has no bos_token_id, pad_token_id: set them before "
                         "generating")


# ---- bad input -------------------------------------------------------------------------------

def _error_line(capsys, main, argv) -> str:
    """A refused conversion ends as every command does: exit code 2, its error on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    prog = {cli.hf_to_megatron_main: cli.IMPORT.prog,
            cli.megatron_to_hf_main: cli.EXPORT.prog}[getattr(main, "func", main)]
    assert err.startswith(f"{prog}: error: ")
    return err


def _convert_error(capsys, argv) -> str:
    return _error_line(capsys, hf_to_megatron_main, argv)


def test_unsupported_architecture_is_named(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        dict(tiny_hf_config("llama3"), architectures=["GPT2LMHeadModel"], model_type="gpt2")))
    message = _convert_error(capsys, ["--hf-path", str(tmp_path / "hf"), "--save", str(tmp_path / "o")])
    assert "unsupported architecture 'GPT2LMHeadModel'" in message and "LlamaForCausalLM" in message


def test_help_lists_the_supported_architectures(capsys):
    from megatron_simpo.model.architecture import SUPPORTED_ARCHITECTURES

    with pytest.raises(SystemExit):
        hf_to_megatron_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for architecture in SUPPORTED_ARCHITECTURES:
        assert architecture in text
    assert "Qwen3ForCausalLM" in SUPPORTED_ARCHITECTURES


def test_tp_that_does_not_divide_groups_is_refused(hf_models, tmp_path, capsys):
    message = _convert_error(capsys, ["--hf-path", str(hf_models["llama3"][1]), "--save",
                                      str(tmp_path / "o"), "--tensor-parallel-size", "4"])
    assert "--tensor-parallel-size (4) must divide the number of query groups" in message


def test_non_empty_output_is_refused_without_force(hf_models, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    message = _convert_error(capsys, ["--hf-path", str(hf_models["llama3"][1]), "--save",
                                      str(tmp_path / "o")])
    assert "exists and is not empty (use --force" in message
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"


def test_force_replaces_a_later_checkpoint_and_an_interrupted_one_is_no_obstacle(
        hf_models, converted_llama3, tmp_path):
    from megatron_simpo.checkpoint.checkpointing import find_checkpoint

    # A folder holding a training run at iteration 4 (here: a copy): --force replaces it, and
    # its tracker names the conversion, not the old iteration 4 (an export would take that).
    shutil.copytree(converted_llama3, tmp_path / "o")
    shutil.copytree(tmp_path / "o" / "iter_0000000", tmp_path / "o" / "iter_0000004")
    (tmp_path / "o" / "latest_checkpointed_iteration.txt").write_text("4\n")
    hf_to_megatron_main(["--hf-path", str(hf_models["mistral"][1]), "--save",
                         str(tmp_path / "o"), "--force"])
    assert find_checkpoint(tmp_path / "o") == tmp_path / "o" / "iter_0000000"
    assert sorted(p.name for p in (tmp_path / "o").glob("iter_*")) == ["iter_0000000"]
    # What a killed conversion leaves (its unfinished save) needs no --force.
    (tmp_path / "killed" / "iter_0000000.partial").mkdir(parents=True)
    hf_to_megatron_main(["--hf-path", str(hf_models["mistral"][1]), "--save",
                         str(tmp_path / "killed")])
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [
        "iter_0000000", "latest_checkpointed_iteration.txt"]


def test_the_converted_tokenizer_is_the_one_transformers_loads_from_the_hf_folder(hf_models,
                                                                                   tmp_path):
    """Mistral's and Mixtral's tokenizer files name LlamaTokenizer: beside the model's
    config.json transformers loads their tokenizer.json as it is, alone it rebuilds a Llama
    tokenizer (other ids). The checkpoint's tokenizer keeps the config beside it."""
    import transformers

    from megatron_simpo.convert.hf_io import copy_metadata

    src = shutil.copytree(hf_models["mistral"][1], tmp_path / "hf")
    settings = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps(dict(settings,
                                                               tokenizer_class="LlamaTokenizer")))
    tokenizer_dir, _ = copy_metadata(src, tmp_path / "assets")
    original = transformers.AutoTokenizer.from_pretrained(src)
    copied = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    text = original.apply_chat_template([{"role": "user", "content": "reverse abc"},
                                         {"role": "assistant", "content": "cba"}], tokenize=False)
    assert type(copied) is type(original)
    assert copied(text)["input_ids"] == original(text)["input_ids"]
    assert not list(tokenizer_dir.glob("*.safetensors"))  # the tokenizer, not the model


def test_a_mistral_tekken_tokenizer_travels_with_the_checkpoint(tmp_path):
    """Mistral-Nemo, Ministral and Mistral-Small ship tekken.json (mistral-common's format),
    which transformers loads where mistral-common is installed (vLLM installs it) or where
    there is no tokenizer.json: it is part of the tokenizer copied, and a folder holding only it
    holds a tokenizer; the weights beside it are not copied."""
    from megatron_simpo.checkpoint.tokenizer_asset import copy_tokenizer

    src = tmp_path / "nemo"
    src.mkdir()
    for name in ("tekken.json", "tokenizer.json", "tokenizer_config.json", "config.json",
                 "model.safetensors"):
        (src / name).write_text("{}")
    assert copy_tokenizer(src, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "config.json", "tekken.json", "tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    assert copy_tokenizer(src, tmp_path / "only-tekken", model_config=False)
    assert [p.name for p in (tmp_path / "only-tekken").iterdir()] == ["tekken.json"]


def _broken_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "missing":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "shape":
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(dict(config, intermediate_size=48)))
    elif how == "index":
        (dst / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    elif how == "fp8":  # a quantized file whose config.json does not say so
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        name = "model.layers.1.self_attn.o_proj.weight"
        state[name] = state[name].to(torch.float8_e4m3fn)
        save_file(state, weights, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def converted_llama3(hf_models, tmp_path_factory):
    save = tmp_path_factory.mktemp("converted") / "llama3"
    hf_to_megatron_main(["--hf-path", str(hf_models["llama3"][1]), "--save", str(save)])
    return save


@pytest.mark.parametrize("how, message", [
    ("missing", "no model.safetensors or model.safetensors.index.json"),
    ("truncated", "model.safetensors: unreadable safetensors file"),
    ("shape", "tensor model.layers.0.mlp.down_proj.weight has shape (32, 64), but config.json implies (32, 48)"),
    ("index", "model-00002-of-00002.safetensors: listed in the index but missing"),
    ("fp8", "tensor model.layers.1.self_attn.o_proj.weight is stored as F8_E4M3, not as "
            "floating point of 16 bits or more (quantized weights are unsupported"),
])
def test_bad_checkpoints_fail_and_publish_nothing(hf_models, converted_llama3, tmp_path, capsys,
                                                 how, message):
    from megatron_simpo.checkpoint.checkpointing import find_checkpoint

    src = _broken_copy(hf_models["llama3"][1], tmp_path / "hf", how)
    # Over an existing valid checkpoint, with --force: a failure must leave it intact.
    shutil.copytree(converted_llama3, tmp_path / "o")
    before = find_checkpoint(tmp_path / "o")
    error = _convert_error(capsys, ["--hf-path", str(src), "--save", str(tmp_path / "o"),
                                    "--force", "--tensor-parallel-size", "2"])
    assert message in error
    assert find_checkpoint(tmp_path / "o") == before and (before / "metadata.json").is_file()
    # Into an empty folder: no checkpoint appears at all.
    _convert_error(capsys, ["--hf-path", str(src), "--save", str(tmp_path / "fresh")])
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path / "fresh")


def test_export_refuses_a_folder_without_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    error = _error_line(capsys, megatron_to_hf_main,
                        ["--load", str(tmp_path / "empty"), "--save", str(tmp_path / "hf")])
    assert "no checkpoint there" in error


def test_checkpoint_keys_are_the_transformer_engine_spec_names(hf_models, tmp_path):
    """Megatron-Core saves the local spec's norms under the TE spec's fused names, so a converted
    checkpoint loads into either spec; pin that, since the converter relies on it."""
    from megatron.core import dist_checkpointing

    from megatron_simpo.checkpoint.checkpointing import find_checkpoint

    hf_to_megatron_main(["--hf-path", str(hf_models["llama3"][1]), "--save", str(tmp_path / "mg")])
    keys = set(dist_checkpointing.load_tensors_metadata(str(find_checkpoint(tmp_path / "mg"))))
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any("input_layernorm" in key or "pre_mlp_layernorm" in key for key in keys)


def _save_with_nan(rank, save, hf_dir):
    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.distributed import runtime
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.builder import build_model
    from megatron_simpo.distributed.parallel import ParallelConfig

    config = ModelConfig.from_hf_config(hf_dir)
    runtime.initialize(ParallelConfig(), seed=0)
    model = build_model(config, ParallelConfig())
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight[0, 0] = float("nan")
    checkpointing.save_model_only(save, 0, model, config)


def test_export_refuses_non_finite_weights_unless_allowed(hf_models, tmp_path, capsys):
    run_on_ranks(1, _save_with_nan, str(tmp_path / "mg"), str(hf_models["llama3"][1]))
    error = _error_line(capsys, megatron_to_hf_main,
                        ["--load", str(tmp_path / "mg"), "--save", str(tmp_path / "hf")])
    assert "tensor decoder.layers.1.mlp.linear_fc2.weight holds NaN/inf values" in error
    assert not (tmp_path / "hf").exists()
    megatron_to_hf_main(["--load", str(tmp_path / "mg"), "--save", str(tmp_path / "hf"),
                         "--allow-non-finite"])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_import_refuses_non_finite_weights_unless_allowed(hf_models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from megatron_simpo.checkpoint.checkpointing import find_checkpoint

    src = shutil.copytree(hf_models["llama3"][1], tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.2.self_attn.k_proj.weight"][3, 1] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    # TP=2: both ranks read the tensor; PP=2: only the second stage does, yet the message that
    # is reported (the first rank's) names it too.
    for layout in (["--tensor-parallel-size", "2"], ["--pipeline-parallel-size", "2"]):
        error = _convert_error(capsys, ["--hf-path", str(src), "--save", str(tmp_path / "mg"),
                                        *layout])
        assert error == (f"{cli.IMPORT.prog}: error: conversion failed, nothing was published: "
                         f"{src / 'model.safetensors'}: tensor model.layers.2.self_attn.k_proj."
                         "weight holds NaN/inf values; refusing to convert it (--allow-non-finite "
                         "to convert anyway)\n")
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path / "mg")
    hf_to_megatron_main(["--hf-path", str(src), "--save", str(tmp_path / "mg"),
                         "--allow-non-finite"])
    assert (find_checkpoint(tmp_path / "mg") / "metadata.json").is_file()


def test_non_finite_values_are_found_in_every_chunk():
    """The reader checks NaN/inf a chunk at a time (a whole-tensor ``torch.isfinite`` makes
    temporaries twice an embedding's size): a bad value anywhere is found, as by the plain check."""
    from megatron_simpo.convert.hf_io import all_finite

    base = torch.randn(10, 7).to(torch.bfloat16)
    assert all_finite(base, chunk_bytes=6)
    for value in (float("nan"), float("inf"), -float("inf")):
        for at in range(base.numel()):
            bad = base.clone()
            bad.view(-1)[at] = value
            assert all_finite(bad, chunk_bytes=6) == bool(torch.isfinite(bad).all()) is False


def _load_weights(rank, checkpoint):
    from megatron_simpo.checkpoint.checkpointing import (CheckpointError, find_checkpoint,
                                                         load_checkpoint, read_model_config)
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.builder import build_model

    folder = find_checkpoint(checkpoint)
    config = read_model_config(folder)
    runtime.initialize(ParallelConfig(), seed=0, model_config=config)
    try:
        load_checkpoint(folder, build_model(config, ParallelConfig()), model_config=config)
    except CheckpointError as error:
        return str(error)
    return "loaded"


def test_a_garbled_shard_of_the_right_size_is_named_at_load(converted_llama3, tmp_path):
    """Bytes of one tensor overwritten in place (0xFF..: NaN in fp32); sizes unchanged: the
    shard's checksum names it; without checksums (a checkpoint saved before they were kept)
    the loaded tensor is named."""
    from torch.distributed.checkpoint import FileSystemReader

    damaged = shutil.copytree(converted_llama3, tmp_path / "damaged")
    folder = damaged / "iter_0000000"
    name = "decoder.final_layernorm.weight"
    [info] = [d for i, d in FileSystemReader(str(folder)).read_metadata()
                       .storage_data.items() if i.fqn == name]
    shard = folder / info.relative_path
    data = bytearray(shard.read_bytes())
    tensor = torch.load(io.BytesIO(bytes(data[info.offset:info.offset + info.length])),
                        weights_only=True)
    raw = tensor.numpy().tobytes()
    at = data.index(raw, info.offset)
    data[at:at + len(raw)] = b"\xff" * len(raw)
    size = shard.stat().st_size
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size
    [message] = run_on_ranks(1, _load_weights, str(damaged))
    assert message == (f"checkpoint {folder}: {shard.name} (its bytes changed since it was "
                       "saved: CRC-32 differs); a damaged copy, refusing to load it")
    (folder / "checksums.json").unlink()
    [message] = run_on_ranks(1, _load_weights, str(damaged))
    assert message == (f"checkpoint {folder}: tensor {name} holds NaN/inf values (a damaged shard "
                       "or a diverged run); refusing to load it")


@pytest.mark.parametrize("damage", ["cut", "byte"])
def test_a_damaged_shard_is_named_by_the_exporter(converted_llama3, tmp_path, capsys, damage):
    """The exporter checks the shards against the save's checksums too (one changed byte used
    to export silently); without checksums a cut shard is named by the loader's failure."""
    damaged = tmp_path / "damaged"
    shutil.copytree(converted_llama3, damaged)
    folder = damaged / "iter_0000000"
    [shard, *_] = sorted(folder.glob("*.distcp"))
    size = shard.stat().st_size
    if damage == "cut":
        shard.write_bytes(shard.read_bytes()[:100])
        reason = f"{shard.name} (100 bytes, {size} when saved)"
    else:
        raw = bytearray(shard.read_bytes())
        raw[size // 2] ^= 0x01
        shard.write_bytes(bytes(raw))
        reason = f"{shard.name} (its bytes changed since it was saved: CRC-32 differs)"
    argv = ["--load", str(damaged), "--save", str(tmp_path / "hf")]
    message = _error_line(capsys, cli.megatron_to_hf_main, argv)
    assert f"checkpoint {folder}: {reason}; a damaged copy, refusing to load it" in message
    assert not (tmp_path / "hf").exists()
    if damage == "cut":
        (folder / "checksums.json").unlink()
        message = _error_line(capsys, cli.megatron_to_hf_main, argv)
        assert f"cannot read checkpoint {folder}: shard {shard.name}" in message


@pytest.mark.parametrize("damage, expected", [
    (lambda it: (it / "metadata.json").write_text('{"sharded_backend": "torch'),
     "metadata.json (damaged: Unterminated string"),
    (lambda it: (it / "common.pt").write_bytes((it / "common.pt").read_bytes()[:50]),
     "common.pt (damaged: "),
    (lambda it: (it / "common.pt").unlink(),
     "common.pt (missing: megatron-core 0.19 and later keep it in the shards, and this is "),
    (lambda it: (it / "model_config.json").write_text('{"num_layers": 2'),
     "model_config.json (damaged: Expecting "),
    (lambda it: (it / "model_config.json").unlink(), "model_config.json (missing)"),
    (lambda it: (it / "model_config.json").write_text('[1]'),
     "model_config.json (damaged: model config: unknown fields [1])"),
    (lambda it: (it / "model_config.json").write_text('{"num_layers": "two"}'),
     "model_config.json (damaged: "),
])
def test_a_damaged_checkpoint_file_is_named(converted_llama3, tmp_path, damage, expected):
    """What a checkpoint's readers see first (its architecture, its common state): a damaged or
    missing file is named, as a damaged shard is."""
    from megatron_simpo.checkpoint.layout import (CheckpointError, read_common_state,
                                                  read_model_config)

    damaged = tmp_path / "damaged"
    shutil.copytree(converted_llama3, damaged)
    iteration = damaged / "iter_0000000"
    if not (iteration / "common.pt").is_file() and "common.pt" in expected:
        pytest.skip("this megatron-core keeps the common state in the shards")
    damage(iteration)
    with pytest.raises(CheckpointError) as error:
        read_model_config(iteration)
        read_common_state(iteration)
    assert str(error.value).startswith(f"cannot read checkpoint {iteration}: {expected}"), error


def test_safetensors_are_written_as_tensors_arrive(tmp_path):
    """Each tensor's bytes are on disk, in their place, before the next is asked for (so the
    writer holds one tensor, not a shard); the files are byte for byte safetensors' own."""
    from safetensors.torch import save_file

    from megatron_simpo.convert.hf_io import write_safetensors

    generator = torch.Generator().manual_seed(0)
    state = {"b.weight": torch.randn(6, 4, generator=generator).to(torch.bfloat16),
             "a.weight": torch.randn(8, generator=generator),
             "c.weight": torch.randn(3, 5, generator=generator).to(torch.float16),
             "d.weight": torch.randn(64, generator=generator)}
    written = []

    def tensors():
        for name, tensor in state.items():
            for done in written:  # every tensor handed over so far is already in the file
                [file] = [f for f in (tmp_path / "out").glob("*.safetensors")
                          if done in _safetensors_names(f)]
                assert _read_back(file, done).equal(state[done]), done
            yield name, tensor[:]  # a view, as the exporter hands over
            written.append(name)

    (tmp_path / "out").mkdir()
    files = write_safetensors(tensors(), {n: (tuple(t.shape), t.dtype) for n, t in state.items()},
                              tmp_path / "out", max_shard_size=100)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in state.values())
    for file in files:
        names = [n for n, f in index["weight_map"].items() if f == file.name]
        save_file({n: state[n] for n in names}, tmp_path / "expected.safetensors",
                  metadata={"format": "pt"})
        assert file.read_bytes() == (tmp_path / "expected.safetensors").read_bytes(), file.name


def _safetensors_names(file: Path) -> list[str]:
    length = int.from_bytes(file.read_bytes()[:8], "little")
    return [n for n in json.loads(file.read_bytes()[8:8 + length]) if n != "__metadata__"]


def _read_back(file: Path, name: str) -> torch.Tensor:
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    entry = json.loads(raw[8:8 + length])[name]
    begin, end = entry["data_offsets"]
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[entry["dtype"]]
    data = bytearray(raw[8 + length + begin:8 + length + end])
    return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def _count_loaded_tensors(rank, load, save):
    """Export, recording how many tensors each read of the checkpoint asks for."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_simpo.convert.conversion import ExportConfig, _export_worker

    reads, original = [], dist_checkpointing.load

    def counting_load(state, *args, **kwargs):
        reads.append(sum(1 for _ in nested_values(state)))
        return original(state, *args, **kwargs)

    dist_checkpointing.load = counting_load
    try:
        _export_worker(rank, ExportConfig(load=load, save=save))
    finally:
        dist_checkpointing.load = original
    return reads


def test_export_reads_the_checkpoint_a_layer_at_a_time(hf_models, converted_llama3, tmp_path):
    """The exporter never holds the whole model: each read of the checkpoint is one layer (or
    the embedding, or the final norm), and the export is still the original, bit for bit."""
    from safetensors.torch import load_file

    [reads] = run_on_ranks(1, _count_loaded_tensors, str(converted_llama3), str(tmp_path / "hf"))
    config = tiny_hf_config("llama3")
    per_layer = 6  # qkv, proj, fc1, fc2 and the two norms
    parts = config["num_hidden_layers"] + 2 + (not config.get("tie_word_embeddings"))
    assert len(reads) == parts and max(reads) == per_layer, reads
    original = load_file(hf_models["llama3"][1] / "model.safetensors")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(original) == set(exported)
    assert all(torch.equal(tensor, exported[name]) for name, tensor in original.items())


STREAM_ARCHS = ("llama3", "llama3.2", "qwen2")  # untied, tied, QKV bias


def _streamed_and_filled(rank, tp, pp, hf_dirs, out_dir, also_load):
    """Per architecture: import streamed (``convert_rank``, bf16) and, as the reference, fill the
    whole model shard from the HF state dict (``llama.load_rank_state``) and save it with
    Megatron-Core's own writer. Load both, and the streamed checkpoints in ``also_load`` (saved
    at another layout), through the normal load path. Returns the loaded states and, in order,
    the streamed import's writes ("w") and builds of Megatron tensors (the bytes the tensors
    written before it still held then)."""
    import importlib
    import weakref

    import torch.distributed.checkpoint.filesystem as dcp_files
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from megatron_simpo.checkpoint import checkpointing
    from megatron_simpo.convert import hf_to_megatron, llama
    from megatron_simpo.distributed import runtime
    from megatron_simpo.distributed.parallel import ParallelConfig
    from megatron_simpo.model.architecture import ModelConfig
    from megatron_simpo.model.builder import build_model

    # Megatron-Core's writer binds torch's _write_item when imported: before it is wrapped here.
    importlib.import_module("megatron.core.dist_checkpointing.strategies.torch")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    runtime.initialize(parallel, seed=0)
    out, events, written = {}, [], []
    build, write = hf_to_megatron.megatron_tensor, dcp_files._write_item

    def on_write(*args, **kwargs):
        events.append("w")
        if torch.is_tensor(args[2]):
            written.append(weakref.ref(args[2]))
        return write(*args, **kwargs)

    def on_build(*args):
        alive = [ref() for ref in written]
        events.append(sum(t.untyped_storage().nbytes() for t in alive if t is not None))
        return build(*args)

    for arch, hf_dir in hf_dirs.items():
        config = ModelConfig.from_hf_config(hf_dir)
        streamed = Path(out_dir) / f"{arch}-tp{tp}-pp{pp}"
        hf_to_megatron.megatron_tensor, dcp_files._write_item = on_build, on_write
        try:
            hf_to_megatron.convert_rank(hf_dir, streamed, config, parallel, torch.bfloat16)
        finally:
            hf_to_megatron.megatron_tensor, dcp_files._write_item = build, write
        full = llama.hf_to_megatron(load_file(Path(hf_dir) / "model.safetensors"), config,
                                    config.padded_vocab_size(tp))
        model = build_model(config, parallel, params_dtype=torch.bfloat16)
        llama.load_rank_state(model, full, config, tp_rank=ps.get_tensor_model_parallel_rank(),
                              tp_size=tp, pp_rank=ps.get_pipeline_model_parallel_rank(),
                              pp_size=pp)
        checkpointing.save_model_only(Path(out_dir) / f"{arch}-ref-tp{tp}-pp{pp}", 0, model, config)
        for name in [streamed.name, f"{arch}-ref-tp{tp}-pp{pp}", *(f"{arch}-{x}" for x in also_load)]:
            model = build_model(config, parallel, params_dtype=torch.bfloat16)
            path = checkpointing.find_checkpoint(Path(out_dir) / name)
            checkpointing.load_checkpoint(path, model, model_config=config)
            out[name] = {k: v.clone() for k, v in model.state_dict().items()
                         if not k.endswith("_extra_state")}
    return out, events


def test_streamed_import_equals_the_filled_model_saved(hf_models, tmp_path):
    """The import builds each tensor only as the writer writes it (never two builds without a
    write between, every tensor written before a build already freed), and its checkpoint holds
    what saving the whole filled model with
    Megatron-Core's writer holds: same keys, shapes, dtypes and chunks, and bit-identical weights
    when loaded at its own layout and at another (TP=2 <-> PP=2)."""
    from torch.distributed.checkpoint import FileSystemReader

    hf_dirs = {arch: str(hf_models[arch][1]) for arch in STREAM_ARCHS}
    loaded = run_on_ranks(2, _streamed_and_filled, 2, 1, hf_dirs, str(tmp_path), [])
    loaded += run_on_ranks(2, _streamed_and_filled, 1, 2, hf_dirs, str(tmp_path), ["tp2-pp1"])
    for arch in STREAM_ARCHS:
        for layout in ("tp2-pp1", "tp1-pp2"):
            metadata = [FileSystemReader(str(tmp_path / name / "iter_0000000")).read_metadata()
                        .state_dict_metadata for name in (f"{arch}-{layout}", f"{arch}-ref-{layout}")]
            assert metadata[0].keys() == metadata[1].keys()
            for key, streamed in metadata[0].items():
                reference = metadata[1][key]
                assert type(streamed) is type(reference), key
                if not hasattr(reference, "chunks"):
                    continue  # a ShardedObject's bytes
                assert (streamed.size, streamed.properties.dtype) == \
                    (reference.size, reference.properties.dtype), key
                assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in streamed.chunks) == \
                    sorted((tuple(c.offsets), tuple(c.sizes)) for c in reference.chunks), key
    for rank, (states, events) in enumerate(loaded):
        built = "".join("w" if e == "w" else "b" for e in events)
        assert built.count("b") >= 3 * 10 and "bb" not in built, built
        assert not any(e for e in events if e != "w"), events
        layout = "tp2-pp1" if rank < 2 else "tp1-pp2"
        for arch in STREAM_ARCHS:
            reference = states[f"{arch}-ref-{layout}"]
            others = [f"{arch}-{layout}"] + ([f"{arch}-tp2-pp1"] if rank >= 2 else [])
            for name in others:
                assert states[name].keys() == reference.keys()
                for key, tensor in reference.items():
                    assert tensor.dtype == states[name][key].dtype == torch.bfloat16, key
                    assert torch.equal(tensor, states[name][key]), (name, key)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="prctl")
@pytest.mark.parametrize("how", ["sigterm", "ctrl_c", "kill_9"])
def test_a_stopped_conversion_ends_its_ranks_and_publishes_nothing(hf_models, tmp_path, how):
    """SIGTERM (scancel) to the converter, Ctrl-C to its process group, or kill -9 of it, while
    its ranks run: no rank left running (they published the checkpoint later before), nothing
    published; SIGTERM and Ctrl-C: one line, its temporary files removed; Ctrl-C ends it by
    SIGINT, as Python does (a calling script stops too)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning")
    converter = subprocess.Popen(
        [sys.executable, "-m", "megatron_simpo.cli.convert", "hf-to-megatron", "--hf-path",
         str(hf_models["llama3"][1]), "--save", str(tmp_path / "o"),
         "--tensor-parallel-size", "2"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:  # its two ranks (not multiprocessing's resource tracker)
        assert converter.poll() is None and time.monotonic() < deadline
        ranks = [child for child in psutil.Process(converter.pid).children()
                 if "spawn_main" in " ".join(child.cmdline())]
        if len(ranks) == 2:
            break
        time.sleep(0.02)
    time.sleep(1.0)  # the ranks import torch and Megatron-Core
    number = {"sigterm": signal.SIGTERM, "ctrl_c": signal.SIGINT, "kill_9": signal.SIGKILL}[how]
    if how == "ctrl_c":
        os.killpg(converter.pid, signal.SIGINT)
    else:
        converter.send_signal(number)
    _, err = converter.communicate(timeout=60)
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive
    time.sleep(2)  # a rank left running would publish now
    assert not (tmp_path / "o" / "latest_checkpointed_iteration.txt").exists()
    if how == "kill_9":
        assert converter.returncode == -signal.SIGKILL
        return
    assert converter.returncode == (-number if how == "ctrl_c" else 128 + number), err
    assert err.strip() == f"{cli.IMPORT.prog}: stopped by {signal.Signals(number).name}", err
    assert list((tmp_path / "tmp").iterdir()) == []
