"""Benchmarks on the target machines themselves, through a Ray cluster.

Each target host joins a Ray cluster (``llmops node start``) with labels read off the host (ISA,
CPU, cores, RAM, GPU, the llmops and runtime versions) and one benchmark slot, so two jobs never
share a host. The driver (``llmops bench --on``, ``llmops sweep``) sends one task per artifact and
target; the task fetches the bytes from the registry's artifact store itself, checks their
sha256, runs the same child-process runners ``llmops bench`` runs, and returns a small result,
which only the driver records. Ray schedules, retries and cancels; nothing here is a scheduler.

Ray is imported inside the functions that need it: ``llmops --help`` stays instant.
"""
