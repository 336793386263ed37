"""Command lines: flags generated from the config dataclasses, one module per console script.
Nothing in the package imports this sub-package.

Every command's process imports this first (ranks under torchrun too), so it holds back what
Megatron-Core warns at import without news for a user: that Transformer Engine and Apex are
absent (four warnings per process, on every CPU and wherever the local spec runs; a flag that
needs Transformer Engine says so itself), and that absl's logging is (megatron-core >= 0.17).
"""

import warnings

for _message in ("Transformer Engine and Apex are not installed",
                 "absl.logging is not installed"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
