"""Backends: where a unit's text is decoded (this machine's llama.cpp worker pool, or a remote OpenAI-compatible server)."""
