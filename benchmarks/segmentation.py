"""Segmentation through every stage (issue 22): run benchmarks/recipes/segmentation.yaml, write the table.

    python benchmarks/segmentation.py                          # run the recipe into runs/segmentation, then render
    python benchmarks/segmentation.py --run-dir RUN --no-run   # render an existing run only

Writes benchmarks/results/segmentation.md (columns: see benchmarks/task_study.py).
"""

import sys

from task_study import Table, main

TABLE = Table("segmentation", "Semantic segmentation through every stage (issue 22)",
              "Data: `fashion-scenes` (docs/segmentation-data.md), mIoU on the study's test subset.", "mIoU")

if __name__ == "__main__":
    sys.exit(main(TABLE))
