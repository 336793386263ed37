"""The transformers backend samples with the benchmark's settings only, whatever a model's own
generation_config holds (a release's top_k 20 and repetition penalty, as Qwen2.5's, copied into
exports): greedy answers equal a hand-written argmax loop, and samples equal transformers'
generate with temperature and top-p alone (top-k off, no penalty)."""

import json

import pytest

from megatron_simpo.evaluation import generation, vllm_backend
from megatron_simpo.evaluation.answers import Sampling

PROMPTS = ["reverse abcdefgh", "hi", "say something long"]
RELEASE_DEFAULTS = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                        repetition_penalty=1.3, no_repeat_ngram_size=2)
"""A generation_config.json as a release ships one (Qwen2.5-Instruct's fields; stronger values,
so that each one changes what a tiny model generates)."""


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny model (peaked logits: greedy repeats tokens) whose folder carries
    RELEASE_DEFAULTS in its generation_config.json."""
    import torch
    import transformers

    from megatron_simpo.model.tiny import write_default

    root = tmp_path_factory.mktemp("released")
    paths = write_default(root / "tiny", train_pairs=4, valid_pairs=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(paths["config"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "embed" in name or "lm_head" in name:
                param.mul_(20)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    (root / "hf" / "generation_config.json").write_text(json.dumps(dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id, **RELEASE_DEFAULTS)))
    return root / "hf"


def _reference(hf_dir):
    """(tokenizer, model, prompt ids) loaded afresh, outside the backend."""
    import torch
    import transformers

    from megatron_simpo.data.tokenization import encode_prompts

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = encode_prompts(tokenizer, [[{"role": "user", "content": p}] for p in PROMPTS])
    return tokenizer, model, ids


def test_greedy_answers_are_the_argmax_whatever_the_generation_config(released):
    import torch

    tokenizer, model, prompt_ids = _reference(released)
    generate = generation.transformers_generator(released, seed=0, dtype="float32",
                                                 apply_chat_template=True)
    greedy = Sampling(temperature=0.0, max_new_tokens=24)
    differs = 0
    for prompt, ids in zip(PROMPTS, prompt_ids):
        [answer] = generate([[{"role": "user", "content": prompt}]], [greedy], [0])
        tokens, new = torch.tensor([ids]), []
        with torch.no_grad():  # the whole sequence each step: no cache, no processors
            for _ in range(greedy.max_new_tokens):
                token = int(model(tokens).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
                tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        assert answer == tokenizer.decode(new, skip_special_tokens=True).strip()
        # The release's settings would have changed it (the test sees what it guards).
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)
        differs += answer != tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert differs > 0


def test_samples_are_temperature_and_top_p_only_whatever_the_generation_config(released):
    import torch
    import transformers

    tokenizer, model, prompt_ids = _reference(released)
    sample = generation.transformers_sampler(released, dtype="float32", apply_chat_template=True)
    sampling = Sampling(temperature=0.8, top_p=0.95, max_new_tokens=24)
    seeds = tuple(range(8))

    def generate(ids, seed, **settings):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                                dtype=torch.long),
                                 max_new_tokens=24, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **settings)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()

    released_settings = [generate(prompt_ids[0], seed, do_sample=True, temperature=0.8,
                                  top_p=0.95) for seed in seeds]
    # The reference: every filter and penalty named, on a generation_config of nothing.
    model.generation_config = transformers.GenerationConfig()
    plain = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0, repetition_penalty=1.0,
                 no_repeat_ngram_size=0)
    for prompt, ids in zip(PROMPTS, prompt_ids):
        [samples] = sample([[{"role": "user", "content": prompt}]], sampling, seeds)
        assert samples == [generate(ids, seed, **plain) for seed in seeds]
        if prompt == PROMPTS[0]:
            assert samples != released_settings  # what the release's settings give differs
    assert len({*samples}) > 1


def test_vllm_requests_state_every_filter_and_penalty_off(released, monkeypatch):
    """vLLM's backend (no GPU needed: a stand-in engine records its requests) asks for
    temperature and top-p alone, each other filter and penalty set to vLLM's off value, so
    nothing depends on vLLM's defaults."""
    import sys
    import types

    requests = []

    class LLM:
        def __init__(self, **options):
            pass

        def generate(self, prompts, params):
            requests.extend(params)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                text=" x ", finish_reason="length" if i % 2 else "stop")])
                for i, _ in enumerate(prompts)]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **params: params
    monkeypatch.setitem(sys.modules, "vllm", fake)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    sample = vllm_backend.vllm_sampler(released, tensor_parallel_size=1, dtype="auto",
                                     apply_chat_template=True)
    replies = sample(conversations, Sampling(0.8, 0.95, 16), (13, 21))
    assert replies == [["x", "x"]] * 2  # each ended unless vLLM stopped it at max_tokens
    assert [[r.finished for r in row] for row in replies] == [[True, False]] * 2
    generate = vllm_backend.vllm_generator(released, seed=3, tensor_parallel_size=1,
                                         dtype="auto", apply_chat_template=True)
    assert generate(conversations, [Sampling(0.0, 1.0, 8), Sampling(0.7, 1.0, 8)], [5, 6]) == \
        ["x", "x"]
    off = dict(top_k=-1, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
               frequency_penalty=0.0)
    expected = [dict(temperature=0.8, top_p=0.95, max_tokens=16, seed=seed, **off)
                for _ in conversations for seed in (13, 21)]
    expected += [dict(temperature=t, top_p=1.0, max_tokens=8, **off) for t in (0.0, 0.7)]
    assert [{k: v for k, v in r.items() if k != "seed" or r["max_tokens"] == 16}
            for r in requests] == expected
    assert len({r["seed"] for r in requests[-2:]}) == 2  # a seed per request
