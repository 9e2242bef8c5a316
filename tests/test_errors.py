"""The README's promise for failures: one line on stderr naming the problem and the fix, exit 2, no traceback.

Bugs (any other exception) must stay visible as tracebacks; Ctrl-C exits 130. Both front doors, the
`pipeline` CLI and the DVC stages, share one translation (``error_message``).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner, Result
from synthetic import tree_bytes

from pipeline.cli import main
from pipeline.common.errors import MalformedGlueFileError, ModelLoadError, error_message
from pipeline.extraction.backbones import load_backbone
from pipeline.extraction.glue import load_split
from pipeline.store import verify_store
from stages import run_stage

REPO = Path(__file__).resolve().parents[1]
BAD_LINE = 18  # the line of RTE/dev.tsv whose first byte the tests corrupt


def assert_one_line(result: Result, *needles: str) -> None:
    """Exit 2 and exactly one line, ``Error: ...`` with every needle in it, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def extract_args(model: str | Path, glue_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", str(model), "--task", "rte", "--glue-dir", str(glue_dir), "--splits", "validation",
            "--limit", "8", "--max-length", "32", "--out", str(out), "--quiet", *extra]


@pytest.fixture
def bad_utf8_glue(tmp_path: Path, glue_dir: Path) -> Path:
    """A copy of RTE/dev.tsv with one byte of line BAD_LINE replaced by 0xff (never valid UTF-8)."""
    target = tmp_path / "glue" / "RTE" / "dev.tsv"
    target.parent.mkdir(parents=True)
    lines = (glue_dir / "RTE" / "dev.tsv").read_bytes().splitlines(keepends=True)
    lines[BAD_LINE - 1] = b"\xff" + lines[BAD_LINE - 1][1:]
    target.write_bytes(b"".join(lines))
    return tmp_path / "glue"


def test_invalid_utf8_names_file_and_line(bad_utf8_glue: Path):
    with pytest.raises(MalformedGlueFileError, match=rf"dev\.tsv, line {BAD_LINE}: not valid UTF-8 \(byte 0xff"):
        load_split("rte", "validation", bad_utf8_glue)


def test_invalid_utf8_is_one_line_from_the_cli(bad_utf8_glue: Path, minilm: Path, tmp_path: Path):
    out = tmp_path / "x.zarr"
    result = CliRunner().invoke(main, extract_args(minilm, bad_utf8_glue, out))
    assert_one_line(result, str(bad_utf8_glue / "RTE" / "dev.tsv"), f"line {BAD_LINE}", "UTF-8")
    assert not out.exists()


def fail_chunk_writes(monkeypatch: pytest.MonkeyPatch, error: OSError) -> None:
    """Make zarr's local store raise ``error`` when it writes a hidden-state chunk, as a full disk would."""
    from zarr.storage import LocalStore

    original = LocalStore.set

    async def set_or_fail(self, key: str, value) -> None:
        if "/hidden/c/" in key:
            raise error
        await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_or_fail)


def test_disk_full_during_extraction_is_one_line_and_resumable(monkeypatch, minilm, glue_dir, tmp_path):
    out = tmp_path / "rte.zarr"
    args = extract_args(minilm, glue_dir, out)
    # write() on a full disk raises with no file name: the message names --out instead.
    fail_chunk_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    result = CliRunner().invoke(main, args)
    assert_one_line(result, f"no space left on device writing {out}", "free space or choose another --out",
                    "rerun the same command to resume")
    monkeypatch.undo()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert verify_store(str(out)) == []


def test_permission_denied_names_the_path(monkeypatch, minilm, glue_dir, tmp_path):
    out = tmp_path / "rte.zarr"
    denied = out / "validation" / "encoder" / "hidden" / "c" / "0"
    fail_chunk_writes(monkeypatch, PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(denied)))
    result = CliRunner().invoke(main, extract_args(minilm, glue_dir, out))
    assert_one_line(result, f"permission denied on {denied}", "--out")


