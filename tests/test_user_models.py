"""Bring your own model: user code (file.py:factory, package.module:factory), weights files, timm, kwargs."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from deploycomp.checkpoint import load_checkpoint, load_model
from deploycomp.cli.options import parse_input_size, parse_model_kwargs
from deploycomp.errors import CheckpointError, MissingDependencyError, UsageError
from tests.conftest import assert_one_line_error


def _same(a, b, shape):
    x = torch.randn(2, *shape)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_user_file_builds_with_kwargs_and_declared_size(net_file):
    ckpt = load_model(f"{net_file}:build", num_classes=7, model_kwargs={"width": 4})
    assert ckpt.arch == f"{net_file}:build" and ckpt.model_kwargs == {"num_classes": 7, "width": 4}
    assert ckpt.input_shape == (3, 24, 24) and ckpt.num_classes == 7 and ckpt.in_channels == 3
    assert ckpt.model[0].out_channels == 4
    assert ckpt.metadata["code"]["file"] == str(net_file.resolve()) and len(ckpt.metadata["code"]["sha256"]) == 64


def test_user_checkpoint_reloads_only_with_the_code_named(net_file, tmp_path):
    entry = f"{net_file}:build"
    ckpt = load_model(entry, num_classes=3, input_size=(16, 16))
    path = ckpt.save(tmp_path / "user.pt")
    raw = torch.load(path, weights_only=True)  # still a plain, safe checkpoint
    assert raw["arch"] == entry
    with pytest.raises(CheckpointError, match=f"name it: --arch {entry}"):
        load_checkpoint(path)
    with pytest.raises(UsageError, match="name that code"):
        load_checkpoint(path, arch="resnet18")
    again = load_checkpoint(path, arch=entry)
    assert again.input_shape == (3, 16, 16) and _same(ckpt.model, again.model, (3, 16, 16))


def test_checkpoint_naming_code_never_runs_it_unasked(tmp_path):
    """A crafted checkpoint naming code that writes a file on import: refused before anything is imported."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\ndef build():\n    return None\n")
    payload = {"format": "deploycomp.checkpoint", "format_version": 1, "deploycomp": "0", "arch": f"{evil}:build",
               "model_kwargs": {}, "surgeries": [], "state_dict": {}, "metadata": {}}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="imports and runs that code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    payload["arch"] = "subprocess:run"  # a module entry point is just as dangerous
    payload["model_kwargs"] = {"args": ["touch", str(marker)]}
    torch.save(payload, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError, match="--arch subprocess:run"):
        load_model(str(tmp_path / "evil2.pt"))
    assert not marker.exists()


def test_module_entry_point_and_weights_file(net_file, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_net", raising=False)
    reference = load_model("user_net:build", num_classes=4).model
    weights = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, weights)
    loaded = load_model("user_net:build", num_classes=4, weights=str(weights))
    assert _same(reference, loaded.model, (3, 24, 24))
    assert loaded.metadata["weights"] == str(weights) and len(loaded.metadata["weights_sha256"]) == 64
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model("user_net:build", num_classes=6, weights=str(weights))
    with pytest.raises(UsageError, match="has no named weights"):
        load_model("user_net:build", weights="DEFAULT")


@pytest.mark.parametrize(("ref", "fragment"), [
    ("missing_dir/nothing.py:build", "does not exist"),
    ("{file}:nope", "has no attribute 'nope'"),
    ("{file}:not_a_model", "not a torch.nn.Module"),
    ("{file}:fixed", "builds a model with 5 classes, not the 10 asked for (its factory takes no num_classes"),
    ("no_such_pkg_xyz.models:build", "no module named 'no_such_pkg_xyz'"),
    ("{broken}:build", "importing"),
])
def test_user_code_errors_are_one_line(cli, net_file, tmp_path, ref, fragment):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nthis is not python\n")
    ref = ref.format(file=net_file, broken=broken)
    assert_one_line_error(cli("info", "-m", ref, "--num-classes", "10", ok=False), fragment)


