"""Weight mappings between Hugging Face and Megatron-Core layouts, one module per family."""