def test_disk_full_during_training_is_one_line(monkeypatch, t5_store, tmp_path):
    out = tmp_path / "run"

    def open_or_fail(file: Path, *args, **kwargs):  # every run output is opened by pipeline.common.files
        if out in Path(file).parents:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return open(file, *args, **kwargs)

    monkeypatch.setattr("pipeline.common.files.open", open_or_fail, raising=False)
    result = CliRunner().invoke(main, ["train", "--cache", t5_store, "--out", str(out), "--epochs", "1",
                                       "--rnn-dim", "8", "--seeds", "0", "--device", "cpu", "--quiet"])
    # Training keeps nothing of a stopped run (it has no checkpoints), so the message promises no resume.
    assert_one_line(result, f"no space left on device writing {out}", "then rerun the same command")
    assert "resume" not in result.output


def test_overwrite_on_a_plain_file_is_one_line_and_keeps_it(minilm, glue_dir, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("not a store\n")
    result = CliRunner().invoke(main, extract_args(minilm, glue_dir, out, "--overwrite"))
    assert_one_line(result, str(out))
    assert out.read_text() == "not a store\n"


def test_bugs_keep_their_traceback_and_ctrl_c_exits_130(monkeypatch, tmp_path):
    import pipeline.extraction

    args = ["extract", "--model", "m", "--task", "rte", "--out", str(tmp_path / "x.zarr")]

    def bug(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline.extraction, "extract", bug)
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, RuntimeError) and result.exit_code == 1

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.extraction, "extract", interrupt)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert result.output == "Interrupted; rerun the same command to resume.\n"

    def interrupt_a_bar(*_args, **_kwargs):  # a progress bar open when Ctrl-C comes
        from pipeline.common.progress import progress_bar

        bar = progress_bar(total=10, desc="blocks", unit="block", enabled=True)
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.extraction, "extract", interrupt_a_bar)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130 and "blocks:  30%" in result.output
    assert result.output.endswith("\nInterrupted; rerun the same command to resume.\n")  # a line of its own, last


def test_stages_use_the_same_translation(capsys, tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "data" / "rte.zarr"))

    def body() -> None:
        raise full

    assert run_stage(body, stopped="resumes") == 2
    err = capsys.readouterr().err
    assert err == f"Error: {error_message(full, rerun='`dvc repro`')}\n"
    assert f"no space left on device writing {tmp_path / 'data' / 'rte.zarr'}" in err
    assert "rerun `dvc repro` to resume" in err

    def bug() -> None:
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        run_stage(bug, stopped="resumes")

    def interrupt() -> None:
        raise KeyboardInterrupt

    assert run_stage(interrupt, stopped="resumes") == 130
    assert capsys.readouterr().err == "Interrupted; rerun `dvc repro` to resume.\n"
    # DVC removes a stage's outputs before it runs it: a stopped train or report stage does not keep them.
    assert run_stage(interrupt, stopped="stage checkpoints") == 130
    said = capsys.readouterr().err
    assert "DVC removed this stage's outputs" in said and "untouched" not in said
    assert "rerun of `dvc repro` goes on from the run's last checkpoint" in said
    assert run_stage(interrupt, stopped="stage restarts") == 130
    assert capsys.readouterr().err == ("Interrupted; DVC removed this stage's outputs when it started it; rerun "
                                       "`dvc repro` to write them again.\n")


