import os
import sys

# the project's modules live at the repository root: make them importable under plain `pytest` too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
