import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "apps"))
os.environ.setdefault("FORGE_LOG__LEVEL", "WARNING")
