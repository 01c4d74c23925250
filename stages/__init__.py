"""abliterate: a DVC pipeline that removes the refusal direction from a language model's weights."""

__version__ = "0.1.0"
