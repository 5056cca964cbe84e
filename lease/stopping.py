"""Stopping on SIGINT (Ctrl-C) and SIGTERM, one policy per process.

A program that runs stages (`lease run`) holds `stop_on_signals(exit_now)`: the first signal raises
KeyboardInterrupt, which ends the running stage where it is (what the stage wrote is written atomically,
so it stays and the next run continues from it); any later signal calls `exit_now`, which must not return.
Python drops an exception raised while the main thread runs a fork hook, a finaliser or a weakref
callback ("Exception ignored in ..."): a data loader forking its workers swallowed Ctrl-C that way, and
the stage ran on. So the interrupt is raised again every `REPEAT_SECONDS` until the program says it
caught it (`interrupt_taken`).

Code that can stop better by itself, at a point from which it resumes exactly (the trainer: after the
step, with a checkpoint), runs inside `deferred(doing)`: a signal then only sets `requested()`, which that
code polls. Without a program's handlers (`lease train`, a torchrun worker) `deferred` installs handlers
that only do that, however many signals come: torchrun's agent relays the terminal's Ctrl-C to every
worker, so each worker sees two and must not take the second for "exit at once".

Handlers are put back as they were when a block ends. Python takes signals in the main thread only:
elsewhere the blocks install nothing (and a program's handler still serves a `deferred` block there).
A forked child (a data loader's worker) gets Python's own handlers back: the terminal's Ctrl-C reaches
it too, and it must simply end, not act as the program.
"""
from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, NoReturn

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_SECONDS = 0.1


@dataclass
class _Policy:
    received: list[signal.Signals] = field(default_factory=list)  # stop signals since the outer block began
    exit_now: Callable[[signal.Signals], NoReturn] | None = None  # the program's, under stop_on_signals
    deferring: list[str] = field(default_factory=list)  # what the running deferred blocks do on a stop
    uncaught: bool = False  # a stop's KeyboardInterrupt was raised and the program has not caught it yet
    repeating: bool = False  # the next SIGINT handled is `_repeat_interrupt`'s, not the user's


_policy = _Policy()
_DEFAULT_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


def requested() -> signal.Signals | None:
    """The first stop signal received inside the running blocks, or None."""
    return _policy.received[0] if _policy.received else None


def interrupt_taken() -> None:
    """The program caught the KeyboardInterrupt of a stop: stop raising it again."""
    _policy.uncaught = False


def _repeat_interrupt() -> None:
    while True:
        time.sleep(REPEAT_SECONDS)
        if not _policy.uncaught:
            return
        _policy.repeating = True
        _thread.interrupt_main(signal.SIGINT)  # runs `_on_signal` in the main thread, as a SIGINT would


def _on_signal(signum: int, _frame) -> None:
    if _policy.repeating:
        _policy.repeating = False
        if _policy.uncaught:
            raise KeyboardInterrupt
        return
    sig = signal.Signals(signum)
    _policy.received.append(sig)
    if len(_policy.received) > 1:
        if _policy.exit_now is not None:
            _policy.exit_now(sig)
        return  # already stopping (a relayed copy of the first signal, or impatience without a program)
    doing = _policy.deferring[-1] if _policy.deferring else "stopping"
    again = f"; {sig.name} again exits at once" if _policy.exit_now is not None else ""
    log.warning("signal %s: %s%s", sig.name, doing, again)
    if _policy.exit_now is not None and not _policy.deferring:
        _policy.uncaught = True
        threading.Thread(target=_repeat_interrupt, name="repeat-stop-interrupt", daemon=True).start()
        raise KeyboardInterrupt


def _defaults_in_forked_child() -> None:
    global _policy
    _policy = _Policy()  # the parent's repeating thread did not come along
    for sig, handler in _DEFAULT_HANDLERS.items():
        if signal.getsignal(sig) is _on_signal:
            with contextlib.suppress(ValueError):  # forked from another thread: Python handles no signal there
                signal.signal(sig, handler)


os.register_at_fork(after_in_child=_defaults_in_forked_child)


@contextlib.contextmanager
def _handlers_installed() -> Iterator[bool]:
    """`_on_signal` for the stop signals, the previous handlers back afterwards; yields whether installed."""
    try:
        previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield False
        return
    try:
        yield True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stop_on_signals(exit_now: Callable[[signal.Signals], NoReturn]) -> Iterator[None]:
    """The program's policy while the block runs: first signal → KeyboardInterrupt, later → `exit_now`."""
    with _handlers_installed():
        _policy.received.clear()
        _policy.exit_now = exit_now
        try:
            yield
        finally:
            _policy.exit_now = None
            _policy.received.clear()
            interrupt_taken()


@contextlib.contextmanager
def deferred(doing: str) -> Iterator[None]:
    """Inside the block a first stop signal only sets `requested()` (logged as `doing`); the block's code
    polls it and stops where it can resume."""
    program = _policy.exit_now is not None
    with contextlib.nullcontext() if program else _handlers_installed():
        if not program:
            _policy.received.clear()
        _policy.deferring.append(doing)
        try:
            yield
        finally:
            _policy.deferring.pop()
            if not program:
                _policy.received.clear()


class Interrupted(KeyboardInterrupt):
    """Raised by work that stopped on a stop signal after saving what it resumes from; says what was kept."""
