"""A Ctrl-C whose KeyboardInterrupt lands in a ``__del__`` (or a GC callback) is dropped by
Python; the interrupt is remembered, so the run still ends as interrupted."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest

from pipeline import interrupts


class _SignalsWhileCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs here, inside __del__: its exception is ignored


def test_an_interrupt_lost_in_a_destructor_is_raised_at_the_next_step():
    previous = interrupts.install()
    try:
        _SignalsWhileCollected()  # collected at once; Python prints and drops the interrupt
        gc.collect()
        assert interrupts.interrupted()
        with pytest.raises(KeyboardInterrupt):
            interrupts.raise_if_interrupted()
        interrupts.handled()
        interrupts.raise_if_interrupted()  # taken as the command's normal end: nothing raised
    finally:
        interrupts.restore(previous)
    assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]
