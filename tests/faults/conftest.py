"""The ``cli`` fixture of the fault-injection suite: run ``ibot.cli.main`` in-process and check how it failed.

(``tests/faults`` is a package so that this file imports as ``faults.conftest`` and does not shadow
``tests/conftest.py``, which other test modules import as ``conftest``.)
"""

from __future__ import annotations

import pytest

from ibot.cli import main


class Cli:
    """``cli(*argv)`` runs the CLI in-process and returns ``(exit code, stdout, stderr)``; never a traceback."""

    SMOKE = ("preset=smoke", "run.progress=false", "run.knn_at_end=false")

    def __init__(self, capsys) -> None:
        self.capsys = capsys

    def __call__(self, *argv) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse usage errors
            code = exit_.code
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err and "Traceback" not in out, err
        return code, out, err

    def fails(self, *argv, needles=(), code: int = 2) -> str:
        """Run, expect exit ``code`` and exactly one ``ibot: error:`` line (the last) holding every needle."""
        got, _, err = self(*argv)
        lines = err.strip().splitlines()
        assert got == code, err
        assert lines and lines[-1].startswith("ibot: error: "), err
        assert sum(ln.startswith("ibot:") for ln in lines) == 1, err
        for needle in needles:
            assert needle in lines[-1], (needle, lines[-1])
        return lines[-1]


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)
