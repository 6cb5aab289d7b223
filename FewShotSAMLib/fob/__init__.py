"""FoB (Focus on Background): the background-prompt network on frozen SAM embeddings and its
self-supervised training. Inference is reached through ``prompts/fob.py``."""
