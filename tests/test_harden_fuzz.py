"""Hardening, a property-based sweep of the command line (hypothesis): whatever the arguments, every
command exits 0 or prints one line starting with "Error:", never a traceback.

Arguments are drawn from each command's own options (read from Click, so new options are swept too):
numbers of every size and sign, NaN and infinities, names that are close to the valid choices, and
files that are missing, empty, directories, junk, of the wrong kind or symbolic link loops. Commands
stop where their real work would begin (see ``stop_before_work``), so a sweep takes seconds; the
example count is fixed and the search derandomized, so CI sees the same examples on every run.
"""

from __future__ import annotations

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploycomp.cli import COMMANDS, cli
from tests.harden_util import BASELINE, TINY_RECIPE, assert_clean_exit, bad_files, invoke, stop_before_work, tiny_onnx

EXAMPLES_PER_COMMAND = 30
SAFE_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-,x ", max_size=12)
NUMBERS = ["0", "-1", "1", "nan", "inf", "-inf", "1e308", "1e-320", str(2**63), str(-(2**63) - 1), "10" * 12, "0x10",
           "1.5", "-0", "", "1e9"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("fuzz-files")
    onnx = tiny_onnx(d / "good.onnx")
    recipe = d / "good.yaml"
    recipe.write_text(TINY_RECIPE)
    files = [onnx, recipe, d / "nothing-here"]
    for suffix, real, wrong in ((".pt", BASELINE, onnx), (".onnx", onnx, BASELINE), (".yaml", recipe, onnx)):
        files += bad_files(d / suffix[1:], real, wrong, suffix).values()
    return sorted(str(p) for p in files)


def value_for(param: click.Parameter, paths: list[str]) -> st.SearchStrategy[str]:
    """Mostly plausible values (so that checks past the parser are reached), sometimes absurd ones."""
    t = param.type
    if isinstance(t, click.Choice):
        choices = [str(c) for c in t.choices]
        return st.one_of(st.sampled_from(choices), st.sampled_from(choices), st.sampled_from(choices).map(
            lambda c: c[:-1] + "x"))
    if isinstance(t, click.types.IntParamType):
        return st.one_of(st.integers(-2, 64).map(str), st.integers(-2, 64).map(str), st.sampled_from(NUMBERS),
                         st.integers(-(2**70), 2**70).map(str))
    if isinstance(t, click.types.FloatParamType):
        return st.one_of(st.floats(-2, 4).map(repr), st.floats(-2, 4).map(repr), st.sampled_from(NUMBERS),
                         st.floats(allow_nan=True, allow_infinity=True).map(repr))
    return st.one_of(st.sampled_from(paths), st.sampled_from(WORDS), st.sampled_from(WORDS), SAFE_TEXT)


# -v/--verbose shows the traceback of an error by design (for bug reports): not swept.
SHOWS_TRACEBACKS = {"verbose"}
WORDS = ["light_resnet18", "resnet18", "synthetic", "fashion-mnist", "cpu", "cuda:7", "8x8", "0x0", "1,2", "224x",
         "-", "magnitude", "taylor", "int8", "stem,layer1", "none", "64", "0", "512M", "out.onnx", "out.pt", "run"]


def arguments(name: str, paths: list[str]) -> st.SearchStrategy[list[str]]:
    """A list of command-line tokens for command ``name``: a few of its options with drawn values."""
    command = cli.get_command(click.Context(cli), name)
    pieces = []
    for p in command.params:
        if p.name in SHOWS_TRACEBACKS:
            continue
        if isinstance(p, click.Argument):
            one = st.lists(value_for(p, paths), min_size=1, max_size=1)
            pieces.append(one if p.required else one | st.just([]))
            continue
        if p.is_flag or getattr(p, "count", False):
            given_ = st.sampled_from([[p.opts[0]]] + ([[p.secondary_opts[0]]] if p.secondary_opts else []))
        else:
            given_ = value_for(p, paths).map(lambda v, o=p.opts[0]: [o, v])
        use = st.just(True) if p.required else st.sampled_from([False, False, False, True])
        pieces.append(use.flatmap(lambda yes, g=given_: g if yes else st.just([])))
    noise = st.sampled_from([[]] * 12 + [["--nope"], ["-x"], ["--"], ["extra"]])
    return st.tuples(*pieces, noise).flatmap(lambda groups: st.permutations(groups)).map(
        lambda groups: [token for group in groups for token in group])


@pytest.mark.parametrize("name", sorted(COMMANDS))
@settings(max_examples=EXAMPLES_PER_COMMAND, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_any_arguments_end_cleanly(name, paths, tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    stop_before_work(monkeypatch)
    args = [name, *data.draw(arguments(name, paths), label="arguments")]
    assert_clean_exit(invoke(*args), args)
