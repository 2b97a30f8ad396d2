import os
import sys
from pathlib import Path

# test-only app modules live beside the tests
sys.path.insert(0, str(Path(__file__).parent / "apps"))
os.environ.setdefault("FORGE_LOG__LEVEL", "WARNING")
