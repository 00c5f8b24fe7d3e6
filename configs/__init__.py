"""Packaged training configs (YAML) and model presets (models/*.json); see importlib.resources."""
