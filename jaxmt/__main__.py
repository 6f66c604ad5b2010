"""Entry point of ``python -m jaxmt``."""

import sys

from jaxmt.cli import main

sys.exit(main())
