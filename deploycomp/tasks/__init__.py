"""Tasks: what differs between classification, segmentation and detection (see ARCHITECTURE.md, "Tasks").

A task owns the data format and its joint image+target transforms, the loss, the metrics, which output
layers pruning must protect, how export parity is judged, and the report's accuracy columns. Every
command asks the task of its model or dataset instead of assuming one label per image.
"""
