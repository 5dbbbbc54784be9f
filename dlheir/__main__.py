import sys

from dlheir.cli import main

sys.exit(main())
