"""llmops: convert, benchmark and version LLM checkpoints.

Kept import-light on purpose: ``llmops --help`` must not pay for torch,
transformers or mlflow, so nothing heavy is imported at package level.
"""

__version__ = "0.1.0"
