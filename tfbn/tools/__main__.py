"""`python -m tfbn.tools ...` runs the `tfbn-tools` command line."""

import sys

from tfbn.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
