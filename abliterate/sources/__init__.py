"""Where a base model comes from: a local folder, a GGUF file, the hub, or the built-in demo."""
