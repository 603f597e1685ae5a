"""Exports of binq checkpoints to other runtimes' formats (GGUF Q1_0 for llama.cpp)."""
