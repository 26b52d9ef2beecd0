"""``fxfeat.extract`` on remote data and outputs, against real servers the tests start: tar shards, a brace pattern
and a list file served over HTTP by the standard library's server (with byte ranges), ``pipe:`` shards (with a
resume after an interrupted run), outputs on fsspec's ``memory://`` and on an S3 server (moto's, a real server
process on a free port) read back by ``load_features``, and the errors of unreachable URLs and missing packages."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import fxfeat
from benchmarks.range_server import serve
from fxfeat.extraction.sources import open_source
from tests.test_extract import FAST, _tar_shards, make_folder, small_model

RUN = dict(FAST, shard_size=3, dtype=torch.float32)  # float32: no timed choice of the compute dtype


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """10 JPEGs in two class folders, the same as tar shards of 4 (a brace pattern) and as a list file."""
    root = tmp_path_factory.mktemp("remote")
    images = make_folder(root / "images", count=10)
    paths = sorted(images.rglob("*.jpg"))
    pattern = _tar_shards(root / "shards", paths, per_shard=4)
    (root / "list.txt").write_text("".join(f"{path.relative_to(root)}\n" for path in paths))
    return root, Path(pattern).name


def _rows(out, **options):
    arrays, metadata = fxfeat.load_features(out, **options)
    return np.asarray(arrays["pooled"]), metadata


def test_tar_shards_and_a_list_over_http_equal_the_same_files_on_disk(dataset, tmp_path):
    root, pattern = dataset
    model = small_model()
    fxfeat.extract(model, str(root / "shards" / pattern), tmp_path / "disk", **RUN)
    fxfeat.extract(model, str(root / "list.txt"), tmp_path / "disk-list", **RUN)
    with serve(root) as server:
        source = open_source(f"{server.url}/shards/{pattern}")
        listing = len(server.log)
        assert source.keys == open_source(str(root / "shards" / pattern)).keys
        assert listing <= 3 * 3  # three shards: their size, and the headers in blocks, not a request per member
        summary = fxfeat.extract(model, f"{server.url}/shards/{pattern}", tmp_path / "http",
                                 **{**RUN, "num_workers": 2})  # workers forked after the listing read the images
        assert summary.images == 10
        ranges = [entry for entry in server.log[listing:] if entry[2] is not None and "shards" in entry[1]]
        listed = fxfeat.extract(model, f"{server.url}/list.txt", tmp_path / "http-list", **RUN)
    assert listed.images == 10
    # the images read by range: one request each, besides the shards' listing in a few large blocks
    assert 10 <= len(ranges) <= 10 + 3 * 3
    disk, disk_metadata = _rows(tmp_path / "disk")
    http, http_metadata = _rows(tmp_path / "http")
    assert np.array_equal(disk, http) and list(disk_metadata["path"]) == list(http_metadata["path"])
    assert list(http_metadata["label"]) == [index % 5 for index in range(10)]
    by_list, list_metadata = _rows(tmp_path / "http-list")
    assert np.array_equal(_rows(tmp_path / "disk-list")[0], by_list)
    assert list_metadata["path"].iloc[0].startswith("http://127.0.0.1:") and list_metadata["path"].iloc[0].endswith(
        "images/a/001.jpg")


def test_a_list_of_urls_and_an_http_folder(dataset, tmp_path):
    root, _ = dataset
    with serve(root) as server:
        urls = tmp_path / "urls.csv"
        paths = sorted((root / "images").rglob("*.jpg"))
        urls.write_text("path,label\n" + "".join(f"{server.url}/{path.relative_to(root)},{i % 2}\n"
                                                 for i, path in enumerate(paths)))
        source = open_source(str(urls))
        assert source.keys[0] == f"{server.url}/images/a/001.jpg" and source.labels[:3] == [0, 1, 0]
        assert bytes(source.load(0)[0].numpy()) == paths[0].read_bytes()
        folder = open_source(f"{server.url}/images/")  # the server's folder listing, as fsspec reads it
        assert folder.kind == "folder" and len(folder) == 10 and folder.classes == ("a", "b")


class _StopAt:
    """A preprocessing that is interrupted (a Ctrl-C) at its ``stop``-th image, to cut a run short."""

    def __init__(self, stop: int | None = None):
        self.stop, self.seen = stop, 0
        self.steps = torchvision.transforms.Compose([torchvision.transforms.Resize((64, 64)),
                                                     torchvision.transforms.ToTensor()])

    def __call__(self, image):
        self.seen += 1
        if self.seen == self.stop:
            raise KeyboardInterrupt
        return self.steps(image)

    def __repr__(self) -> str:  # the configuration a rerun must match
        return "Resize((64, 64)), ToTensor()"


def _recorded(out: Path) -> int:
    """The parts an interrupted run recorded: those before the interrupted one (the 8th image is in part 2), the
    last perhaps not yet committed by the writer thread when the run stopped."""
    records = sorted(path.name for path in (out / ".fxfeat" / "parts").glob("*.json"))
    assert records in (["part-00000.json"], ["part-00000.json", "part-00001.json"])
    return len(records)


def test_pipe_shards_read_forward_and_resumed(dataset, tmp_path):
    root, pattern = dataset
    model = small_model()
    log = tmp_path / "commands.log"
    shards = f"pipe:echo run >> {log}; cat {root / 'shards' / pattern}"
    with pytest.raises(KeyboardInterrupt):
        fxfeat.extract(model, shards, tmp_path / "pipe", transform=_StopAt(8), **RUN)
    done = _recorded(tmp_path / "pipe")
    runs = log.read_text().count("run")
    summary = fxfeat.extract(model, shards, tmp_path / "pipe", transform=_StopAt(), **RUN)
    assert (summary.parts_kept, summary.parts_written, summary.images) == (done, 4 - done, 10 - 3 * done)
    # listed again (3 shards), then each shard holding rows still to do read forward from its start
    read = {row // 4 for row in range(3 * done, 10)}
    assert log.read_text().count("run") - runs == 3 + len(read)
    fxfeat.extract(model, str(root / "shards" / pattern), tmp_path / "whole", transform=_StopAt(), **RUN)
    resumed, metadata = _rows(tmp_path / "pipe", verify=True)
    assert np.array_equal(resumed, _rows(tmp_path / "whole")[0]) and list(metadata["id"]) == list(range(10))
    assert not list((tmp_path / "pipe" / ".fxfeat" / "tmp").glob("*"))


def test_an_output_on_fsspecs_memory_filesystem(dataset, tmp_path):
    root, _ = dataset
    import fsspec

    model = small_model()
    fxfeat.extract(model, root / "images", tmp_path / "disk", **RUN)
    try:
        summary = fxfeat.extract(model, root / "images", "memory://fxfeat-test/out", **RUN)
        assert summary.complete and summary.images == 10
        again = fxfeat.extract(model, root / "images", "memory://fxfeat-test/out", **RUN)
        assert (again.parts_kept, again.parts_written) == (4, 0)
        rows, metadata = _rows("memory://fxfeat-test/out", verify=True)
        assert isinstance(rows, np.ndarray) and np.array_equal(rows, _rows(tmp_path / "disk")[0])
        assert list(metadata["id"]) == list(range(10))
    finally:
        fsspec.filesystem("memory").rm("/fxfeat-test", recursive=True)


@pytest.fixture(scope="module")
def s3():
    """A bucket on moto's S3 server, run as a server process of its own on a free port, and the storage options
    that reach it."""
    import boto3

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # until the server answers
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket="fxfeat")
        yield {"s3": {"endpoint_url": endpoint, "key": "test", "secret": "test"}}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_output_on_an_s3_server_resumed_and_read_back(dataset, tmp_path, s3):
    root, pattern = dataset
    import s3fs

    model = small_model()
    out = "s3://fxfeat/features"
    with pytest.raises(KeyboardInterrupt):
        fxfeat.extract(model, root / "images", out, transform=_StopAt(8), storage_options=s3, **RUN)
    bucket = s3fs.S3FileSystem(**s3["s3"])
    local = tmp_path / "listing"
    bucket.get("fxfeat/features/.fxfeat/parts/", str(local / ".fxfeat" / "parts") + "/", recursive=True)
    done = _recorded(local)
    with pytest.raises(fxfeat.OutputDirectoryError, match="incomplete"):
        fxfeat.load_features(out, storage_options=s3)
    summary = fxfeat.extract(model, root / "images", out, transform=_StopAt(), storage_options=s3, **RUN)
    assert (summary.parts_kept, summary.parts_written, summary.images) == (done, 4 - done, 10 - 3 * done)
    assert not bucket.find("fxfeat/features/.fxfeat/tmp")  # every run's temporary files are gone
    fxfeat.extract(model, root / "images", tmp_path / "whole", transform=_StopAt(), **RUN)
    rows, metadata = _rows(out, verify=True, storage_options=s3)
    assert np.array_equal(rows, _rows(tmp_path / "whole")[0]) and list(metadata["id"]) == list(range(10))
    # a part whose file changed on the server is redone, the others kept
    bucket.pipe_file("fxfeat/features/pooled/part-00001.npy", b"damaged")
    redone = fxfeat.extract(model, root / "images", out, transform=_StopAt(), storage_options=s3, **RUN)
    assert (redone.parts_kept, redone.parts_written) == (3, 1)
    assert np.array_equal(_rows(out, verify=True, storage_options=s3)[0], rows)


def test_unreachable_urls_and_missing_protocol_packages(tmp_path):
    with serve(tmp_path) as server:
        url = server.url
    with pytest.raises(fxfeat.DataSourceError, match="could not read the data") as error:
        open_source(f"{url}/train-{{000..002}}.tar")  # the server is gone: nothing answers on its port
    assert "Hint: check the URL" in str(error.value)
    with pytest.raises(fxfeat.DataSourceError, match="does not exist"):
        with serve(tmp_path) as server:
            open_source(f"{server.url}/missing/")
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # the protocol fsspec knows, whose package is not installed here
        pass
    else:
        pytest.skip("gcsfs is installed: no missing protocol package to test with")
    with pytest.raises(fxfeat.MissingDependencyError, match="pip install gcsfs"):
        open_source("gs://bucket/train-{000..009}.tar")
    with pytest.raises(fxfeat.MissingDependencyError, match="pip install gcsfs"):
        fxfeat.load_features("gs://bucket/features")


def test_import_fxfeat_does_not_import_fsspec():
    code = "import fxfeat, sys; assert 'fsspec' not in sys.modules and 'aiohttp' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
