"""GGUF conversion: architecture families, vocabulary export, metadata, streaming writer, llama.cpp quantizers."""
