"""`python -m dsagen.cli ...` runs the dsagen command (used to start one tuning process per GPU)."""
import sys

from . import main

sys.exit(main())
