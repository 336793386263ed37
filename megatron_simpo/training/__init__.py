"""Training: config, losses, log-probs, the step, the components and their cadence (evaluator, checkpointer, metrics), the loop, reference log-probs."""
