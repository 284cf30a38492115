"""The application layer: workflows that join the registry, converters and benchmarks; the CLI; the servers."""
