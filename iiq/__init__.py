"""iiq: the experiment engine of an LLM-inference optimization platform."""

__version__ = "0.1.0"
