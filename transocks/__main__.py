import sys

from .redirector.cli import main

sys.exit(main())
