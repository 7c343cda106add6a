"""Imported by the scan's forkserver as it starts (``multiprocessing.set_forkserver_preload``,
after the preload modules the caller asked for: ``__main__`` by default): the package, with
what every decode worker needs, imported once.

A Ctrl-C goes to the whole process group: the scan handles it and stops its workers. The
package ignores SIGINT while a forkserver imports it (``fakespotter/__init__.py``: the server
would die printing a KeyboardInterrupt traceback), and then leaves SIGINT as a forkserver
started by the caller's code would have it: Python's handler, not blocked. The server is the
process's own, shared by the caller's forkserver processes, which must get their Ctrl-C; the
server protects itself from here on, and each decode worker ignores SIGINT as it starts
(:func:`fakespotter.scan._worker_init`).
"""

import signal

import fakespotter.scan  # noqa: F401  (imported with the package, above)

# The scan starts the server with SIGINT blocked (``scan._signals_held``). The Python measured
# (3.11) starts it with an empty mask; were the mask inherited, the caller's processes would
# inherit it from the server.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
