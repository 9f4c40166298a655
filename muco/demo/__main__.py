"""`python -m muco.demo` runs :mod:`muco.cli.demo` (`make demo`)."""

import sys

from muco.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
