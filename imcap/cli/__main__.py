"""`python -m imcap.cli`: the `imcap` command."""

import sys

from imcap.cli import main

sys.exit(main())
