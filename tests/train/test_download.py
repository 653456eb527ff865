"""download_cub against a local HTTP server on 127.0.0.1 serving a small synthetic CUB_200_2011.tgz: success, and
every failure (wrong MD5, unreachable host, HTTP error, cut connection, unsafe archive) leaving nothing behind."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

import cubcam.train.data.datamodule as datamodule
from cubcam.train.data.cub import CUBDataset
from cubcam.train.data.download import DownloadError, download_cub


class Handler(SimpleHTTPRequestHandler):
    """Serves the folder; ``/cut/<file>`` promises the whole file but sends only half of it."""

    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Handler.requests.append(self.path)
        if self.path.startswith("/cut/"):
            body = (Path(self.directory) / self.path[len("/cut/") :]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def server(synthetic_cub: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(base URL, {file name: MD5}): ``/CUB_200_2011.tgz``, the synthetic set packed like Caltech's archive (plus
    a stray top-level file, as the real one has attributes.txt), and ``/evil.tgz``, which tries to escape its
    folder."""
    served = tmp_path_factory.mktemp("served")
    with tarfile.open(served / "CUB_200_2011.tgz", "w:gz") as tar:
        tar.add(synthetic_cub / "CUB_200_2011", arcname="CUB_200_2011")
        info = tarfile.TarInfo("attributes.txt")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"1 has\n"))
    with tarfile.open(served / "evil.tgz", "w:gz") as tar:
        tar.add(synthetic_cub / "CUB_200_2011" / "images.txt", arcname="CUB_200_2011/images.txt")
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield (
            f"http://127.0.0.1:{httpd.server_address[1]}",
            {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()},
        )
    finally:
        httpd.shutdown()
        httpd.server_close()


def contents(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_download_checks_extracts_and_is_not_repeated(
    server: tuple[str, dict[str, str]], synthetic_cub: Path, tmp_path: Path
) -> None:
    base, md5s = server
    md5 = md5s["CUB_200_2011.tgz"]
    root = tmp_path / "data" / "cub"  # parents are created
    Handler.requests.clear()
    folder = download_cub(root, url=f"{base}/CUB_200_2011.tgz", md5=md5)
    assert folder == root / "CUB_200_2011"
    assert [p.split("/")[0] for p in contents(root)] == ["CUB_200_2011"] * len(contents(root))  # no temp junk
    assert contents(folder) == contents(synthetic_cub / "CUB_200_2011")
    assert CUBDataset(root, "test").image_ids == CUBDataset(synthetic_cub, "test").image_ids
    assert download_cub(root, url=f"{base}/CUB_200_2011.tgz", md5=md5) == folder
    assert Handler.requests == ["/CUB_200_2011.tgz"]  # present: not fetched again


def test_datamodule_downloads_before_it_reads_the_classes(
    server: tuple[str, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, md5s = server
    monkeypatch.setattr(datamodule, "CUB_MD5", md5s["CUB_200_2011.tgz"])
    data = datamodule.CUBDataModule(root=str(tmp_path), download=True, url=f"{base}/CUB_200_2011.tgz")
    assert data.num_classes == 4  # what the CLI asks first, before prepare_data
    assert (tmp_path / "CUB_200_2011" / "images.txt").is_file()


@pytest.mark.parametrize(
    ("path", "md5", "message"),
    [
        ("/CUB_200_2011.tgz", "0" * 32, "MD5 [0-9a-f]{32}, expected 0{32}"),
        ("/missing.tgz", None, "could not download CUB-200-2011 from .*/missing.tgz \\(HTTP 404"),
        ("/cut/CUB_200_2011.tgz", None, "connection closed after"),
        ("/evil.tgz", None, "cannot extract"),  # a member named ../escaped.txt
    ],
    ids=["md5-mismatch", "http-404", "cut-connection", "unsafe-archive"],
)
def test_failed_download_leaves_nothing(
    server: tuple[str, dict[str, str]], tmp_path: Path, path: str, md5: str | None, message: str
) -> None:
    base, md5s = server
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match=message):
        download_cub(root, url=base + path, md5=md5 or md5s.get(Path(path).name, ""))
    assert not root.exists()  # created for the download, removed with it
    assert contents(tmp_path) == []


def test_unreachable_url_names_it_and_keeps_an_existing_root(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/CUB_200_2011.tgz"
    (tmp_path / "other.txt").write_text("kept")
    with pytest.raises(DownloadError, match=rf"from {url} .*CUB_ROOT"):
        download_cub(tmp_path, url=url)
    assert contents(tmp_path) == ["other.txt"]
