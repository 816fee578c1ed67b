"""Keeping a stage's forked seeds level when they share too few cores."""
import time


class Pace:
    """Sibling runs forked by one launcher (a stage's seeds) share the cores, but not evenly: three
    one-thread runs on two cores can end seconds apart, the last alone on a core while the other
    stands idle.  A run more than ``slack`` steps ahead of its slowest running sibling sleeps until it
    is not, and the kernel hands its core to a run behind.  Only *when* steps are taken changes, never
    what they compute.

    ``progress``: shared memory, one slot per sibling: steps taken since its process started, or −1
    for a sibling that is not running (never waited for).  The slowest running sibling never waits,
    so some run always moves on.
    """

    def __init__(self, progress, index, slack=1, nap=0.005):
        self.progress, self.index, self.slack, self.nap = progress, index, slack, nap

    def __call__(self, steps):
        """Record ``steps`` taken; return once no running sibling is more than ``slack`` steps behind."""
        self.progress[self.index] = steps
        while True:
            behind = [p for i, p in enumerate(self.progress) if i != self.index and 0 <= p < steps - self.slack]
            if not behind:
                return
            time.sleep(self.nap)

    def leave(self):
        """This run stops taking steps: its siblings no longer wait for it."""
        self.progress[self.index] = -1
