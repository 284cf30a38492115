"""Converters: checkpoint -> GGUF / GPTQ / ONNX behind one interface (see base.py)."""
