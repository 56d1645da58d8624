"""deploycomp pipeline: recipe validation (one-line errors before any work), caching, --force, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error

# A recipe that names a zoo model, so validation needs neither the baseline nor any data.
VALID = """
name: t
model: light_resnet18
data: {name: synthetic, eval_samples: 32, eval_batch: 32}
variants:
  - name: mag50
    prune: {method: magnitude, ratio: 0.5, finetune: {epochs: 1, train_samples: 32, batch_size: 32}}
export: {simplify: false}
quantize: {precisions: [int8], calib_samples: 8, calib_batch: 8}
bench: {backends: [torch, ort], batches: [1], iters: 2, warmup: 0, warmup_ms: 0, threads: 1}
"""


@pytest.fixture()
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against each other."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("old, new, fragments", [
    ("ratio: 0.5", "ratoi: 0.5", ["variants[0].prune.ratoi", "unknown key", "did you mean 'ratio'"]),
    ("ratio: 0.5", "ratio: high", ["variants[0].prune.ratio", "expected", "number", "'high'"]),
    ("ratio: 0.5", "ratio: 1.5", ["variants[0].prune.ratio", "(0, 1)", "1.5"]),
    ("method: magnitude", "method: magnitud", ["variants[0].prune.method", "did you mean 'magnitude'"]),
    ("train_samples: 32", "train_samples: -5", ["variants[0].prune.finetune.train_samples", "positive"]),
    ("batches: [1]", "batches: [1, x]", ["bench.batches[1]", "expected an integer", "'x'"]),
    ("backends: [torch, ort]", "backends: [torch, tort]", ["bench.backends[1]", "did you mean", "Valid"]),
    ("precisions: [int8]", "precisions: [int4]", ["quantize.precisions[0]", "int4"]),
    ("name: synthetic", "name: synthetik", ["data.name", "did you mean 'synthetic'"]),
    ("export: {", "exprot: {", ["exprot", "unknown key", "did you mean 'export'"]),
    ("model: light_resnet18", "model: light_resnet81", ["model", "did you mean 'light_resnet18'"]),
    ("  - name: mag50\n", "  - description: x\n", ["variants[0].name", "required"]),
])
def test_recipe_errors_are_one_line_with_file_and_key(cli, tmp_path, old, new, fragments):
    assert old in VALID
    recipe = write(tmp_path / "bad.yaml", VALID.replace(old, new, 1))
    result = cli("pipeline", recipe, "-o", tmp_path / "run", ok=False)
    assert_one_line_error(result, "bad.yaml", *fragments)
    assert not (tmp_path / "run").exists()  # rejected before any work


def test_recipe_file_problems(cli, tmp_path):
    assert_one_line_error(cli("pipeline", tmp_path / "nope.yaml", ok=False), "nope.yaml", "does not exist")
    bad = write(tmp_path / "broken.yaml", "variants: [\n  - name: x\n")
    assert_one_line_error(cli("pipeline", bad, ok=False), "broken.yaml", "not valid YAML")
    twice = write(tmp_path / "twice.yaml", VALID.replace(
        "export: {", "  - name: mag50\n    prune: {method: random, ratio: 0.2}\nexport: {"))
    assert_one_line_error(cli("pipeline", twice, ok=False), "variants[1].name", "used twice")


def test_shipped_recipes_validate():
    import yaml

    from deploycomp.pipeline import RECIPES_DIR, Study, check_recipe

    names = sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))
    assert {"default.yaml", "ts3.yaml", "kd.yaml", "slimming.yaml", "relevance.yaml"} <= set(names)
    for p in RECIPES_DIR.glob("*.yaml"):  # the schema (values that need the baseline are checked when run)
        top = check_recipe(yaml.safe_load(p.read_text()), str(p))
        assert top.get("description"), p
        assert isinstance(Study("x", top, str(p), ""), Study)


def test_recipe_values_are_coerced_and_strict():
    import yaml

    from deploycomp.pipeline import RecipeError, check_recipe

    top = check_recipe(yaml.safe_load(VALID.replace("batches: [1]", "batches: 8").replace(
        "ratio: 0.5", "ratio: 5e-1")), "t.yaml")
    assert top["bench"]["batches"] == (8,) and top["bench"]["backends"] == ("torch", "ort")
    assert top["variants"][0]["prune"]["ratio"] == 0.5  # PyYAML leaves 5e-1 a string
    assert "lr" not in top["variants"][0]["prune"]["finetune"]  # only the keys given: None means default
    for old, new, message in [("epochs: 1", "epochs: yes", "expected an integer, got a boolean true"),
                              ("epochs: 1", "epochs: 1.0", "expected an integer, got a number 1.0"),
                              ("simplify: false", "simplify: 0", "expected true or false, got an integer 0")]:
        with pytest.raises(RecipeError, match=message):
            check_recipe(yaml.safe_load(VALID.replace(old, new)), "t.yaml")


def test_keys_come_from_the_libraries():
    from dataclasses import fields

    from deploycomp.pipeline import _prune_section, _train_section
    from deploycomp.prune import PruneConfig
    from deploycomp.train import TrainConfig

    assert {f.name for f in fields(PruneConfig)} - {"device", "eval_samples", "eval_batch"} <= set(
        _prune_section().model_fields)
    assert {f.name for f in fields(TrainConfig)} - {"device"} <= set(_train_section().model_fields)


def _run_doc(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_pipeline_runs_caches_and_forces(cli, tmp_path, one_thread):
    recipe = write(tmp_path / "tiny.yaml", VALID)
    run_dir = tmp_path / "run"
    first = cli("-q", "pipeline", recipe, "-o", run_dir)
    doc = _run_doc(run_dir)
    n = len(doc["log"])
    # original: load, evaluate, export, quantize; the variant: prune, evaluate, export, quantize; then one
    # paired bench stage per backend (torch: 2 checkpoints; ort: 2 FP32 + 2 INT8 ONNX files)
    assert n == 10 and doc["stages_run"] == n and doc["stages_cached"] == 0 and doc["status"] == "finished"
    benches = [json.loads(p.read_text())["record"] for p in sorted((run_dir / "stages").glob("bench-*/record.json"))]
    assert sorted(len({r["artifact"] for r in b["results"]}) for b in benches) == [2, 4]
    for b in benches:  # all artifacts of a backend in one session, original first
        assert len({r["session"] for r in b["results"]}) == 1 and b["results"][0]["branch"] == "original"
    assert "mag50" in first.output and "original" in first.output
    records = sorted((run_dir / "stages").glob("*/record.json"))
    assert len(records) == n
    stamps = {p: p.stat().st_mtime_ns for p in records}

    md = (run_dir / "report.md").read_text()
    assert "synthetic data" in md and "TensorRT" in md
    rows = json.loads((run_dir / "report.json").read_text())["studies"][0]["rows"]
    assert [r["variant"] for r in rows] == ["original", "mag50"]
    assert rows[1]["macs_reduction_pct"] > 30 and rows[0]["top1_change_pts"] == 0
    assert rows[1]["latency_median_ms"] > 0 and rows[1]["backend"] == "torch"
    assert rows[1]["paired"] is True and rows[1]["speedup"] > 0  # paired round by round (2 rounds: no interval)
    latency = json.loads((run_dir / "report.json").read_text())["studies"][0]["latency"]
    assert len(latency) == 6 and all(r["paired"] in (True, None) for r in latency)
    for png in (run_dir / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((run_dir / "plots").glob("*.png"))) == 2  # one batch size: no latency-vs-batch plot

    cli("-q", "pipeline", recipe, "-o", run_dir)  # everything is cached
    doc = _run_doc(run_dir)
    assert doc["stages_run"] == 0 and doc["stages_cached"] == n
    assert all(e["status"] == "cached" for e in doc["log"])
    assert {p: p.stat().st_mtime_ns for p in records} == stamps

    bench = next(p for p in records if p.parent.name.startswith("bench-"))
    bench.unlink()  # as if interrupted before that stage finished
    cli("-q", "pipeline", recipe, "-o", run_dir)
    doc = _run_doc(run_dir)
    assert doc["stages_run"] == 1 and [e["stage"] for e in doc["log"] if e["status"] == "ran"] == [bench.parent.name]

    write(recipe, recipe.read_text().replace("iters: 2", "iters: 3"))  # only the benchmarks depend on it
    cli("-q", "pipeline", recipe, "-o", run_dir, "--no-plots")
    doc = _run_doc(run_dir)
    assert [e["stage"].split("-")[0] for e in doc["log"] if e["status"] == "ran"] == ["bench"] * 2

    cli("-q", "pipeline", recipe, "-o", run_dir, "--force", "--no-plots")
    doc = _run_doc(run_dir)
    assert doc["stages_run"] == n and doc["force"] is True


def test_refuses_a_directory_that_is_not_a_run(cli, tmp_path):
    recipe = write(tmp_path / "tiny.yaml", VALID)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert_one_line_error(cli("pipeline", recipe, "-o", tmp_path / "busy", ok=False), "not empty")


def test_int8_is_quantized_for_the_backend_that_runs_it(tmp_path):
    """ONNX Runtime benches time an ort-cpu graph; a TensorRT build starts from its own tensorrt graph."""
    from deploycomp.pipeline import load_recipe, plan_study

    recipe = load_recipe(write(tmp_path / "t.yaml", VALID.replace("precisions: [int8]", "precisions: [fp16, int8]")
                               + "build: {}\n"))
    plan = plan_study(recipe.studies[0], tmp_path, tensorrt=True)  # planning only: no TensorRT needed
    b = plan.branches[0]
    assert b.quantize["int8"].options["target"] == "ort-cpu" and "target" not in b.quantize["fp16"].options
    assert [src for p, backend, _, src in b.bench if p == "int8" and backend == "ort"] == [b.quantize["int8"]]
    assert b.build["int8"].parent is b.quantize_trt["int8"] and b.quantize_trt["int8"].options["target"] == "tensorrt"
    assert b.build["fp16"].parent is b.quantize["fp16"] and b.build["fp32"].parent is b.export
    assert b.quantize_trt["int8"] in plan.stages() and b.quantize_trt["int8"].key != b.quantize["int8"].key
    without_trt = plan_study(recipe.studies[0], tmp_path, tensorrt=False).branches[0]
    assert not without_trt.quantize_trt and not without_trt.build


def test_recipe_cannot_pick_the_int8_target(cli, tmp_path):
    recipe = write(tmp_path / "t.yaml", VALID.replace("calib_batch: 8}", "calib_batch: 8, target: tensorrt}"))
    assert_one_line_error(cli("pipeline", recipe, "-o", tmp_path / "run", ok=False), "quantize.target", "unknown key")


def test_variant_descriptions_name_what_a_prune_step_asks_for():
    from deploycomp.pipeline.plan import describe_steps

    assert describe_steps({"prune": {"method": "taylor", "target_latency_ms": 40, "latency_backend": "ort"}}) == \
        "prune taylor 40 ms measured on ort, fine-tune 1 ep"
    assert describe_steps({"prune": {"target_speedup": 2.0, "measured": True, "finetune": None}}) == \
        "prune magnitude 2x measured, no fine-tune"
    assert describe_steps({"prune": {"target_speedup": 2.0}}) == "prune magnitude 2x MACs, fine-tune 1 ep"
    assert describe_steps({"prune": {"target_macs_g": 1.5}}) == "prune magnitude 1.5 GMACs, fine-tune 1 ep"


# A recipe over the user's own model code, found beside the recipe (the run starts elsewhere).
USER_CODE = """
name: mine
model: user_net.py:build
data: {name: synthetic, eval_samples: 32, eval_batch: 32}
variants:
  - name: mag50
    prune: {method: magnitude, ratio: 0.5, round_to: 1, distill_from: original,
            finetune: {epochs: 1, train_samples: 32, batch_size: 32}}
  - name: kd
    distill: {student: parent, teacher: original, train: {epochs: 1, train_samples: 32, batch_size: 32}}
