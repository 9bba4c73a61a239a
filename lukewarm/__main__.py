"""``python -m lukewarm``: the command line, as the ``lukewarm`` script."""
import sys

from lukewarm.cli import main

if __name__ == "__main__":
    sys.exit(main())
