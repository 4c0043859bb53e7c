"""busiseg.cli: what every entry point says about the command line it was given."""

import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from busiseg.cli import require, unreadable_override


def test_a_busi_file_name_unquoted_gets_the_quoting_that_works():
    arg = "input=/data/Dataset_BUSI_with_GT/benign/benign (1).png"
    hint = unreadable_override(["ckpt_path=a.ckpt", arg])
    assert hint.startswith(arg + ": Hydra reads")
    suggested = hint.rsplit(": ", 1)[1]
    assert suggested == "\"input='/data/Dataset_BUSI_with_GT/benign/benign (1).png'\""
    # what the shell hands over from the suggestion parses, to the same path
    (override,) = OverridesParser.create().parse_overrides([suggested[1:-1]])
    assert override.value() == "/data/Dataset_BUSI_with_GT/benign/benign (1).png"


def test_a_value_with_an_apostrophe_is_quoted_with_double_quotes():
    hint = unreadable_override(["+data.root=/scans/it's (2)"])
    suggested = hint.rsplit(": ", 1)[1]
    assert suggested == '"+data.root=\\"/scans/it\'s (2)\\""'
    shell_gives = suggested[1:-1].replace('\\"', '"')
    (override,) = OverridesParser.create().parse_overrides([shell_gives])
    assert override.value() == "/scans/it's (2)"


@pytest.mark.parametrize("argv", [[], ["-m", "split.fold=0,1,2"], ["data.root=/a b/c"], ["~crop_stage"],
                                  ["input='/x/benign (1).png'"], ["--cfg", "job"], ["model.lr=[1,2]"]])
def test_what_hydra_reads_passes(argv):
    assert unreadable_override(argv) is None


def test_require_names_every_unset_key_with_the_usage():
    cfg = OmegaConf.create({"a": "???", "b": None, "c": "x", "d": ""})
    with pytest.raises(KeyError, match=r"^'a, b, d are not set; usage: cmd a=A'$"):
        require(cfg, ("a", "b", "c", "d"), "cmd a=A", KeyError)
    with pytest.raises(ValueError, match=r"^b is not set; usage: u$"):
        require(cfg, ("c", "b"), "u")
    assert require(cfg, ("c",), "u") == ["x"]


def test_the_entry_point_ends_in_the_hint_not_a_grammar_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "busiseg.train", "data.root=/scans/benign (1)"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("busiseg: error: data.root=/scans/benign (1): Hydra reads ( ) [ ] { } , = and "
                                     "quotes in a value as syntax; quote the value for Hydra inside the shell's "
                                     "quotes: \"data.root='/scans/benign (1)'\"")
    assert not (tmp_path / "logs").exists()