export: {simplify: false}
bench: {backends: [torch, ort], batches: [1], iters: 2, warmup: 0, warmup_ms: 0, threads: 1}
"""


def test_a_recipe_with_user_code_runs_every_stage(cli, tmp_path, one_torch_thread):
    """The code named once in the recipe is the run's consent: every stage reloads the run's checkpoints with it."""
    from deploycomp.checkpoint import load_checkpoint
    from deploycomp.errors import CheckpointError
    from deploycomp.files import sha256
    from tests.conftest import USER_NET

    (tmp_path / "study").mkdir()
    code = write(tmp_path / "study" / "user_net.py", USER_NET)
    recipe = write(tmp_path / "study" / "mine.yaml", USER_CODE)
    run_dir = tmp_path / "run"
    cli("-q", "pipeline", recipe, "-o", run_dir)
    doc = _run_doc(run_dir)
    entry = f"{code}:build"
    # load, prune, distill, 3 x (evaluate, export), bench torch (3 checkpoints) and bench ort (3 ONNX files)
    assert doc["status"] == "finished" and doc["stages_run"] == len(doc["log"]) == 11
    assert doc["studies"][0]["code"] == [{"entry": entry, "named_in": "model", "file": str(code),
                                          "sha256": sha256(code)}]
    stages = run_dir / "stages"
    load = json.loads(next(stages.glob("load-*/record.json")).read_text())["record"]
    assert load["arch"] == entry
    distill = json.loads(next(stages.glob("distill-*/record.json")).read_text())["record"]
    assert distill["params"]["teacher_arch"] == entry
    prune = json.loads(next(stages.glob("prune-*/record.json")).read_text())["record"]
    assert prune["params"]["distill_from_arch"] == entry
    torch_bench = [json.loads(p.read_text())["record"] for p in stages.glob("bench-*/record.json")]
    torch_bench = next(b for b in torch_bench if b["backend"] == "torch")
    assert [r["arch"] for r in torch_bench["results"]] == [entry] * 3
    assert [r["branch"] for r in torch_bench["results"]] == ["original", "mag50", "kd"]
    with pytest.raises(CheckpointError, match=f"--arch {entry}"):  # consent was for that run only
        load_checkpoint(next(stages.glob("prune-*/model.pt")))

    cli("-q", "pipeline", recipe, "-o", run_dir)
    assert _run_doc(run_dir)["stages_cached"] == 11
    write(code, USER_NET + "\n# edited\n")  # the code is part of every stage's identity
    cli("-q", "pipeline", recipe, "-o", run_dir, "--no-plots")
    doc = _run_doc(run_dir)
    assert doc["stages_run"] == 11 and doc["studies"][0]["code"][0]["sha256"] == sha256(code)


def _user_checkpoint(entry: str, path: Path) -> Path:
    from deploycomp.checkpoint import load_model
    from deploycomp.data import load_dataset

    ckpt = load_model(entry)
    ckpt.metadata.update(load_dataset("synthetic", "test")[1].as_dict())
    return ckpt.save(path)


FILE_RECIPE = """
name: f
model: MODEL
data: {name: synthetic, input_size: [24, 24], eval_samples: 32, eval_batch: 32}
variants:
  - {name: v, STEP}
