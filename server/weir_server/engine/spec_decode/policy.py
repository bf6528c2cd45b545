"""Whether a step speculates: only where it is measured to pay.

Speculation pays when the tokens it accepts outweigh what proposing and verifying cost, and both sides move with the
device, the model pair, the batch and the text: a draft model the size of its target, an unrelated draft, a workload
with nothing for n-gram lookup to find, or a batch large enough to keep the device busy all lose to plain decoding
(which on CUDA also runs ahead). So the engine measures. Steps are grouped into bands of running sequences (1, 2,
3-4, 5-8, ...); in each band it keeps the rate at which a sequence gets tokens, per second of wall time between
steps, with proposals and without, uses the faster, and now and then spends a few steps on the other to see whether
that has changed (less often each time it has not). Only steps that decode and nothing else are measured, and not the
first after a switch, whose time includes the switch (a draft catching up, the engine's run-ahead refilling).

This changes only which steps propose: greedy output is the same either way, and sampled output follows the target's
distribution either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from weir_server.engine.sequence import Sequence

WARM_STEPS = 3  # measured steps of each kind before a band compares them
PROBE_STEPS = 3  # steps of the slower kind in a probe: the first is a switch, the others are measured
# Steps of the faster kind before a probe; doubles while probes change nothing. Short at first because what pays
# follows the text (a passage being copied, then new words), so a probe must come within a request's span.
FIRST_PROBE_AFTER = 8
LAST_PROBE_AFTER = 256
SMOOTHING = 0.3  # weight of a new measurement in a kind's rate
SWITCH_MARGIN = 0.05  # the other kind must be this much faster to take over (no flapping on noise)
OUTLIER = 8.0  # a step this many times slower than its kind's rate waited for something else (idle, a stall)


@dataclass(slots=True)
class _Rate:
    """Tokens per sequence per second of one kind of step in one band."""

    value: float = 0.0
    samples: int = 0
    stale: bool = False  # not measured since the last probe began: the next measurement replaces the rate

    def add(self, rate: float) -> None:
        if self.samples and not self.stale and rate * OUTLIER < self.value:
            return
        fresh = not self.samples or self.stale
        self.value = rate if fresh else self.value + SMOOTHING * (rate - self.value)
        self.samples += 1
        self.stale = False


@dataclass(slots=True)
class _Band:
    plain: _Rate = field(default_factory=_Rate)
    spec: _Rate = field(default_factory=_Rate)
    speculates: bool = True  # the faster kind as last compared
    since_probe: int = 0
    probe_after: int = FIRST_PROBE_AFTER
    probing: int = 0  # steps left of the current probe

    def choose(self) -> bool:
        if self.spec.samples < WARM_STEPS:
            return True
        if self.plain.samples < WARM_STEPS:
            return False
        if self.probing:
            self.probing -= 1
            if self.probing:
                return not self.speculates
            # The probe's measurement is in: keep the faster, probe sooner if that changed.
            faster = self._faster()
            self.probe_after = (
                FIRST_PROBE_AFTER if faster != self.speculates else min(2 * self.probe_after, LAST_PROBE_AFTER)
            )
            self.speculates = faster
            self.since_probe = 0
            return self.speculates
        self.speculates = self._faster()
        self.since_probe += 1
        if self.since_probe >= self.probe_after:
            self.probing = PROBE_STEPS
            (self.plain if self.speculates else self.spec).stale = True  # its rate is from before the text moved on
            return not self.speculates
        return self.speculates

    def _faster(self) -> bool:
        spec, plain = self.spec.value, self.plain.value
        if self.speculates:
            return spec * (1 + SWITCH_MARGIN) >= plain
        return spec > plain * (1 + SWITCH_MARGIN)


def band_of(num_running: int) -> int:
    """1 -> 1, 2 -> 2, 3-4 -> 3, 5-8 -> 4, ...: steps whose cost per sequence is alike."""
    return (num_running - 1).bit_length() + 1 if num_running > 1 else 1


@dataclass(slots=True)
class _Step:
    band: int
    speculates: bool
    started: float
    batch: tuple[int, int, int]  # the running sequences (count, first and last id): a changed batch is not measured
    measured: bool = False  # a pure decode step whose kind is the previous step's
    tokens_per_seq: float = 1.0


class SpeculationPolicy:
    """Chooses per step whether to propose, from the measured rates of earlier steps (see the module doc)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._bands: dict[int, _Band] = {}
        self._step: _Step | None = None  # the step in progress, measured when the next one starts

    def speculates(self, running: Seq[Sequence]) -> bool:
        """Whether the step starting now over `running` proposes; ends the previous step's timing. That step is
        measured only if the same sequences run on: its time then ends where it should, not after an idle wait."""
        now = self.clock()
        batch = (len(running), running[0].seq_id, running[-1].seq_id) if running else (0, -1, -1)
        step = self._step
        if step is not None and step.measured and step.batch == batch and now > step.started:
            rate = step.tokens_per_seq / (now - step.started)
            band = self._bands[step.band]
            (band.spec if step.speculates else band.plain).add(rate)
        band_id = band_of(len(running))
        choice = self._bands.setdefault(band_id, _Band()).choose()
        # Measured only if it decodes only (`observe`) and is not a switch from the other kind.
        self._step = _Step(band_id, choice, now, batch, measured=step is not None and step.speculates == choice)
        return choice

    def observe(self, decode_only: bool, tokens_per_seq: float = 1.0) -> None:
        """What the step in progress did: whether it only decoded (no prompt chunks, whose cost is not the kind's),
        and the tokens a sequence got from it on average (1 without proposals)."""
        if self._step is not None:
            self._step.measured = self._step.measured and decode_only
            self._step.tokens_per_seq = tokens_per_seq

    def forget_step(self) -> None:
        """The step in progress did not run (nothing was scheduled): nothing to measure."""
        self._step = None