def test_bad_model_kwargs(net_file, cli):
    with pytest.raises(UsageError, match="cannot be called with"):
        load_model(f"{net_file}:build", model_kwargs={"depth": 3})
    with pytest.raises(UsageError, match="check --model-kwargs"):
        load_model("resnet18", model_kwargs={"no_such_argument": 1})
    assert_one_line_error(cli("info", "-m", f"{net_file}:build", "--model-kwargs", "width", ok=False),
                          "KEY=VALUE")


def test_option_parsers():
    assert parse_input_size("224") == (224, 224)
    assert parse_input_size("224x192") == parse_input_size("224,192") == parse_input_size("224X192") == (224, 192)
    for bad in ("0", "a", "1x2x3", "-4"):
        with pytest.raises(UsageError, match="--input-size"):
            parse_input_size(bad)
    assert parse_model_kwargs(["width=0.5,stem=small", '{"layers": [1, 2]}', "flag=true,name=null"]) == \
        {"width": 0.5, "stem": "small", "layers": [1, 2], "flag": True, "name": None}
    for bad in ("=3", "x", '{"a": 1', "[1]"):
        with pytest.raises(UsageError, match="--model-kwargs"):
            parse_model_kwargs([bad])


def test_cli_user_model_prune_export_roundtrip(cli, net_file, tmp_path):
    """--model FILE.py:factory --weights FILE through prune, then reload (code named) and export."""
    entry = f"{net_file}:build"
    weights = tmp_path / "w.pth"
    torch.save(load_model(entry, model_kwargs={"width": 16}).model.state_dict(), weights)
    r = cli("prune", "-m", entry, "--model-kwargs", "width=16", "--weights", weights, "--data", "synthetic",
            "--method", "magnitude", "--ratio", "0.25", "-o", "p.pt", "--json", "-q")
    record = json.loads(r.stdout)
    assert record["after"]["params_total"] < record["before"]["params_total"]
    assert_one_line_error(cli("export", "-m", "p.pt", "-o", "p.onnx", ok=False), f"--arch {entry}")
    out = cli("export", "-m", "p.pt", "--arch", entry, "-o", "p.onnx", "--json").stdout
    assert json.loads(out)["parity"]["passed"] and (tmp_path / "p.onnx").exists()
    assert_one_line_error(cli("bench", "p.pt", "--iters", "2", ok=False), f"--arch {entry}")
    bench = json.loads(cli("bench", "p.pt", "--arch", entry, "--iters", "2", "--warmup", "1", "--json", "-").stdout)
    assert bench["results"][0]["params_total"] == record["after"]["params_total"]


def test_timm_namespace():
    pytest.importorskip("timm", reason="timm is not installed (pip install 'deploycomp[timm]')")
    ckpt = load_model("timm:resnet18", num_classes=3, in_channels=1, input_size=(32, 32))
    assert ckpt.num_classes == 3 and ckpt.in_channels == 1 and ckpt.input_shape == (1, 32, 32)
    with torch.no_grad():
        assert ckpt.model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    with pytest.raises(UsageError, match="did you mean resnet18"):
        load_model("timm:resnet18x")


def test_timm_missing_says_how_to_install(monkeypatch):
    from deploycomp import zoo

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    monkeypatch.setattr(zoo, "_resolved", {})
    with pytest.raises(MissingDependencyError, match=r'pip install "deploycomp\[timm\]"'):
        load_model("timm:resnet18")


def test_verbosity_after_the_command_name(cli):
    from deploycomp.cli import COMMANDS

    for command in COMMANDS:  # -q/-v are parsed (an unknown option would fail before --help)
        assert cli(command, "-q", "-v", "--help").exit_code == 0
    quiet = cli("info", "-m", "light_resnet18", "--input-size", "32", "-q")
    assert "params" in quiet.stdout and quiet.stderr == ""
    noisy = cli("eval", "-m", "missing.pt", "-v", ok=False)
    assert "Traceback" in noisy.output and "does not exist" in noisy.output


