"""`python -m kvmgate.bench NAME [options]`."""
import sys

from . import main

sys.exit(main())
