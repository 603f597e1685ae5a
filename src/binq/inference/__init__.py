"""Running models: our decode loop with its KV cache (``binq generate``) and the speed benchmark (``binq bench``).

Kept import-light on purpose: the llama.cpp benchmark worker imports this package and must not pull
in torch, whose memory would count in llama.cpp's peak resident set.
"""
