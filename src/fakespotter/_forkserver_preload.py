"""Imported first by the scan's forkserver (``multiprocessing.set_forkserver_preload``).

A Ctrl-C goes to the whole process group: the scan handles it and stops its workers. The
forkserver and the workers it forks ignore SIGINT from here on, so neither prints a
KeyboardInterrupt traceback while importing torch or attaching to the pool.
"""

import signal

signal.signal(signal.SIGINT, signal.SIG_IGN)

import fakespotter.scan  # noqa: E402,F401  (what every worker needs, imported once)
