"""Evaluations of a model folder: `needle` (needle in a haystack, LWM's protocol in the chat format)."""
