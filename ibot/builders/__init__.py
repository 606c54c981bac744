"""Builders: turn a config (or a user's source: run folder, checkpoint, export) into objects.

They sit above :mod:`ibot.config`, :mod:`ibot.data`, :mod:`ibot.models`, :mod:`ibot.losses` and
:mod:`ibot.methods`, and below the commands (:mod:`ibot.train`, :mod:`ibot.eval`, :mod:`ibot.viz`,
:mod:`ibot.lightning`, :mod:`ibot.cli`).
"""
