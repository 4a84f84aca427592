"""``ocrbatch serve`` (an OpenAI-compatible endpoint) and its client."""
