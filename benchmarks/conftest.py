import sys
from pathlib import Path

# The authors' loss (the peer) is transcribed once, in tests/official.py.
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
