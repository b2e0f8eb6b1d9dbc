"""`python -m gpuwatch.exporter`: the same as the `gpuwatch-exporter` command."""

import sys

from gpuwatch.exporter.main import main

sys.exit(main())
