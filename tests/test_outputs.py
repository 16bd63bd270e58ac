"""Output paths are checked before any work, with one sentence naming the flag."""
import pytest

from resnet_deploy import cli, outputs


def test_output_directory_is_created_or_refused_by_name(tmp_path):
    assert outputs.output_directory(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="--out .*file cannot be used as the output directory \\(File exists\\)"):
        outputs.output_directory(tmp_path / "file")
    with pytest.raises(OSError, match="--out .*file/sub cannot be used as the output directory \\(Not a directory\\)"):
        outputs.output_directory(tmp_path / "file" / "sub")


def test_a_future_output_directory_is_checked_without_creating_it(tmp_path):
    outputs.check_output_directory(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out .*file is a file; expected a directory"):
        outputs.check_output_directory(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="--out .*file/run cannot be created: .*file is a file"):
        outputs.check_output_directory(tmp_path / "file" / "run")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="--out .*dangling is a link to nothing"):
        outputs.check_output_directory(tmp_path / "dangling")


def test_output_file_must_be_a_file_in_an_existing_folder(tmp_path):
    outputs.check_output_file(tmp_path / "p.csv")
    with pytest.raises(IsADirectoryError, match="--output .* is a directory; expected a file name"):
        outputs.check_output_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="the folder of --output .*missing/p.csv does not exist"):
        outputs.check_output_file(tmp_path / "missing" / "p.csv")


def test_commands_refuse_a_file_as_their_output_directory_before_any_work(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert cli.main(["train", "--out", str(tmp_path / "taken"), "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert f"resnet-deploy train: error: --out {tmp_path / 'taken'} is a file; expected a directory" in error
    assert (tmp_path / "taken").read_text() == "x"
