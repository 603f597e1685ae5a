"""Integrations with other libraries (transformers' quantizer registry)."""
