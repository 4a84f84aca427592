"""What this machine has: how llama.cpp is built for it, loaded, self-checked and diagnosed."""
