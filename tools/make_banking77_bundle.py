"""Rebuild src/peftlab/data/bundled/banking77-{train.csv,test.csv,categories.json}.gz from the original files
(PolyAI-LDN/task-specific-datasets, banking_data/; CC BY 4.0, see src/peftlab/data/bundled/ATTRIBUTION.md), byte
for byte, gzip with mtime 0 so the output is reproducible.
Run from the repo root: python tools/make_banking77_bundle.py ../shared/data/banking77
"""
import gzip
import sys
from pathlib import Path

source = Path(sys.argv[1])
for name in ("train.csv", "test.csv", "categories.json"):
    target = Path("src/peftlab/data/bundled") / f"banking77-{name}.gz"
    with gzip.GzipFile(target, "wb", mtime=0, compresslevel=9) as fh:
        fh.write((source / name).read_bytes())
    print(target, target.stat().st_size)