"""
FINETUNE = "{epochs: 1, train_samples: 32, batch_size: 32}"
KD = f"distill: {{student: parent, teacher: user.pt, train: {FINETUNE}}}"
PRUNE_KD = f"prune: {{method: magnitude, ratio: 0.5, distill_from: user.pt, finetune: {FINETUNE}}}"


def _file_recipe(path: Path, model: str, step: str) -> Path:
    return write(path, FILE_RECIPE.replace("MODEL", model).replace("STEP", step))


@pytest.mark.parametrize(("model", "step", "file_key", "arch_key"), [
    ("user.pt", "prune: {method: magnitude, ratio: 0.5, finetune: null}", "model", "arch"),
    ("light_resnet18", KD, "variants[0].distill.teacher", "variants[0].distill.teacher_arch"),
    ("light_resnet18", PRUNE_KD, "variants[0].prune.distill_from", "variants[0].prune.distill_from_arch"),
])
def test_a_checkpoint_built_from_user_code_runs_once_the_recipe_names_the_code(cli, net_file, tmp_path,
                                                                                 one_torch_thread, model, step,
                                                                                 file_key, arch_key):
    """A model or a teacher that is a user-code checkpoint: refused before any work, naming the key to add."""
    entry = f"{net_file}:build"
    _user_checkpoint(entry, tmp_path / "user.pt")
    recipe = _file_recipe(tmp_path / "r.yaml", model, step)
    result = cli("pipeline", recipe, "-o", tmp_path / "run", ok=False)
    assert_one_line_error(result, f"r.yaml: {file_key}: ", f"user.pt was built by user code {entry}",
                          f"name it in the recipe: {arch_key}: {entry} ")
    assert not (tmp_path / "run" / "stages").exists()  # refused before any work
    name = arch_key.rsplit(".", 1)[-1]
    named = step.replace("user.pt, ", f"user.pt, {name}: {entry}, ") if name != "arch" else step
    recipe = _file_recipe(recipe, model, named)
    if name == "arch":
        write(recipe, recipe.read_text() + f"arch: {entry}\n")
    cli("-q", "pipeline", recipe, "-o", tmp_path / "run")
    doc = _run_doc(tmp_path / "run")
    assert doc["status"] == "finished" and doc["studies"][0]["code"] == [
        {"entry": entry, "named_in": arch_key, "file": str(net_file), "sha256": doc["studies"][0]["code"][0]["sha256"]}]


def test_an_arch_is_for_a_checkpoint_file(cli, net_file, tmp_path):
    entry = f"{net_file}:build"
    step = KD.replace("teacher: user.pt, ", f"teacher_arch: {entry}, ")
    recipe = write(tmp_path / "r.yaml", FILE_RECIPE.replace("MODEL", "light_resnet18").replace("STEP", step)
                   + f"arch: {entry}\n")
    assert_one_line_error(cli("pipeline", recipe, "-o", tmp_path / "run", ok=False),
                          "r.yaml: arch: is for a checkpoint or state-dict file given as model", "'light_resnet18'")
    write(recipe, recipe.read_text().replace(f"arch: {entry}\n", ""))  # the line at the end
    assert_one_line_error(cli("pipeline", recipe, "-o", tmp_path / "run", ok=False),
                          "r.yaml: variants[0].distill.teacher_arch: is for a checkpoint", "'parent'")


def test_one_torch_benchmark_rebuilds_checkpoints_of_one_user_code_only(cli, tmp_path, one_torch_thread):
    """bench takes one arch: a variant trained from other user code is refused there, with what to do."""
    from tests.conftest import USER_NET

    write(tmp_path / "user_net.py", USER_NET)
    write(tmp_path / "other_net.py", USER_NET)
    recipe = write(tmp_path / "two.yaml", """
