"""Megatron distributed checkpoints: save, find, verify, load."""
