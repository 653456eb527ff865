"""Fetch CUB-200-2011 from Caltech, check it, and put it in place atomically.

The archive is streamed (with a progress bar) into a temporary file beside its destination, its MD5 is checked, it
is extracted into a temporary folder, and only a complete ``CUB_200_2011`` folder is renamed into place: an
interrupted, unreachable or corrupt download leaves neither a half dataset nor temporary files behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from cubcam.train.data.cub import FOLDER

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
TIMEOUT_S = 30.0  # per socket operation: an unreachable host fails in seconds, not minutes
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The archive could not be fetched, or it is not the expected one."""


def download_cub(root: str | Path, url: str = CUB_URL, md5: str = CUB_MD5) -> Path:
    """``<root>/CUB_200_2011``, downloaded, MD5-checked and extracted first if it is not there yet."""
    root = Path(root).expanduser()
    target = root / FOLDER
    if (target / "images.txt").is_file():
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but holds no images.txt: remove it (an incomplete copy?) and retry")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.download-", dir=root))
    try:
        archive = workdir / "CUB_200_2011.tgz"
        digest = _fetch(url, archive)
        if digest != md5.lower():
            raise DownloadError(
                f"{url} sent a file with MD5 {digest}, expected {md5}: a corrupt or different "
                f"archive. Nothing was written to {root}; retry, or download it by hand"
            )
        extracted = workdir / "extracted"
        _extract(archive, extracted)
        archive.unlink()  # free 1.1 GB before the rename
        if not (extracted / FOLDER / "images.txt").is_file():
            raise DownloadError(f"the archive from {url} holds no {FOLDER}/images.txt")
        try:
            os.replace(extracted / FOLDER, target)  # atomic on one file system
        except OSError:
            if not (target / "images.txt").is_file():  # not "another process was faster"
                raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if created and not any(root.iterdir()):
            root.rmdir()
    return target


def _fetch(url: str, path: Path) -> str:
    """Stream ``url`` to ``path`` behind a progress bar; returns the MD5 hex digest of what was written."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(path, "wb") as file:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"downloading {FOLDER}.tgz",
                file=sys.stderr,
                dynamic_ncols=True,
            ) as bar:
                while chunk := response.read(CHUNK):
                    file.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and bar.n != total:
                raise DownloadError(f"{url}: connection closed after {bar.n} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = (
            f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", err)
        )
        raise DownloadError(
            f"could not download CUB-200-2011 from {url} ({reason}). Without network access, download "
            f"CUB_200_2011.tgz elsewhere, extract it and point data.root (or $CUB_ROOT for demo.sh) at the folder "
            f"holding {FOLDER}/, or pass another url"
        ) from err
    return digest.hexdigest()


def _extract(archive: Path, out: Path) -> None:
    """Extract refusing absolute paths, ``..``, links out of the folder and device files (``filter="data"``)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(out, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise DownloadError(f"cannot extract {archive.name}: {err}") from err
