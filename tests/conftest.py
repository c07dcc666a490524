import sys
from pathlib import Path

# Tests import the naive reference (tests/st3_reference.py) as a top-level module.
sys.path.insert(0, str(Path(__file__).parent))
