"""LoRA adapters: formats (PEFT, llama.cpp GGUF), merges, and the device slot table."""
