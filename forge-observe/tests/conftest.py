import os
import sys
from pathlib import Path

APPS = Path(__file__).parent / "apps"
# the test app, importable here and (through PYTHONPATH) in child forge-node processes
sys.path.insert(0, str(APPS))
os.environ.setdefault("FORGE_LOG__LEVEL", "WARNING")
