import sys

from dlheir.server.app import main

sys.exit(main())
