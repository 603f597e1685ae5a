"""Exports of binq checkpoints to other runtimes' formats (GGUF for llama.cpp: Q1_0, Q4_0 to Q8_0, exact)."""
