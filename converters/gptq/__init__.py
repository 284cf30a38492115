"""GPTQ through GPTQModel: Hugging Face GPTQ folders that transformers, vLLM and TGI load."""