def test_user_code_file_imports_its_neighbours(tmp_path):
    (tmp_path / "blocks.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def head(n):
            return nn.Linear(4, n)
    """))
    (tmp_path / "net2.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        from blocks import head
        def make(num_classes=2):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head(num_classes))
    """))
    assert load_model(f"{tmp_path / 'net2.py'}:make").num_classes == 2


def test_bench_takes_user_code_and_timm_models(cli, net_file):
    """bench builds the same references (file.py:factory, timm:NAME) and times them."""
    refs = [f"{net_file}:build"]
    try:
        import timm  # noqa: F401

        refs.append("timm:mobilenetv3_small_050")
    except ImportError:
        pass
    r = cli("bench", *refs, "--input-size", "32", "--iters", "3", "--warmup", "1", "--warmup-ms", "0",
            "--json", "-")
    results = json.loads(r.stdout)["results"]
    assert [x["input_shape"] for x in results] == [[3, 32, 32]] * len(refs)
    assert all(x["latency_ms"]["median"] > 0 for x in results)


def _user_checkpoint(entry: str, path, num_classes: int = 10):
    """A checkpoint built from user code, with the synthetic dataset's metadata (loads with no dataset files)."""
    from deploycomp.data import load_dataset

    ckpt = load_model(entry, num_classes=num_classes)
    ckpt.metadata.update(load_dataset("synthetic", "test")[1].as_dict())
    return ckpt.save(path)


FAST = ["--data", "synthetic", "--epochs", 1, "--train-samples", 32, "--batch-size", 32, "--input-size", 24]


def test_distill_from_a_user_code_teacher(cli, net_file, tmp_path, one_torch_thread):
    """The teacher's code is named with --teacher-arch; the distilled student records which code taught it."""
    entry = f"{net_file}:build"
    _user_checkpoint(entry, tmp_path / "teacher.pt")
    assert_one_line_error(cli("distill", "--teacher", "teacher.pt", "--student", "light_resnet18", *FAST, ok=False),
                          f"so name it: --teacher-arch {entry} ")
    assert not (tmp_path / "light_resnet18-distilled.pt").exists()
    record = json.loads(cli("distill", "--teacher", "teacher.pt", "--teacher-arch", entry, "--student",
                            "light_resnet18", *FAST, "-o", "kd.pt", "--json", "-q").stdout)
    params = record["params"]
    assert (params["teacher"], params["teacher_arch"]) == ("teacher.pt", entry)
    assert params["teacher_code"]["file"] == str(net_file.resolve()) and len(params["teacher_code"]["sha256"]) == 64
    student = load_checkpoint(tmp_path / "kd.pt")  # a zoo student: reloads with no code named
    assert student.arch == "light_resnet18" and student.metadata["lineage"][-1]["params"]["teacher_arch"] == entry


def test_distill_into_a_user_code_student(cli, net_file, tmp_path, one_torch_thread):
    """A student checkpoint built from user code is named with --student-arch, and so is its distilled copy."""
    entry = f"{net_file}:build"
    _user_checkpoint(entry, tmp_path / "student.pt")
    _user_checkpoint(entry, tmp_path / "teacher.pt")
    args = ["distill", "--teacher", "teacher.pt", "--teacher-arch", entry, "--student", "student.pt", *FAST,
            "-o", "kd.pt"]
    assert_one_line_error(cli(*args, ok=False), f"so name it: --student-arch {entry} ")
    cli(*args, "--student-arch", entry, "-q")
    with pytest.raises(CheckpointError, match=f"--arch {entry}"):
        load_checkpoint(tmp_path / "kd.pt")
    kd = load_checkpoint(tmp_path / "kd.pt", arch=entry)
    assert kd.arch == entry and kd.metadata["lineage"][-1]["op"] == "distill"
    assert not _same(load_checkpoint(tmp_path / "student.pt", arch=entry).model, kd.model, (3, 24, 24))


