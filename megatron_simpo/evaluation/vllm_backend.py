"""The vLLM backend of ``generation``: ``answers.Generate`` and ``generation.Sample`` on vLLM
(installed on CUDA machines only; imported when used). Prompts go in as our token ids (vLLM never
re-renders them), each request with its own seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from megatron_simpo.evaluation.answers import Reply, Sampling, stream_seed

if TYPE_CHECKING:
    from megatron_simpo.evaluation.generation import Sample


def _vllm_params(sampling: Sampling, seed: int):
    """Temperature and top-p only, every other filter and penalty stated off (vLLM applies a
    model's generation_config only to the ``SamplingParams`` it makes itself)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=-1,
                          min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                          frequency_penalty=0.0, max_tokens=sampling.max_new_tokens, seed=seed)


def vllm_generator(hf_dir: str | Path, *, seed: int, tensor_parallel_size: int, dtype: str,
                   apply_chat_template: bool):
    """``answers.Generate`` on vLLM, from our token ids (vLLM never re-renders the prompt); a
    seed per request, from the run's seed and the question's stream."""
    import transformers
    from vllm import LLM

    from megatron_simpo.data.tokenization import encode_prompts

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    llm = LLM(model=str(hf_dir), tensor_parallel_size=tensor_parallel_size, seed=seed,
              dtype=dtype)

    def generate(conversations, samplings, streams):
        ids = encode_prompts(tokenizer, conversations,
                             apply_chat_template=apply_chat_template)
        params = [_vllm_params(s, stream_seed(seed, stream))
                  for s, stream in zip(samplings, streams)]
        outputs = llm.generate([{"prompt_token_ids": i} for i in ids], params)
        return [o.outputs[0].text.strip() for o in outputs]

    return generate


def vllm_sampler(hf_dir: str | Path, *, tensor_parallel_size: int, dtype: str,
                 apply_chat_template: bool, gpu_memory_utilization: float = 0.9) -> Sample:
    """``Sample`` on vLLM with a seed per request (``SamplingParams(seed=...)``, as the
    authors' decode.py): a sample depends on its prompt and seed only, not on the batch."""
    import transformers
    from vllm import LLM

    from megatron_simpo.data.tokenization import encode_prompts, uses_chat_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    llm = LLM(model=str(hf_dir), tensor_parallel_size=tensor_parallel_size, dtype=dtype,
              gpu_memory_utilization=gpu_memory_utilization)
    continuation = not uses_chat_template(tokenizer, apply_chat_template)  # (text joined on)

    def sample(conversations, sampling, seeds):
        ids = encode_prompts(tokenizer, conversations, apply_chat_template=apply_chat_template)
        requests = [{"prompt_token_ids": i} for i in ids for _ in seeds]
        params = [_vllm_params(sampling, seed) for _ in ids for seed in seeds]
        texts = [Reply(o.outputs[0].text if continuation else o.outputs[0].text.strip(),
                       o.outputs[0].finish_reason != "length")
                 for o in llm.generate(requests, params)]
        return [texts[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(ids))]

    sample.llm = llm  # the engine, for checks against its own generate
    return sample
