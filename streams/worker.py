"""The worker process around the Faust app: a stop on SIGTERM/SIGINT that always ends in time.

Faust's own stop (``App.on_stop``: stop the fetcher, wait for the agents to finish their current
events, commit the offsets, flush the producer) usually takes a second or two. It can hang,
though: we saw workers stuck after ``AIOKafkaConsumerThread: Stopping...`` for more than 30 s when
the signal came during a rebalance, and an orchestrator then sends SIGKILL anyway. So the stop
has a deadline (``streams.shutdown_timeout_s``): past it, the process logs and exits at once.

Exiting without the commit is safe by construction: an input whose offset was not committed is
redelivered to the next owner of its partition, and the planner's re-emission rule
(``streams.planner``) republishes its outputs, so at worst some events are published twice with
the same ids, which consumers drop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any

import faust

log = logging.getLogger("cbtstream.streams.worker")


class DeadlineWorker(faust.Worker):
    """``faust.Worker`` whose signal-initiated stop is bounded by ``shutdown_timeout_s``."""

    def __init__(self, app: faust.App, *args: Any, shutdown_timeout_s: float,
                 **kwargs: Any) -> None:
        super().__init__(app, *args, **kwargs)
        self.shutdown_timeout_s = shutdown_timeout_s
        self._deadline: threading.Timer | None = None

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        if self._deadline is None:
            log.info("stopping", extra={"signal": signum.name,
                                        "deadline_s": self.shutdown_timeout_s})
            self._deadline = threading.Timer(self.shutdown_timeout_s, self._give_up)
            self._deadline.daemon = True
            self._deadline.start()
        super()._schedule_shutdown(signum)

    def _give_up(self) -> None:
        log.warning("clean stop took longer than the deadline; exiting now (uncommitted "
                    "inputs are redelivered to the next worker)",
                    extra={"deadline_s": self.shutdown_timeout_s})
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # exiting anyway
                stream.flush()
        os._exit(1)
