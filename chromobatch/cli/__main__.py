"""`python -m chromobatch.cli`: how the watcher starts its worker processes."""

from chromobatch.cli.main import main

main()
