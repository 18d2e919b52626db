"""Split a folder of NIH ChestX-ray14 images into two patient-disjoint folders for the seed
study: `vendor/` (what `suite train` trains the DenseNet-121 on) and `hospital/` (what
`suite run --split all` validates it on, every image). Files are symlinked, not copied.

    .venv/bin/python configs/seed_study_split.py /work/shared/data/nih-cxr14-sample /tmp/seed-study

Every patient goes to one side only (patients sorted by id, every other one to the vendor),
so no image and no patient of the evaluation set was seen in training.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

CSV = "Data_Entry_2017_v2020.csv"


def split(src: Path, dst: Path) -> dict[str, int]:
    rows = list(csv.DictReader(open(src / CSV, newline="")))
    present = [r for r in rows if (src / "images" / r["Image Index"]).exists()]
    patients = sorted({int(r["Patient ID"]) for r in present})
    vendor = set(patients[0::2])
    counts = {}
    for side, keep in (("vendor", lambda p: p in vendor), ("hospital", lambda p: p not in vendor)):
        chosen = [r for r in present if keep(int(r["Patient ID"]))]
        (dst / side / "images").mkdir(parents=True, exist_ok=True)
        for r in chosen:
            link = dst / side / "images" / r["Image Index"]
            if not link.exists():
                link.symlink_to((src / "images" / r["Image Index"]).resolve())
        with open(dst / side / CSV, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(chosen)
        counts[side] = len(chosen)
    return counts


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: seed_study_split.py NIH_DIR OUT_DIR")
    print(split(Path(sys.argv[1]), Path(sys.argv[2])))