def test_an_unknown_key_ends_with_status_2_not_predicts_files_failed_1(tmp_path):
    # predict's status 1 means "some files failed": a misspelt key must not look like that
    result = subprocess.run([sys.executable, "-m", "busiseg.predict", "ckpt_path=a.ckpt", f"input={tmp_path}",
                             f"output={tmp_path / 'out'}", "outptu=x"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "Key 'outptu' is not in struct" in result.stderr
    assert result.stderr.rstrip().endswith("busiseg.predict: error: the command line could not be used "
                                           "(Hydra's message above); nothing ran")
    assert not (tmp_path / "out").exists()


def test_predict_refuses_its_input_folder_as_output_before_writing_into_it(tmp_path):
    images = tmp_path / "scans"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "busiseg.predict", "ckpt_path=a.ckpt", f"input={images}",
                             f"output={images}/"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert f"output={images}/ is the input folder" in result.stderr
    assert sorted(p.name for p in images.iterdir()) == ["a.png"]  # no .hydra/, no predict.log among the scans


def test_override_values_reads_keys_as_hydra_does():
    from busiseg.cli import override_values

    argv = ["-m", "input='/a/benign (1).png'", "output=/b", "inputs=x", "batch_size=4"]
    assert override_values(argv, ("input", "output")) == {"input": "/a/benign (1).png", "output": "/b"}


def test_predict_refuses_an_output_folder_that_cannot_be_made(tmp_path):
    from busiseg.predict import output_problem

    (tmp_path / "notes.txt").write_text("x")
    assert output_problem([f"output={tmp_path / 'notes.txt' / 'out'}"]) == (
        f"output={tmp_path / 'notes.txt' / 'out'}: {tmp_path / 'notes.txt'} is a file, so the output folder cannot "
        "be made")
    assert output_problem([f"output={tmp_path / 'new' / 'deeper'}", f"input={tmp_path}"]) is None
    assert output_problem([f"input={tmp_path}"]) is None
    assert output_problem(["output=/proc/busiseg_out"]).startswith("output=/proc/busiseg_out: /proc is not writable")


@pytest.mark.parametrize("override, message", [
    ("overlays=no", "overlays=no: overlays takes true or false (default: true)"),  # "no" would read as true
    ("batch_size=abc", "batch_size=abc: batch_size takes a number (default: 8)"),
    ("inference.threshold=high", "inference.threshold=high: inference.threshold takes a number (default: 0.5)"),
])
def test_a_value_of_the_wrong_kind_is_refused_naming_its_key(tmp_path, override, message):
    result = subprocess.run([sys.executable, "-m", "busiseg.predict", "ckpt_path=a.ckpt", f"input={tmp_path}",
                             f"output={tmp_path / 'out'}", override],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"busiseg.predict: error: {message}"


def test_values_of_the_right_kind_and_words_numeric_keys_take_pass(tmp_path):
    """true/false, numbers for numbers (an int for a float too), null, group choices and the keys that take a
    word where their default is a number: the check passes them to the task (here: which refuses train=false
    test=false)."""
    result = subprocess.run([sys.executable, "-m", "busiseg.train", f"data.root={tmp_path}", "test=false",
                             "optimizer.lr=1", "trainer.precision=bf16-mixed", "trainer.devices=auto",
                             "data.num_workers=auto", "model.encoder_weights=null", "trainer=cpu",
                             f"ckpt_path={tmp_path / 'missing.ckpt'}", "train=false", f"hydra.run.dir={tmp_path / 'r'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "takes" not in result.stderr and "train=false test=false: nothing to do" in result.stderr, result.stderr


def test_predict_refuses_a_missing_input_before_making_the_output_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "busiseg.predict", "ckpt_path=a.ckpt",
                             f"input={tmp_path / 'nowhere'}", f"output={tmp_path / 'out'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"busiseg.predict: error: input {tmp_path / 'nowhere'}: no such file or folder"
    assert not (tmp_path / "out").exists()


def test_a_run_dir_that_cannot_be_made_is_named_before_hydra_tries():
    from busiseg.cli import run_dir_problem

    assert run_dir_problem(["hydra.run.dir=/proc/busiseg_run"]).startswith(
        "hydra.run.dir=/proc/busiseg_run: /proc is not writable")
    # with -m the sweep dir is the one made; the run dir's value is then not used
    assert run_dir_problem(["-m", "hydra.sweep.dir=/proc/busiseg_sweep", "seed=1,2"]).startswith(
        "hydra.sweep.dir=/proc/busiseg_sweep: /proc is not writable")
    assert run_dir_problem(["-m", "hydra.run.dir=/proc/x"]) is None
    assert run_dir_problem(["hydra.run.dir=logs/${now:%H}"]) is None  # only Hydra resolves it
    assert run_dir_problem(["seed=3"]) is None


def test_train_names_a_run_dir_in_a_file_in_one_line_with_status_2(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    result = subprocess.run([sys.executable, "-m", "busiseg.train", f"hydra.run.dir={tmp_path / 'notes.txt' / 'run'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"busiseg: error: hydra.run.dir={tmp_path / 'notes.txt' / 'run'}: "
                                     f"{tmp_path / 'notes.txt'} is a file, so the output folder cannot be made")


def test_a_config_group_set_to_null_gets_the_override_that_works():
    from busiseg.cli import null_group_override
    from tests.conftest import REPO

    conf = str(REPO / "conf")
    assert null_group_override(["logger=null"], conf) == (
        "logger=null: logger is a config group; to leave it out write ~logger (quoted in zsh: '~logger')")
    assert null_group_override(["refine_stage=null"], conf) == (
        "refine_stage=null: refine_stage is a config group; to turn it off write refine_stage=none")
    for fine in (["ckpt_path=null"], ["model.encoder_weights=null"], ["~logger"], ["logger=csv"]):
        assert null_group_override(fine, conf) is None, fine
