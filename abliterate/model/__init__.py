"""Loaded models: loading, prompts, hooks, generation, live edits and the search's study."""
