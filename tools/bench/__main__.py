"""`python -m tools.bench`: the serving benchmark (tools/bench/serving.py)."""
import sys

from tools.bench.serving import main

sys.exit(main())
