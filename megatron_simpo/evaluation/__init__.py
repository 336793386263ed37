"""After training: benchmark answer files, generation, run analyses."""
