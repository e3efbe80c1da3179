"""The Debian package driver: ``apt-get download`` a package's .deb and ``dpkg-deb -x`` its files (never
``apt-get install``: nothing is installed and no maintainer script runs), then read files from the unpacked tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megatron_qsparse.data.corpus.documents import CorpusError, Log

_REGISTRY_HINT = "this needs a Debian/Ubuntu machine with access to the Debian package registry"


def _tool_failure(command: list[str], error: Exception | subprocess.CompletedProcess) -> str:
    if isinstance(error, subprocess.CompletedProcess):
        detail = (error.stderr or error.stdout).strip() or f"exit status {error.returncode}"
    else:
        detail = str(error)
    return f"{' '.join(command)} failed: {detail}"


def _run(command: list[str], cwd: Path | None = None, hint: str = _REGISTRY_HINT) -> subprocess.CompletedProcess:
    """Runs a tool; a missing tool or a hang (10 minutes) is a CorpusError, an exit status is the caller's."""
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CorpusError(f"{_tool_failure(command, error)}; {hint}") from error


def _apt_get_download(package: str, dest: Path) -> tuple[Path | None, subprocess.CompletedProcess]:
    result = _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    return (debs[-1] if result.returncode == 0 and debs else None), result


def download_debian_package(package: str, dest: Path, log: Log = print) -> Path:
    """Downloads ``package``'s .deb into ``dest`` with ``apt-get download``; on a failure as root (a fresh
    machine has no package lists) runs ``apt-get update`` once and retries."""
    deb, result = _apt_get_download(package, dest)
    is_root = os.geteuid() == 0
    if deb is None and is_root:
        log(f"apt-get download {package} failed; refreshing the package lists with apt-get update")
        updated = _run(["apt-get", "update"])
        if updated.returncode != 0:
            raise CorpusError(f"{_tool_failure(['apt-get', 'update'], updated)}; {_REGISTRY_HINT}")
        deb, result = _apt_get_download(package, dest)
    if deb is None:
        advice = "" if is_root else " (on a fresh machine run `apt-get update` first)"
        raise CorpusError(f"{_tool_failure(['apt-get', 'download', package], result)}; {_REGISTRY_HINT}{advice}")
    return deb


def package_size(package: str) -> int | None:
    """The download size in bytes of the version ``apt-get download`` fetches (``apt-cache show``'s ``Size``), or
    None when the package lists do not say (no lists yet, no apt-cache): progress then counts packages."""
    try:
        result = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sizes = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if line.startswith("Size:")]
    return int(sizes[0]) if result.returncode == 0 and sizes and sizes[0].isdigit() else None


def unpack_deb(deb: Path, dest: Path) -> Path:
    """Extracts a .deb's files (``dpkg-deb -x``, no maintainer scripts, nothing installed) into ``dest``."""
    command = ["dpkg-deb", "-x", str(deb), str(dest)]
    result = _run(command, hint="dpkg-deb comes with every Debian/Ubuntu system")
    if result.returncode != 0:
        raise CorpusError(_tool_failure(command, result))
    return dest


def package_version(deb: Path) -> str:
    """The Debian version in a .deb's file name (``name_version_arch.deb``), or "unknown"."""
    return deb.name.split("_")[1] if deb.name.count("_") >= 2 else "unknown"


def read_package_file(path: Path) -> bytes:
    """The bytes of a file the unpacked package must hold; a missing one is a ValueError (a parsing failure)."""
    if not path.is_file():
        raise ValueError(f"expected file {path} is missing (package layout changed?)")
    return path.read_bytes()
