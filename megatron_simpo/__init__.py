"""SimPO (Simple Preference Optimization with a reference-free reward) on Megatron-Core.

Command lines: ``megatron-simpo-train`` (under torchrun), ``megatron-simpo-convert-hf-to-megatron``
and ``megatron-simpo-convert-megatron-to-hf``. Importing the package imports neither torch nor
Megatron-Core; its modules do, each for its own concern (see the README's package layout).
"""

__version__ = "0.2.0"
