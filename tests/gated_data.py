"""A digits dataset whose batches wait at a gate: imported by gin configs of tests/test_slurm.py.

``gated_digits.after = n`` lets n batches through, then each further batch waits until the file
``gated_digits.gate`` exists, or until the run is asked to stop (Ctrl-C, SIGTERM).  A test holds a
job there to interrupt it at a known point (the run cannot finish first, however fast the machine
is), then opens the gate for the resumed job.  The data are the digits' own, so the run trains
exactly as an ungated one.
"""
import time
from pathlib import Path

import gin

from tract_repro.data.digits import digits
from tract_repro.training import preemption


class Gated:
    def __init__(self, data, gate, after):
        self.data, self.gate, self.after, self.calls = data, Path(gate), int(after), 0

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self):
        return len(self.data)

    def batch(self, idx, generator=None):
        self.calls += 1
        while self.calls > self.after and not self.gate.exists() and not preemption.requested():  # events, not a clock
            time.sleep(0.02)
        return self.data.batch(idx, generator)


@gin.configurable
def gated_digits(gate=gin.REQUIRED, after=0):
    return Gated(digits(), gate, after)