def test_distill_arch_options_are_for_files(cli, net_file):
    entry = f"{net_file}:build"
    assert_one_line_error(cli("distill", "--teacher", "light_resnet18", "--teacher-arch", entry, "--student",
                              "light_resnet18", *FAST, ok=False),
                          "--teacher-arch", "--teacher light_resnet18 is built fresh")
    assert_one_line_error(cli("distill", "--teacher", entry, "--student", "light_resnet18", "--student-arch", entry,
                              *FAST, ok=False), "--student-arch", "--student light_resnet18 is built fresh")


def test_prune_distills_from_a_user_code_teacher(cli, net_file, tmp_path, one_torch_thread):
    entry = f"{net_file}:build"
    _user_checkpoint(entry, tmp_path / "teacher.pt")
    args = ["prune", "-m", "light_resnet18", "--data", "synthetic", "--input-size", 24, "--method", "magnitude",
            "--ratio", 0.5, "--finetune-epochs", 1, "--train-samples", 32, "--batch-size", 32,
            "--distill-from", "teacher.pt", "-o", "p.pt"]
    assert_one_line_error(cli(*args, ok=False), f"so name it: --distill-from-arch {entry} ")
    record = json.loads(cli(*args, "--distill-from-arch", entry, "--json", "-q").stdout)
    assert record["params"]["distill_from_arch"] == entry and record["params"]["distill_from"] == "teacher.pt"
    assert_one_line_error(cli("prune", "-m", "light_resnet18", "--data", "synthetic", "--method", "magnitude",
                              "--ratio", 0.5, "--distill-from-arch", entry, ok=False),
                          "--distill-from-arch", "give --distill-from too")


@pytest.mark.parametrize(("args", "option"), [
    (["eval", "-m", "{ckpt}", "--data", "synthetic"], "--arch"),
    (["info", "-m", "{ckpt}"], "--arch"),
    (["export", "-m", "{ckpt}", "--data", "synthetic"], "--arch"),
    (["bundle", "-m", "{ckpt}", "--data", "synthetic", "-o", "b"], "--arch"),
    (["train", "-m", "{ckpt}", *FAST], "--arch"),
    (["prune", "-m", "{ckpt}", "--data", "synthetic", "--method", "magnitude", "--ratio", 0.5], "--arch"),
    (["bench", "{ckpt}", "--iters", 2], "--arch"),
    (["distill", "--teacher", "{ckpt}", "--student", "light_resnet18", *FAST], "--teacher-arch"),
    (["distill", "--teacher", "light_resnet18", "--student", "{ckpt}", *FAST], "--student-arch"),
    (["prune", "-m", "light_resnet18", "--data", "synthetic", "--method", "magnitude", "--ratio", 0.5,
      "--finetune-epochs", 1, "--distill-from", "{ckpt}"], "--distill-from-arch"),
])
def test_name_the_code_errors_name_an_option_the_command_has(cli, net_file, tmp_path, args, option):
    """Every command that loads a user-code checkpoint says how to name the code with one of its own options."""
    from deploycomp.cli import cli as group

    command = group.get_command(None, args[0])
    entry = f"{net_file}:build"
    _user_checkpoint(entry, tmp_path / "user.pt")
    result = cli(*[a.format(ckpt="user.pt") if isinstance(a, str) else a for a in args], ok=False)
    assert_one_line_error(result, f"user.pt was built by user code {entry}", f"so name it: {option} {entry} ")
    assert option in {o for p in command.params for o in p.opts}


@pytest.mark.parametrize(("args", "fragment"), [
    (["export", "-m", "module.pt"], "if you trust its origin pass --trust-pickle, or save its state_dict() and load "
                                    "that with --arch NAME"),
    (["distill", "--teacher", "module.pt", "--student", "light_resnet18", *FAST],
     "run arbitrary code when loaded; save its state_dict() and load that with --teacher-arch NAME"),
    (["distill", "--teacher", "light_resnet18", "--student", "module.pt", *FAST],
     "run arbitrary code when loaded; save its state_dict() and load that with --student-arch NAME"),
])
def test_a_pickled_module_is_refused_naming_only_options_the_command_has(cli, tmp_path, args, fragment):
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), tmp_path / "module.pt")
    assert_one_line_error(cli(*args, ok=False), "module.pt contains pickled Python objects", fragment)
