"""The ground floor: what registry/, converters/, benchmarks/ and the application layer all use.

Nothing here imports from any other llmops package."""
