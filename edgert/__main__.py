import sys

from edgert.tools.cli import main

sys.exit(main())
