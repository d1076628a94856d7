"""Locations of test data (importable from any test module: pytest puts tests/ on sys.path)."""

from pathlib import Path

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "reference" / "golden_tiny_A.pt"
STATE_DICT_TSV = DATA / "reference" / "facemoe_swin120_state_dict.tsv"
CALIB_DIR = DATA / "calib"
