"""PaddleOCR-VL itself: its weights, the vision encoder in PyTorch, the language model as a GGUF in llama.cpp."""
