"""A user's Ctrl-C in a running experiment, for the interrupted-then-resumed drills (a sweep on disk, in a bucket).

:class:`CtrlCAtFirstFinishedTrial` sends SIGINT to the experiment's own process (the driver, where Tune runs)
from Tune's ``on_trial_complete``, the moment the first trial finishes. Why that moment is deterministic, read
in Ray 2.60's source: ``TuneController.stop_trial`` calls the callbacks, then marks the trial ``TERMINATED``
in the same call; the signal only sets Tune's "interrupted" event (``tune.py`` ``_setup_signal_catching``),
which the run loop checks after the step; the loop then saves the experiment state with
``checkpoint(force=True, wait=True)``. So the state a resume reads always records the finishing trial as
finished, and the trials still running as ``RUNNING``; no polling of the state file is needed.

:func:`finish_or_wait` is a trial function for two trials, one that finishes while the other runs, so that a
test knows which trial the Ctrl-C finds running.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from xswinir.metrics import VAL_PSNR_Y


class CtrlCAtFirstFinishedTrial(Callback):
    """Ctrl-C, once, when the first trial finishes; its trial id goes into ``marker``.

    Tune pickles the callbacks with the experiment and a resumed run unpickles them afresh: the marker file,
    not an attribute, remembers that the Ctrl-C was sent.
    """

    def __init__(self, marker: Path):
        self.marker = marker

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if not self.marker.exists():
            self.marker.write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)  # what a terminal sends on Ctrl-C


def finish_or_wait(config: dict[str, Any]) -> None:
    """One of two trials: the one that finishes (``config["finish"]``) waits until the other runs, then reports
    once and returns; the other reports, says it runs (the file ``config["started"]``), then reports every half
    second until the file ``config["release"]`` exists. Neither waits more than 5 minutes. Each report holds the
    step and a sweep's metric (``VAL_PSNR_Y``, equal to the step), so that a sweep's results table can read it."""
    from ray import tune

    started, release = Path(config["started"]), Path(config["release"])
    deadline = time.monotonic() + 300
    if config["finish"]:
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        tune.report({"step": 1, VAL_PSNR_Y: 1.0})
        return
    step = 1
    tune.report({"step": step, VAL_PSNR_Y: float(step)})  # returns once Tune has taken the result and asks for the next
    started.touch()
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
        step += 1
        tune.report({"step": step, VAL_PSNR_Y: float(step)})
