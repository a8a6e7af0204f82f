import sys

from idql_cm.cli import main

sys.exit(main())
