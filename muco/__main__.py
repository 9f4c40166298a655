import sys

from muco.cli import main

sys.exit(main())
