"""The steps' flags, kept on the device until the host reads them (the host runs ahead of the device).

Each step of :class:`ibot.train.step.TrainStep` returns ``flags = [bad, stop_vote]`` on the device
(all-reduced over ranks). :class:`DeviceFlags` folds them, on the device and without a host
synchronisation, into the consecutive non-finite steps, the longest such streak, the number of
non-finite steps and any stop vote since the host last read; :meth:`DeviceFlags.read` copies them to
the host in one transfer. The trainer reads on log steps, saves, stops and epoch ends only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlagsReading:
    """What the host learns at a read.

    Attributes:
        streak: consecutive non-finite (skipped) steps ending at the last step (0: it was good).
        peak: the longest streak seen since the previous read (the streak at that read included).
        bad: non-finite steps since the previous read.
        stop: whether some rank voted to stop on some step since the previous read.
    """

    streak: int
    peak: int
    bad: int
    stop: bool


class DeviceFlags:
    """``[streak, peak, bad, stop]`` of the steps since the last :meth:`read`, as a (4,) device tensor."""

    def __init__(self, device: torch.device | str) -> None:
        self.state = torch.zeros(4, device=device)

    def add(self, flags: torch.Tensor) -> None:
        """Fold in one step's ``flags = [bad, stop_vote]`` (device ops only)."""
        bad, stop = flags[0].to(self.state.dtype), flags[1].to(self.state.dtype)
        old = self.state
        streak = old[0] * bad + bad  # +1 on a bad step, 0 on a good one
        self.state = torch.stack([streak, torch.maximum(old[1], streak), old[2] + bad, torch.maximum(old[3], stop)])

    def read(self) -> FlagsReading:
        """The host's copy (one device -> host transfer); the counts since the last read start again."""
        streak, peak, bad, stop = (int(v) for v in self.state.tolist())
        self.state = torch.stack([self.state[0], self.state[0], self.state.new_zeros(()), self.state.new_zeros(())])
        return FlagsReading(streak, peak, bad, stop > 0)
