"""llmops serve: an OpenAI-compatible server for what a registry alias holds."""
