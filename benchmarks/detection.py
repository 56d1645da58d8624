"""Detection through every stage (issue 23): run benchmarks/recipes/detection.yaml, write the table.

    python benchmarks/detection.py                          # run the recipe into runs/detection, then render
    python benchmarks/detection.py --run-dir RUN --no-run   # render an existing run only

Writes benchmarks/results/detection.md (columns: see benchmarks/task_study.py).
"""

import sys

from task_study import Table, main

TABLE = Table("detection", "Object detection through every stage (issue 23)",
              "Data: `fashion-scenes-det` (the scenes' boxes, read as COCO; docs/detection.md), COCO mAP@[.5:.95] "
              "(pycocotools) on the study's test subset; ONNX models include their NMS.", "mAP")

if __name__ == "__main__":
    sys.exit(main(TABLE))
