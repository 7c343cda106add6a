"""Imported by the scan's forkserver as it starts (``multiprocessing.set_forkserver_preload``,
after the preload modules the caller asked for: ``__main__`` by default).

A Ctrl-C goes to the whole process group: the scan handles it and stops its workers. The
forkserver ignores SIGINT while it imports torch here (it would die printing a
KeyboardInterrupt traceback), and then leaves SIGINT as a forkserver started by the caller's
code would have it: Python's handler, not blocked (the scan may start the server while it holds
SIGINT blocked, and the mask is inherited). The server is the process's own, shared by the
caller's forkserver processes, which must get their Ctrl-C; the server protects itself from
here on, and each decode worker ignores SIGINT as it starts (:func:`fakespotter.scan._worker_init`).
"""

import signal

_previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # (discards a Ctrl-C pending while it was blocked)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
try:
    import fakespotter.scan  # noqa: E402,F401  (what every worker needs, imported once)
finally:
    signal.signal(signal.SIGINT, _previous)
