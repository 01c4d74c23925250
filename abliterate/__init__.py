"""abliterate: find the refusal direction of a language model and remove it from its weights.

The library: pure functions and small records, no command line, no DVC paths. The pipeline's
commands live in ``stages/``; ``docs/architecture.md`` describes the data flow and file formats.
"""

__version__ = "0.1.0"
