"""Serving models: resolution of a request's `model`, the backends (local transformers, SGLang) and
the OpenAI wire format on top of them."""
