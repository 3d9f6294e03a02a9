import sys

from medtx.cli import main

sys.exit(main())
