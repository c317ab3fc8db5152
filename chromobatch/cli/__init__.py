"""cli: the `chromobatch` command. Each command parses its arguments, calls one or two library functions
and prints; a ChromobatchError becomes one red line, a hint and exit code 1.

May import: anything (it is the top). `python -m chromobatch.cli` runs it too (the watcher's workers).
"""

from chromobatch.cli.main import app, main

__all__ = ["app", "main"]
