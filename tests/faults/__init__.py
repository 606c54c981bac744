"""Fault-injection suite (a package: its conftest must not shadow tests/conftest.py)."""