name: two
model: user_net.py:build
data: {name: synthetic, eval_samples: 32, eval_batch: 32}
variants:
  - {name: other, train: {model: other_net.py:build, epochs: 1, train_samples: 32, batch_size: 32}}
bench: {backends: [torch], batches: [1], iters: 2, warmup: 0, warmup_ms: 0, threads: 1}
""")
    result = cli("pipeline", recipe, "-o", tmp_path / "run", ok=False)
    assert_one_line_error(result, "bench torch (2 artifacts, paired): its checkpoints are built from different user "
                                  "code (other_net.py:build, user_net.py:build)", "time them on ort (export)")
    assert _run_doc(tmp_path / "run")["status"] == "failed"


SEGMENTATION = """
name: seg
model: light_unet
train: {epochs: 1, train_samples: 64, batch_size: 32, optimizer: adam, lr: 0.003}
data: {name: fashion-scenes, eval_samples: 32, eval_batch: 32}
variants:
  - name: taylor30
    prune: {method: taylor, ratio: 0.3, calib_samples: 16, calib_batch: 8,
            finetune: {epochs: 1, train_samples: 32, batch_size: 32}}
export: {simplify: false}
quantize: {precisions: [int8], calib_samples: 8, calib_batch: 8}
bench: {backends: [ort], batches: [1], iters: 2, warmup: 0, warmup_ms: 0, threads: 1, sessions: 2, rounds: 2}
"""


def test_a_segmentation_recipe_runs_every_stage_and_reports_miou(cli, tmp_path, one_thread):
    recipe = write(tmp_path / "seg.yaml", SEGMENTATION)
    run_dir = tmp_path / "run"
    out = cli("pipeline", recipe, "-o", run_dir)
    assert "mIoU" in out.output and "pixel agreement" in out.output
    doc = json.loads((run_dir / "report.json").read_text())["studies"][0]
    assert doc["metric"] == "miou_pct" and [r["variant"] for r in doc["rows"]] == ["original", "taylor30"]
    for r in doc["rows"]:
        assert 0 <= r["miou_pct"] <= 100 and "top1_pct" not in r
    assert doc["rows"][0]["miou_change_pts"] == 0 and doc["rows"][1]["macs_reduction_pct"] > 20
    int8 = [r for r in doc["latency"] if r["precision"] == "int8"]
    assert len(int8) == 2 and all(r["miou_pct"] is not None for r in int8)
    md = (run_dir / "report.md").read_text()
    assert "| mIoU % |" in md and "Δ mIoU (pts)" in md
    quant = [json.loads(p.read_text())["record"] for p in (run_dir / "stages").glob("quantize-*/record.json")]
    assert all(q["accuracy"]["metric"] == "miou_pct" and "miou_drop_points" in q["accuracy"] for q in quant)
    assert (run_dir / "plots" / "accuracy_vs_latency.png").exists()
