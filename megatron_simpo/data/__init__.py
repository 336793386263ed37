"""Preference data: sources on disk, chat templates and tokenization, the tokenize-once cache, samplers, micro-batch planning and collation."""
