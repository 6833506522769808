"""Built-in merge strategies. Each registers through the `merge_lab.strategies` entry point,
exactly as a third-party plugin does (see pyproject.toml)."""