@pytest.mark.parametrize("command, target, needles", [
    ("extract", "pipeline.extraction.extract", ["Interrupted; rerun the same command to resume."]),
    ("train", "pipeline.training.train", ["outputs are written when it ends", "an earlier run's stay until then",
                                          "metrics.json last: a folder without it is unfinished",
                                          "rerun the same command to go on from its last checkpoint"]),
    ("predict", "pipeline.inference.run_predict", ["nothing of this run was written", "to start it again"]),
    ("sweep", "pipeline.training.sweep.run_sweep", ["grid points that had finished", "sweep.json",
                                                    "finished points are kept", "stopped ones go on from their checkpoints"]),
])
def test_ctrl_c_says_what_a_rerun_does_for_each_command(monkeypatch, tmp_path, command, target, needles):
    """An extraction resumes, training (in a sweep too) goes on from its checkpoint, predict starts again."""
    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupt)
    monkeypatch.setattr("pipeline.store.CacheStore", lambda _path: SimpleNamespace(
        meta=SimpleNamespace(task=SimpleNamespace(name="rte"))))  # the sweep's default --out reads the task
    args = {"extract": ["--model", "m", "--task", "rte", "--out", str(tmp_path / "x.zarr")],
            "train": ["--cache", "c", "--device", "cpu"],
            "predict": ["--adapter", "a", "--split", "validation", "--device", "cpu"],
            "sweep": ["--cache", "c", "--grid", "lr=1e-3"]}[command]
    result = CliRunner().invoke(main, [command, *args])
    assert result.exit_code == 130 and result.output.count("\n") == 1, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_error_message_keeps_our_own_os_error_text_and_collapses_lines():
    assert error_message(FileNotFoundError("no store at x;\n run `pipeline extract` first"), rerun="it") == (
        "no store at x; run `pipeline extract` first"
    )
    assert error_message(OSError(errno.EIO, "Input/output error", "/data/x"), rerun="it") == (
        "Input/output error: /data/x"
    )


@pytest.mark.parametrize("code, line", [
    (errno.EEXIST, "x/out already exists; remove it or choose another --out"),
    (errno.ENOTEMPTY, "the folder x/out is not empty; remove what it holds or choose another --out"),
    (errno.ENOENT, "x/out does not exist; check the path"),
    (errno.ENAMETOOLONG, "the name x/out is too long for the file system; choose a shorter path"),
    (errno.EMFILE, "too many open files; raise the limit (`ulimit -n`) and rerun"),
    (errno.EFBIG, "x/out reached the file-size limit; raise it (`ulimit -f`) or choose another --out; rerun it to "
                  "resume"),
])
def test_common_os_errors_name_their_fix(code, line):
    assert error_message(OSError(code, os.strerror(code), "x/out"), rerun="it") == line


# ---- models: say what is really wrong, and fast ----------------------------------------------------


def test_missing_local_model_folder_says_it_does_not_exist(monkeypatch, glue_dir, tmp_path):
    monkeypatch.chdir(tmp_path)
    for model in ("./no/such/dir", str(tmp_path / "absent" / "model")):
        result = CliRunner().invoke(main, extract_args(model, glue_dir, tmp_path / "x.zarr"))
        assert_one_line(result, f"cannot load model {model!r}: the folder {Path(model).absolute()} does not exist")
        assert "unreachable" not in result.output and "HF_HUB_OFFLINE" not in result.output
        assert "predict" not in result.output  # predict's own hint (the adapter's model) is predict's to add


def test_model_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="is a file; pass the folder"):
        load_backbone(str(tmp_path / "config.json"), device="cpu")


def test_hub_model_with_offline_flag_names_the_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"HF_HUB_OFFLINE=1 is set \(offline mode\), so the Hub was not asked"):
        load_backbone("nosuchorg/nosuchmodel", device="cpu")


