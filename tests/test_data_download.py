"""``effsr data download`` / ``prepare`` against archives served by a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from effsr.data.cache import ArrayCache
from effsr.data.cli import data_main
from effsr.data.download import Archive, download_dataset, download_file, extract_archive
from effsr.data.io import read_image, write_image
from effsr.errors import DataError

pytestmark = pytest.mark.integration


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support; ``server.truncate_first`` cuts the first response."""

    def log_message(self, *args: object) -> None:
        return

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        server.requests.append((name, self.headers.get("Range")))
        body = server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if server.truncate_first:
            server.truncate_first = False
            payload = payload[: len(payload) // 3]
        self.wfile.write(payload)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture()
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    """A local HTTP server in a thread; tests put archives into ``server.files``."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.truncate_first = {}, [], False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _png_bytes(tmp_path: Path, image: np.ndarray) -> bytes:
    write_image(tmp_path / "tmp.png", image)
    return (tmp_path / "tmp.png").read_bytes()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_download_resumes_truncated_transfer(server, tmp_path: Path) -> None:
    body = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    server.files["blob.zip"] = body
    server.truncate_first = True
    archive = Archive(f"{server.base_url}/blob.zip", len(body), hashlib.sha256(body).hexdigest(), ".")
    path = download_file(archive, tmp_path / "dl", retry_delay=0.0)
    assert path.read_bytes() == body and not (tmp_path / "dl" / "blob.zip.part").exists()
    assert server.requests[0] == ("blob.zip", None)
    assert server.requests[1][1] == f"bytes={len(body) // 3}-"
    (tmp_path / "dl2").mkdir()
    (tmp_path / "dl2" / "blob.zip.part").write_bytes(body[:1000])
    assert download_file(archive, tmp_path / "dl2").read_bytes() == body
    assert server.requests[-1] == ("blob.zip", "bytes=1000-")


def test_wrong_checksum_is_refused_and_not_kept(server, tmp_path: Path) -> None:
    server.files["blob.zip"] = b"abc" * 1000
    archive = Archive(f"{server.base_url}/blob.zip", 3000, "0" * 64, ".")
    with pytest.raises(DataError, match="SHA-256.*does not match"):
        download_file(archive, tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="expected 2999"):
        download_file(Archive(f"{server.base_url}/blob.zip", 2999, None, "."), tmp_path)
    assert not (tmp_path / "blob.zip").exists()
    with pytest.raises(DataError, match="404"):
        download_file(Archive(f"{server.base_url}/missing.zip", None, None, "."), tmp_path)


@pytest.mark.parametrize("make", [_zip, _tar])
def test_archive_member_outside_root_is_refused(make, tmp_path: Path) -> None:
    path = tmp_path / "evil.archive"
    path.write_bytes(make({"ok/fine.txt": b"fine", "../escaped.txt": b"bad"}))
    with pytest.raises(DataError, match="outside"):
        extract_archive(path, tmp_path / "root")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "root" / "ok").exists()
    absolute = tmp_path / "absolute.archive"
    absolute.write_bytes(make({"/tmp/effsr_absolute_member.txt": b"bad"}))
    with pytest.raises(DataError, match="outside"):
        extract_archive(absolute, tmp_path / "root")


def test_download_div2k_layout_then_prepare_cache(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hr = skimage.data.astronaut()[:96, :120]
    lr = hr[::2, ::2].copy()
    train_zip = _zip({"DIV2K_train_HR/0001.png": _png_bytes(tmp_path, hr)})
    valid_zip = _zip({"DIV2K_valid_HR/0801.png": _png_bytes(tmp_path, hr[:64, :64])})
    lr_zip = _zip({"DIV2K_train_LR_bicubic/X2/0001x2.png": _png_bytes(tmp_path, lr)})
    lr_valid_zip = _zip({"DIV2K_valid_LR_bicubic/X2/0801x2.png": _png_bytes(tmp_path, lr[:32, :32])})
    server.files.update({"DIV2K_train_HR.zip": train_zip, "DIV2K_valid_HR.zip": valid_zip,
                         "DIV2K_train_LR_bicubic_X2.zip": lr_zip, "DIV2K_valid_LR_bicubic_X2.zip": lr_valid_zip})
    checksums = {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in server.files.items()}
    monkeypatch.setattr("effsr.data.download._DIV2K_CHECKSUMS", checksums)
    root = tmp_path / "datasets"
    assert data_main(["download", "div2k", "--root", str(root), "--scales", "2", "--mirror", server.base_url]) == 0
    assert np.array_equal(read_image(root / "DIV2K" / "DIV2K_train_HR" / "0001.png"), hr)
    assert (root / "DIV2K" / "DIV2K_train_LR_bicubic" / "X2" / "0001x2.png").is_file()
    requests = len(server.requests)
    download_dataset("div2k", root, scales=(2,), mirror=server.base_url)
    assert len(server.requests) == requests
    config = tmp_path / "exp.yaml"
    config.write_text(f"trainer: {{max_steps: 1}}\ndata:\n  scale: 2\n  train: div2k\n  data_root: {root}\n"
                      "  val_sets: [div2k_valid]\n  lr_patch_size: 16\n  num_workers: 0\n")
    cache_dir = tmp_path / "cache"
    assert data_main(["prepare", "--config", str(config), "--data.cache_dir", str(cache_dir)]) == 0
    entries = sorted(ArrayCache(cache_dir, 2).folder.glob("*.lr.npy"))
    assert len(entries) == 2
    assert any(np.array_equal(np.load(path), lr) for path in entries)
