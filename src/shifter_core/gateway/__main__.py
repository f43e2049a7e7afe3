"""``python -m shifter_core.gateway``: same as ``shifter-gateway``."""

import sys

from .server import main

sys.exit(main())
