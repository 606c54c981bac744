"""Preemption: SIGTERM / SIGINT become a flag the training loop reads at step boundaries.

SLURM and Kubernetes stop jobs with SIGTERM (then SIGKILL after a grace period), a user with
Ctrl-C (SIGINT). Inside :class:`StopSignals` neither kills the process: the handler only records
the signal, and the trainer saves a resumable checkpoint after the step in flight and raises
:class:`SignalStopError`. A second Ctrl-C restores Python's default and interrupts at once.
Handlers are installed from the main thread only (Python delivers signals there); elsewhere the
context does nothing.
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGINT)


class SignalStopError(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; ``signum`` is the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Context manager: ``signum`` is None until SIGTERM or SIGINT arrives, then that signal's number."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:  # second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGTERM / SIGINT to the main process, which stops
    cleanly and then shuts them down (a Ctrl-C reaches the whole process group)."""
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)
