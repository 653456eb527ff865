"""A user's mistakes in ``cubcam fit`` are one line naming the problem and the fix, before any training where they
can be seen then: a missing data root, a mistyped config, a folder the run cannot write, an image that is no image."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runs import REPO, fit_args

from cubcam.train.cli import main
from cubcam.train.data.cub import CUBDataset


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """An empty folder no one may write to: a read-only tmpfs where this process may mount one (root, which
    permissions do not stop), else a folder without write permission."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = (
        shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        folder.chmod(0o555)
        try:
            (folder / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip("this process writes through folder permissions and cannot mount a read-only file system")
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=False)
        else:
            folder.chmod(0o755)


def test_a_missing_data_root_is_its_message_without_a_traceback(offline: Path, capsys) -> None:
    nowhere = offline / "nowhere"
    args = ["fit", "--config", str(REPO / "configs" / "demo" / "classifier.yaml"), "--data.root", str(nowhere)]
    with pytest.raises(SystemExit) as exited:
        main([*args, "--trainer.logger", "false", "--trainer.default_root_dir", str(offline)])
    message = str(exited.value.code)
    assert message.startswith(f"error: no CUB-200-2011 dataset at {nowhere}: expected") and "download: true" in message
    assert "Traceback" not in capsys.readouterr().err


def test_a_mistyped_config_is_one_line_with_the_nearest_names(offline: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--config", "demo/clasifier.yaml", "--print_config"])
    assert exited.value.code == (
        "error: --config demo/clasifier.yaml: no such file here or among cubcam's packaged configs; did you mean "
        "demo/classifier.yaml or classifier.yaml?"
    )
    assert capsys.readouterr().err == ""  # not jsonargparse's 60 lines of usage


def test_a_folder_the_run_cannot_write_is_one_line_before_training(
    tiny_cub: Path, offline: Path, read_only: Path, capsys
) -> None:
    """W&B's folder read-only was a 60-line traceback from inside ``wandb.init``; a read-only run folder without a
    logger failed at the first checkpoint, after a whole epoch."""
    for where, option in (
        (["--trainer.logger.init_args.save_dir", str(read_only)], "--trainer.logger.init_args.save_dir"),
        (
            ["--trainer.logger", "false", "--trainer.default_root_dir", str(read_only / "runs")],
            "--trainer.default_root_dir",
        ),
    ):
        args = fit_args(["demo/classifier.yaml"], tiny_cub, offline, "never", wandb=False)
        with pytest.raises(SystemExit) as exited:
            main([*args[: args.index("--trainer.logger")], *where])
        message = str(exited.value.code)
        assert message.startswith(f"error: cannot write to {read_only}") and "(Read-only file system" in message
        assert message.endswith(f"make it writable, or pass {option} <a writable folder>"), message
        assert "Traceback" not in capsys.readouterr().err
        assert not (offline / "never").exists()  # no training began


def test_an_image_that_is_no_image_is_one_line_naming_skip_bad_images(tiny_cub: Path, offline: Path) -> None:
    """An HTML page saved as a .jpg fails when the dataset is built, before any training; a truncated JPEG, which
    only decoding finds, fails when it is read (here in a DataLoader worker, whose traceback is not shown); both
    name the file and ``--data.skip_bad_images true``, which trains without them."""
    root = shutil.copytree(tiny_cub, offline / "cub")
    page, cut = (CUBDataset(root, "train").image_path(i) for i in (2, 5))
    page.write_text("<!DOCTYPE html><html><body>Access denied</body></html>")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    args = fit_args(["demo/classifier.yaml"], root, offline, "first", "--trainer.max_epochs", "1", wandb=False)
    with pytest.raises(SystemExit) as exited:
        main(args)
    message = str(exited.value.code)
    assert message.startswith(
        f"error: 1 image file(s) of the train split are missing, empty or not images, e.g. {page} "
    )
    assert message.endswith(
        "restore them, or --data.skip_bad_images true (skip_bad_images=True) leaves out the images that do not read"
    )
    assert not (offline / "first").exists()

    page.unlink()
    shutil.copy(cut, page)  # now two truncated JPEGs: their headers read, their pixels do not
    with pytest.raises(SystemExit) as exited:
        main([*args, "--data.num_workers", "1"])
    message = str(exited.value.code)
    assert message.startswith("error: cannot read image ") and "\n" not in message, message
    assert message.endswith(
        "; --data.skip_bad_images true (skip_bad_images=True) leaves out the images that do not read"
    )

    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\)"):
        main([*args, "--data.skip_bad_images", "true"])
