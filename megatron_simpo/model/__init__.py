"""The model: the architecture, its Megatron-Core GPTModel build (layer specs, attention), precision and FLOPs."""
