"""`python -m sgsd_fast.commands ...` = `sgsd-fast ...` (for environments without the console script)."""
import sys

from sgsd_fast.commands import main

sys.exit(main())