def test_hub_model_without_offline_flag_and_no_network_fails_fast_and_says_so(glue_dir, tmp_path):
    """A closed port stands in for a network without the Hub, so the test means the same everywhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:1", PYTHONPATH=str(REPO))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "extract", "--model", "nosuchorg/nosuchmodel", "--task", "rte",
         "--glue-dir", str(glue_dir), "--splits", "validation", "--limit", "8", "--out", str(tmp_path / "x.zarr")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 15, "the Hub was retried instead of checked once"
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "the Hugging Face Hub could not be reached (127.0.0.1 unreachable" in proc.stderr
    assert "offline mode is not set" in proc.stderr


def test_model_missing_from_a_reachable_hub_says_not_found(monkeypatch):
    import huggingface_hub.constants
    import transformers
    from huggingface_hub.errors import RepositoryNotFoundError

    from pipeline.extraction import backbones

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbones, "hub_unreachable", lambda: None)
    asked: list[bool] = []

    def from_pretrained(path: str, *, local_files_only: bool = False, **_kwargs):
        asked.append(local_files_only)
        try:
            raise RepositoryNotFoundError("404 Client Error", response=SimpleNamespace(headers={}, request=None))
        except RepositoryNotFoundError as exc:
            raise OSError(f"{path} is not a local folder and is not a valid model identifier") from exc

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError, match="no such model on the Hugging Face Hub"):
        load_backbone("nosuchorg/nosuchmodel", device="cpu")
    assert asked == [False]  # the Hub was asked


# ---- devices: one picker for every command ----------------------------------------------------------


def test_device_refusals_are_one_line_and_name_the_device_asked_for(monkeypatch, synthetic_store, tmp_path):
    import torch

    from pipeline.common.errors import ConfigError
    from pipeline.common.resources import pick_device

    cache = synthetic_store(splits={"train": 20, "validation": 8}).path
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for args in (["train", "--cache", cache, "--out", str(tmp_path / "run")],
                 ["predict", "--adapter", str(tmp_path), "--split", "validation"]):
        assert_one_line(CliRunner().invoke(main, [*args, "--device", "mps"]), "--device mps", "MPS", "--device cpu")
        assert_one_line(CliRunner().invoke(main, [*args, "--device", "tpu"]), "device 'tpu' must be auto, cpu, cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda:3 was asked for but no CUDA GPU is visible"):
        pick_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"--device cuda:3: there is no CUDA device 3 \(1 visible: cuda:0\)"):
        pick_device("cuda:3")
    assert pick_device("cuda:0") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pick_device("cuda") == pick_device("auto") == torch.device("cuda:0")  # one device, one checkpoint identity


# ---- outputs: a bad --out is refused before the work ------------------------------------------------------


def test_an_unwritable_out_is_refused_before_any_work_naming_the_path_in_the_way(monkeypatch, synthetic_store,
                                                                                  tmp_path):
    from pipeline.common.files import check_writable_folder
    from pipeline.training.trainer import Trainer

    cache = synthetic_store(family="encoder", splits={"train": 20, "validation": 8}).path
    monkeypatch.setattr(Trainer, "train_epoch", lambda *_a, **_k: pytest.fail("trained before checking --out"))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    train = ["train", "--cache", cache, "--epochs", "1", "--rnn-dim", "4", "--device", "cpu", "--quiet"]
    for out in (afile / "run", afile):
        assert_one_line(CliRunner().invoke(main, [*train, "--out", str(out)]),
                        f"{afile} is a file where a folder was expected", "choose another --out")
    if Path("/proc/self").is_dir():  # Linux: a folder that takes no new folders
        assert_one_line(CliRunner().invoke(main, [*train, "--out", "/proc/nope"]),
                        "cannot create the folder /proc/nope", "choose another --out")
    predict = ["predict", "--adapter", str(tmp_path / "none"), "--split", "validation", "--device", "cpu"]
    assert_one_line(CliRunner().invoke(main, [*predict, "--out", str(afile / "p.tsv")]),
                    f"{afile} is a file where a folder was expected")  # before the adapters are even read
    assert afile.read_text() == "mine" and not (tmp_path / "none").exists()
    check_writable_folder(tmp_path / "new" / "run")  # the check itself leaves nothing behind
    assert not (tmp_path / "new").exists()
    assert_one_line(CliRunner().invoke(main, ["report", "--runs", str(tmp_path / "none"), "--out", str(afile)]),
                    f"{afile} is a file where a folder was expected", "choose another --out")  # before the runs


def test_a_cache_that_is_not_a_store_says_what_to_pass(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    train = ["train", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet", "--cache"]
    result = CliRunner().invoke(main, [*train, str(afile)])
    assert_one_line(result, f"{afile} is a file, not a store (a folder written by `pipeline extract`); "
                    "pass the store's folder")
    result = CliRunner().invoke(main, [*train, str(tmp_path / "other")])
    assert_one_line(result, f"{tmp_path / 'other'} is a folder but not a store", "pass the store's folder")
    for args in ([*train, ""], [*train, " "]):
        assert_one_line(CliRunner().invoke(main, args), "--cache is required (it was given empty)")
    assert_one_line(CliRunner().invoke(main, ["info", ""]), "no store given (an empty path)")
    assert afile.read_text() == "mine" and not (tmp_path / "run").exists()
    damaged = tmp_path / "damaged.zarr"  # its root metadata unreadable: extract would refuse to touch it
    damaged.mkdir()
    (damaged / "zarr.json").write_text("{not json")
    assert_one_line(CliRunner().invoke(main, [*train, str(damaged)]),
                    f"{damaged} is not a readable Zarr group", "remove it and rerun `pipeline extract`")


def test_a_training_split_too_small_to_set_a_selection_split_apart_names_the_fix(synthetic_store, tmp_path):
    cache = synthetic_store(splits={"train": 1, "validation": 8}).path
    train = ["train", "--cache", cache, "--out", str(tmp_path / "run"), "--epochs", "1", "--rnn-dim", "4",
             "--device", "cpu", "--quiet"]
    for select in ("selection", "validation"):  # the selection split is held out either way
        assert_one_line(CliRunner().invoke(main, [*train, "--select-on", select]),
                        "the training split has 1 example(s); at least 2 are needed",
                        "extract more examples (a larger --limit, or none)")


def test_a_run_is_never_written_into_a_store(monkeypatch, synthetic_store):
    """A store is deleted whole by `extract --overwrite` (and dvc repro): a run written in it would go too."""
    from pipeline.training.trainer import Trainer

    cache = Path(synthetic_store(family="encoder", splits={"train": 20, "validation": 8}).path)
    before = tree_bytes(cache)
    monkeypatch.setattr(Trainer, "train_epoch", lambda *_a, **_k: pytest.fail("trained into a store"))
    train = ["train", "--cache", str(cache), "--epochs", "1", "--rnn-dim", "4", "--device", "cpu", "--quiet"]
    for out in (cache, cache / "runs" / "rte"):
        assert_one_line(CliRunner().invoke(main, [*train, "--out", str(out)]),
                        f"--out {out} is inside the store {cache}", "choose a folder outside any store")
    assert tree_bytes(cache) == before


def test_the_split_trained_on_is_never_the_reported_one(synthetic_store, tmp_path):
    """Scoring the training split after the reported one is a diagnostic (tests/test_outputs.py does)."""
    cache = synthetic_store(family="encoder", splits={"train": 20, "validation": 8}).path
    train = ["train", "--cache", cache, "--epochs", "1", "--rnn-dim", "4", "--device", "cpu", "--quiet"]
    for split in (["--train-split", "validation"], ["--eval-splits", "train,validation"]):
        assert_one_line(CliRunner().invoke(main, [*train, *split, "--out", str(tmp_path / "run")]),
                        "is both trained on (--train-split) and reported (the first of --eval-splits)",
                        "report another split")
    assert not (tmp_path / "run").exists()


def test_a_split_the_store_lacks_gets_the_hint_that_fits(synthetic_store, tmp_path):
    """A stopped extraction (train done, validation not begun) is finished by rerunning it; a typo is a typo."""
    half = synthetic_store("half.zarr", splits={"train": 20}).path
    train = ["train", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, [*train, "--cache", half])
    assert_one_line(result, "has no split 'validation' (it has train)",
                    "if its extraction was stopped, rerun that `pipeline extract` command to finish it",
                    "--splits validation")
    whole = synthetic_store("whole.zarr", splits={"train": 20, "validation": 8}).path
    for option in ("--eval-splits", "--train-split"):
        result = CliRunner().invoke(main, [*train, "--cache", whole, option, "nosuch"])
        assert_one_line(result, "task rte has no split 'nosuch'; expected one of: train, validation, test")
        assert "pipeline extract" not in result.output
