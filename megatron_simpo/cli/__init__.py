"""Command lines: flags generated from the config dataclasses, one module per console script. Nothing in the package imports this sub-package."""
