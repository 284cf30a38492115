"""ONNX decoders with KV cache through the onnxruntime-genai model builder."""
