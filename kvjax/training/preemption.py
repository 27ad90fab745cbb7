"""Stopping a run cleanly when it is asked to: SIGTERM (a preemption notice, a scheduler's time
limit) or SIGINT (Ctrl-C).

A handler only records the signal; the training loop finishes its step, checkpoints that step,
waits for the checkpoint to commit and returns. On several processes every one must save the
same step: JAX's preemption sync point decides when (its coordination service hears SIGTERM on
any process and picks the next step that all of them reach), so SIGTERM is left to JAX's own
handler and SIGINT is passed on to it as a SIGTERM. Signals after the first are ignored, also
after the run has stopped, so a second Ctrl-C can neither interrupt the save nor the exit that
follows it.
"""

from __future__ import annotations

import signal
import threading

import jax

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT}  # 0: the job asked to stop


class StopSignals:
  """Records SIGTERM / SIGINT while a run trains; `reached(step)` says when to stop."""

  def __init__(self):
    self.received: signal.Signals | None = None
    self._previous = {}
    self._multi_process = jax.process_count() > 1

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      watched = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
      self._previous = {s: signal.signal(s, self._record) for s in watched}
    return self

  def __exit__(self, *exc) -> None:
    if self.received is None:
      for s, handler in self._previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)

  def _record(self, signum, frame) -> None:
    del frame
    if self.received is None:
      self.received = signal.Signals(signum)
      if self._multi_process:
        signal.raise_signal(signal.SIGTERM)  # JAX's notifier tells the other processes

  def reached(self, step: int, manager) -> bool:
    """Whether to checkpoint `step` and stop; call once after every training step."""
    if self._multi_process:
      return manager.reached_preemption(step)  # False when JAX's preemption service is off
    return self.pending

  @property
  def pending(self) -> bool:
    """Whether a signal asks this process to stop, in a run where it may stop alone."""
    return self.received is not None and not self._multi_process

  @property
  def stopped_by(self) -> signal.Signals:
    """What stopped the run; a SIGTERM that JAX's handler took is not seen here."""
    return self.received or signal.SIGTERM
