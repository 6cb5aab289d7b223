"""RuntimeOptions: the FEWSHOTSAM_* environment variables are read in one place, at the edges (the command
line, the Slicer logic), each into its field; a value that means nothing is one sentence naming the
variable; nothing else in the library reads the environment."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from conftest import ROOT
from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.options import DEFAULT_CAP_BYTES, ENVIRONMENT, RuntimeOptions

# every variable the README and docs/PERFORMANCE.md name, with a value and the field it sets
VALUES = {
    "FEWSHOTSAM_PRECISION": ("BF16", "precision", "bf16"),
    "FEWSHOTSAM_RUNTIME": ("torch", "runtime", "torch"),
    "FEWSHOTSAM_DECODER_RUNTIME": ("OpenVINO", "decoder_runtime", "openvino"),
    "FEWSHOTSAM_DECODER_THREADS": ("2", "decoder_threads", 2),
    "FEWSHOTSAM_COMPILE": ("yes", "compile", True),
    "FEWSHOTSAM_CHANNELS_LAST": ("1", "channels_last", True),
    "FEWSHOTSAM_ONNX_DIR": ("/tmp/onnx-here", "onnx_dir", Path("/tmp/onnx-here")),
    "FEWSHOTSAM_CACHE": ("/tmp/weights-here", "weights_dir", Path("/tmp/weights-here")),
    "FEWSHOTSAM_CACHE_CAP_MB": ("64", "embedding_cap_bytes", 64 << 20),
}


def test_every_variable_sets_its_field_and_nothing_else():
    assert {variable for variable, _ in ENVIRONMENT.values()} == set(VALUES)
    plain = RuntimeOptions()
    for variable, (text, name, value) in VALUES.items():
        got = RuntimeOptions.from_environment({variable: text})
        assert getattr(got, name) == value, variable
        assert dataclasses.replace(got, **{name: getattr(plain, name)}) == plain, variable  # only that field


def test_unset_and_empty_variables_leave_the_defaults():
    plain = RuntimeOptions()
    assert RuntimeOptions.from_environment({}) == plain
    assert RuntimeOptions.from_environment({variable: "  " for variable in VALUES}) == plain
    assert (plain.precision, plain.runtime, plain.decoder_runtime) == ("auto", "auto", "auto")
    assert plain.decoder_threads is None and not plain.compile and not plain.channels_last
    assert plain.embedding_cap_bytes == DEFAULT_CAP_BYTES == 512 << 20
    assert plain.weights_dir == Path.home() / ".cache" / "fewshotsam" and plain.onnx_dir == plain.weights_dir / "onnx"


def test_the_environment_overrides_the_callers_defaults():
    """What the Slicer module does: its own weights folder, unless FEWSHOTSAM_CACHE names another."""
    slicer = RuntimeOptions(weights_dir=Path("/slicer/cache/FewShotSAM"))
    assert RuntimeOptions.from_environment({}, defaults=slicer).weights_dir == Path("/slicer/cache/FewShotSAM")
    mine = RuntimeOptions.from_environment({"FEWSHOTSAM_CACHE": "/mine"}, defaults=slicer)
    assert mine.weights_dir == Path("/mine")


@pytest.mark.parametrize("variable, text", [
    ("FEWSHOTSAM_PRECISION", "int8"), ("FEWSHOTSAM_RUNTIME", "tensorrt"), ("FEWSHOTSAM_DECODER_RUNTIME", "nonsense"),
    ("FEWSHOTSAM_DECODER_THREADS", "two"), ("FEWSHOTSAM_DECODER_THREADS", "0"), ("FEWSHOTSAM_COMPILE", "maybe"),
    ("FEWSHOTSAM_CHANNELS_LAST", "2"), ("FEWSHOTSAM_CACHE_CAP_MB", "lots"), ("FEWSHOTSAM_CACHE_CAP_MB", "-5"),
])
def test_a_value_that_means_nothing_is_one_sentence_naming_the_variable(variable, text):
    with pytest.raises(UserInputError) as err:
        RuntimeOptions.from_environment({variable: text})
    message = str(err.value)
    assert message.startswith(f"{variable}='{text}'") and message.endswith(".")
    assert ". " not in message and "\n" not in message


def test_options_are_frozen_and_checked_when_built_directly():
    options = RuntimeOptions(precision="FP32")
    assert options.precision == "fp32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.precision = "bf16"
    with pytest.raises(UserInputError, match="precision"):
        RuntimeOptions(precision="int8")
    with pytest.raises(UserInputError, match="decoder runtime"):
        RuntimeOptions(decoder_runtime="tensorrt")
    with pytest.raises(UserInputError, match="threads"):
        RuntimeOptions(decoder_threads=0)
    with pytest.raises(UserInputError, match="positive"):
        RuntimeOptions(embedding_cap_bytes=0)


def test_the_command_line_reads_the_environment_first(tmp_path, monkeypatch, capsys):
    """A bad variable stops the main job before anything is read or written: one line, exit code 2."""
    from FewShotSAMLib.cli import main

    monkeypatch.setenv("FEWSHOTSAM_PRECISION", "int8")
    out = tmp_path / "out.nii.gz"
    code = main(["segment", str(tmp_path / "absent.nii.gz"), "--example", str(tmp_path / "absent.nii.gz"),
                 "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert err == "error: FEWSHOTSAM_PRECISION='int8' is not a precision; use one of auto, fp32, bf16, fp16, mixed."


def _reads_environment(path: Path) -> bool:
    """True when the module mentions os.environ or os.getenv (read or write) anywhere, functions included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv"):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv", "putenv") for a in node.names):
            return True
    return False


def test_only_the_options_module_reads_the_environment():
    """The library and the Slicer helpers never read or write FEWSHOTSAM_* variables themselves (bench.py
    copies the environment for the child processes it starts)."""
    files = sorted((ROOT / "FewShotSAMLib").rglob("*.py")) + sorted((ROOT / "FewShotSAM").rglob("*.py"))
    readers = {str(p.relative_to(ROOT)) for p in files if _reads_environment(p)}
    assert readers <= {"FewShotSAMLib/options.py", "FewShotSAMLib/bench.py"}, readers
    assert "FewShotSAMLib/options.py" in readers
