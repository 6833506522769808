"""Built-in merge strategies, installed as `merge_lab.strategies`. Each registers through the `merge_lab.strategies` entry point,
exactly as a third-party plugin does (see pyproject.toml)."""
