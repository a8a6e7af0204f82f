"""``python -m benchmarks``: every throughput benchmark (see :mod:`benchmarks.run`); ``make bench`` runs this."""

import sys

from benchmarks.run import main

sys.exit(main())
