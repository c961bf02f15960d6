"""tunelab: adapt pretrained Llama-family language models to your task."""

__version__ = "0.1.0"
