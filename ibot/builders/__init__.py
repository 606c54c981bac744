"""Builders: turn a config into the objects it describes (the model, the data pipeline, weight sources)."""
