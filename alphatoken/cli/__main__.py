"""`python -m alphatoken.cli`, the same as the `alphatoken` console script."""
import sys

from . import main

sys.exit(main())
