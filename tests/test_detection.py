"""Detection through every command on a tiny COCO set of real garment scenes (the fashion-scenes' first
scenes written as COCO: the same reader as users' data), tiny models, exact assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import HAS_FMNIST, assert_one_line_error

pytestmark = pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST not installed")
ROOT = Path(__file__).resolve().parents[1]
YOLO = ROOT / "examples" / "yolo_det.py"


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    """DIR/train (48 scenes), DIR/val (24 scenes) and DIR/annotations/instances_{train,val}.json."""
    from deploycomp.tasks.scenes import make_scenes, write_coco

    root = tmp_path_factory.mktemp("coco")
    for split, folder, n in (("train", "train", 48), ("test", "val", 24)):
        write_coco(make_scenes(split, n=n), root / folder, root / "annotations" / f"instances_{folder}.json")
    return root


@pytest.fixture(scope="module")
def trained(coco_dir, tmp_path_factory) -> Path:
    """light_det trained for two epochs on the 48 scenes."""
    from click.testing import CliRunner

    from deploycomp.cli import cli

    out = tmp_path_factory.mktemp("det") / "det.pt"
    r = CliRunner().invoke(cli, ["train", "--model", "light_det", "--data", "coco", "--data-dir", str(coco_dir),
                                 "--epochs", "2", "--batch-size", "16", "--optimizer", "adam", "--lr", "0.003",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _record(path) -> dict:
    return json.loads(Path(f"{path}.json").read_text())


def test_train_records_the_task_and_map(trained):
    from deploycomp.checkpoint import load_model

    ckpt = load_model(str(trained))
    assert ckpt.metadata["task"] == "detection" and ckpt.metadata["dataset"] == "coco"
    assert ckpt.num_classes == 10
    test = ckpt.metadata["metrics"]["test"]
    assert {"map_pct", "map50_pct", "map75_pct"} <= set(test)
    assert 0.0 <= test["map_pct"] <= test["map50_pct"] <= 100.0


def test_eval_prints_map(cli, trained, coco_dir):
    r = cli("eval", "--model", trained, "--data-dir", coco_dir)
    assert "mAP" in r.output and "mAP@.5" in r.output


def test_prune_keeps_the_predictors(cli, trained, coco_dir):
    from deploycomp.checkpoint import load_model

    cli("prune", "--model", trained, "--data-dir", coco_dir, "--method", "taylor", "--ratio", "0.3",
        "--calib-samples", "16", "--calib-batch", "8", "--finetune-epochs", "1", "--batch-size", "16", "-o", "p.pt")
    model = load_model("p.pt").model
    assert model.cls_pred.out_channels == 10 and model.box_pred.out_channels == 4
    assert model.cls_tower[0].out_channels < 48  # the head towers are pruned (consistently: it reloads)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 80, 14)


def test_export_with_nms_matches_pytorch_by_detections(cli, trained, coco_dir):
    import onnx

    from deploycomp.export import ort_run_all, ort_session
    from deploycomp.quantize import postprocessing_nodes

    r = cli("export", "--model", trained, "--data-dir", coco_dir, "--dynamic-batch", "--max-detections", "20",
            "-o", "d.onnx")
    assert "detection match agreement 100.0%" in r.output
    side = _record("d.onnx")
    assert side["output_names"] == ["num_detections", "boxes", "scores", "labels"]
    assert side["postprocess"]["max_detections"] == 20 and side["parity"]["passed"]
    num, boxes, scores, labels = ort_run_all(ort_session("d.onnx"), np.zeros((3, 1, 64, 64), np.float32))
    assert num.shape == (3,) and boxes.shape == (3, 20, 4) and scores.shape == labels.shape == (3, 20)
    assert labels.dtype == np.int64 and (labels[scores == 0] == -1).all()
    graph = onnx.load("d.onnx")
    assert any(n.op_type == "NonMaxSuppression" for n in graph.graph.node)
    assert postprocessing_nodes(graph)  # decoding and NMS: kept in float by INT8

    cli("export", "--model", trained, "--data-dir", coco_dir, "--raw", "-o", "raw.onnx")
    assert _record("raw.onnx")["output_names"] == ["raw"] and _record("raw.onnx")["postprocess"] is None
    (raw,) = ort_run_all(ort_session("raw.onnx"), np.zeros((1, 1, 64, 64), np.float32))
    assert raw.shape == (1, 80, 14)


def test_int8_keeps_post_processing_in_float_and_reports_map(cli, trained, coco_dir):
    import onnx

    from deploycomp.quantize import postprocessing_nodes

    cli("export", "--model", trained, "--data-dir", coco_dir, "--dynamic-batch", "-o", "d.onnx")
    r = cli("quantize", "d.onnx", "-p", "int8", "--data-dir", coco_dir, "--calib-samples", "16", "--calib-batch", "8",
            "-o", "q.onnx")
    assert "mAP on coco test (24 images" in r.output
    side = _record("q.onnx")
    acc = side["accuracy"]
    assert acc["metric"] == "map_pct" and acc["agreement"] == "detection match"
    assert acc["map_drop_points"] == pytest.approx(acc["fp32_map_pct"] - acc["map_pct"])
    q = onnx.load("q.onnx")
    post = set(postprocessing_nodes(q))
    assert {n.op_type for n in q.graph.node if n.name in post} >= {"NonMaxSuppression", "Softplus", "Conv"}
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in q.graph.node if n.name in post)
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 0


def test_distill_a_detector(cli, trained, coco_dir):
    r = cli("distill", "--teacher", trained, "--student", "light_det", "--data-dir", coco_dir, "--epochs", "1",
            "--batch-size", "16", "-o", "s.pt")
    assert "mAP" in r.output
    from deploycomp.checkpoint import load_model

    step = load_model("s.pt").metadata["lineage"][-1]
    assert step["op"] == "distill" and step["params"]["teacher"] == str(trained)


def test_yolo_style_user_code_trains_prunes_and_exports(cli, coco_dir):
    cli("train", "--model", f"{YOLO}:yolo_det", "--data", "coco", "--data-dir", coco_dir, "--epochs", "1",
        "--batch-size", "16", "-o", "y.pt")
    cli("prune", "--model", "y.pt", "--arch", f"{YOLO}:yolo_det", "--data-dir", coco_dir, "--method", "magnitude",
        "--ratio", "0.3", "--calib-samples", "32", "--calib-batch", "16", "-o", "yp.pt")
    from deploycomp.checkpoint import load_model

    model = load_model("yp.pt", arch=f"{YOLO}:yolo_det").model
    assert model.head8.cls_pred.out_channels == 10 and model.head16.box_pred.out_channels == 4
    r = cli("export", "--model", "yp.pt", "--arch", f"{YOLO}:yolo_det", "--data-dir", coco_dir, "-o", "yp.onnx")
    assert "detection match" in r.output


def test_torchvision_detector_exports_end_to_end(cli, coco_dir):
    r = cli("export", "--model", "ssdlite320_mobilenet_v3_large", "--data", "coco", "--data-dir", coco_dir,
            "--no-simplify", "-o", "ssd.onnx")
    assert "detection match" in r.output
    assert _record("ssd.onnx")["output_names"] == ["num_detections", "boxes", "scores", "labels"]
    bad = cli("export", "--model", "ssdlite320_mobilenet_v3_large", "--data", "coco", "--data-dir", coco_dir,
              "--dynamic-batch", "-o", "ssd2.onnx", ok=False)
    assert_one_line_error(bad, "--dynamic-batch")
    bad = cli("export", "--model", "ssdlite320_mobilenet_v3_large", "--data", "coco", "--data-dir", coco_dir,
              "--raw", "-o", "ssd3.onnx", ok=False)
    assert_one_line_error(bad, "--raw")
    assert not Path("ssd2.onnx").exists() and not Path("ssd3.onnx").exists()


def test_mistakes_are_one_line(cli, trained, coco_dir, tiny_checkpoint):
    r = cli("eval", "--model", trained, "--data", "fashion-mnist", ok=False)
    assert_one_line_error(r, "detection model", "fashion-scenes-det")
    r = cli("export", "--model", tiny_checkpoint, "--max-detections", "5", "-o", "c.onnx", ok=False)
    assert_one_line_error(r, "--max-detections", "classification")
    r = cli("export", "--model", tiny_checkpoint, "--raw", "-o", "c.onnx", ok=False)
    assert_one_line_error(r, "--raw")
    r = cli("eval", "--model", "maskrcnn_resnet50_fpn", "--data", "coco", "--data-dir", coco_dir, ok=False)
    assert_one_line_error(r, "fasterrcnn_resnet50_fpn")
    assert not Path("c.onnx").exists()


def test_int8_sensitivity_ranks_layers_by_map(cli, trained, coco_dir):
    cli("export", "--model", trained, "--data-dir", coco_dir, "--dynamic-batch", "-o", "d.onnx")
    cli("quantize", "d.onnx", "-p", "int8", "--data-dir", coco_dir, "--calib-samples", "16", "--calib-batch", "8",
        "--sensitivity", "--rank-samples", "16", "--no-bench", "-o", "q.onnx")
    guard = _record("q.onnx")["quantization"]["guard"]
    assert guard["metric"] == "map_pct" and guard["samples"] == 16
    ranked = guard["sensitivity"]
    assert ranked and [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert all(r["op_type"] == "Conv" for r in ranked if "nodes" not in r)  # layers; then operator groups (ort-cpu)
    groups = [r for r in ranked if "nodes" in r]
    assert groups and all(r["layer"].startswith(f"every {r['op_type']} (") for r in groups)
    assert Path("q.sensitivity.md").exists()


def test_bundle_reports_map(cli, trained, coco_dir):
    r = cli("bundle", "--model", trained, "--data-dir", coco_dir, "--calib-samples", "16", "--eval-samples", "8",
            "-o", "b")
    assert "(mAP: fp32" in r.output
    manifest = json.loads(Path("b/bundle.json").read_text())
    assert manifest["task"] == "detection" and manifest["metric"] == "map_pct"
    assert set(manifest["models"]) == {"fp32", "fp16", "int8"}
    assert all(m["map_pct"] is not None for m in manifest["models"].values())
    assert "mAP (%)" in Path("b/README.md").read_text()
