"""Rebuild src/peftlab/data/bundled/vangogh/: the Van Gogh style set of ../shared/data/vangogh downscaled so the
bundle stays small (long side 256 px, JPEG quality 85, about 1.5 MB), with its metadata.jsonl (imagefolder layout).
The black-and-white reproduction 8122101.jpg is left out (a colour style set; see that folder's README).
Run from the repo root: python tools/make_vangogh_bundle.py [SOURCE_DIR]
"""
import json
import sys
from pathlib import Path

from PIL import Image

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/vangogh")
dst = Path("src/peftlab/data/bundled/vangogh")
dst.mkdir(parents=True, exist_ok=True)
rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
rows = [r for r in rows if r["file_name"] != "8122101.jpg"]
for r in rows:
    img = Image.open(src / r["file_name"]).convert("RGB")
    img.thumbnail((256, 256), Image.Resampling.LANCZOS)
    img.save(dst / r["file_name"], "JPEG", quality=85, optimize=True)
(dst / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
print(len(rows), "images,", sum(p.stat().st_size for p in dst.iterdir()), "bytes")
