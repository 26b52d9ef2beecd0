"""``fxfeat.extract``'s data sources and decoding on real files: folders whose class folders are symbolic links (and
a link cycle), list files, tar shards grouped by webdataset's rule, brace patterns, the file-access seam, TorchCodec
against torchvision.io, and the bad inputs that used to escape (an empty file, a CSV without paths, a checkpoint
that is not one)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fxfeat
from fxfeat.extraction.decode import decode
from fxfeat.extraction.files import filesystem
from fxfeat.extraction.sources import expand_braces, open_source
from tests.test_extract import FAST, make_folder, small_model

ROOT = Path(__file__).resolve().parent.parent


def _encoded(path_or_bytes) -> torch.Tensor:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _linked_dataset(tmp_path: Path) -> Path:
    """``data/`` whose class folders ``a`` and ``b`` are links to folders on two "disks", with a real folder ``c``
    holding an empty file."""
    make_folder(tmp_path / "disk1", count=6)  # a/ and b/
    (tmp_path / "disk2").mkdir()
    (tmp_path / "disk1" / "b").rename(tmp_path / "disk2" / "b")
    data = tmp_path / "data"
    (data / "c").mkdir(parents=True)
    os.symlink(tmp_path / "disk1" / "a", data / "a")
    os.symlink(tmp_path / "disk2" / "b", data / "b")
    (data / "c" / "empty.jpg").write_bytes(b"")
    return data


def test_class_folders_behind_symbolic_links_are_listed_as_image_folder_lists_them(tmp_path):
    data = _linked_dataset(tmp_path)
    source = open_source(data)
    reference = torchvision.datasets.ImageFolder(str(data), allow_empty=True)
    assert source.kind == "folder" and len(source) == 7
    assert list(zip(source.keys, source.labels)) == reference.samples
    assert source.classes == tuple(reference.classes) == ("a", "b", "c")
    summary = fxfeat.extract(small_model(), data, tmp_path / "out", **FAST)
    assert summary.images == 6 and [path for _, path, _ in summary.skipped] == [str(data / "c" / "empty.jpg")]
    assert summary.skipped[0][2].endswith("empty file")  # not numpy's "buffer length (0)" any more


def test_a_link_cycle_is_an_error_not_an_endless_walk(tmp_path):
    data = make_folder(tmp_path / "data", count=3)
    os.symlink(data, data / "a" / "again")  # a/again -> data: data/a/again/a/again/...
    with pytest.raises(fxfeat.DataSourceError, match="cycle of symbolic links: .*again leads to") as error:
        open_source(data)
    assert "Hint:" in str(error.value)
    os.symlink(tmp_path / "nowhere", data / "b" / "broken.jpg")  # a broken link is no file and no folder
    (data / "a" / "again").unlink()
    assert len(open_source(data)) == 3


def test_a_csv_list_without_a_path_column_names_the_columns_it_has(tmp_path):
    paths = sorted(make_folder(tmp_path / "images", count=3).rglob("*.jpg"))
    (tmp_path / "bad.csv").write_text("image_path,category\n" + "".join(f"{path},x\n" for path in paths))
    with pytest.raises(fxfeat.DataSourceError, match="no column of image paths: its header names 'image_path', "
                                                     "'category'"):
        open_source(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(fxfeat.DataSourceError, match="the file is empty"):
        open_source(tmp_path / "empty.csv")
    # a header written by a spreadsheet (byte order mark, capitals, spaces) and Hugging Face's file_name
    rows = "".join(f"{path},{i}\n" for i, path in enumerate(paths))
    (tmp_path / "good.csv").write_text("\ufeff Path ,Label\n" + rows)
    (tmp_path / "hf.tsv").write_text("file_name\tlabel\n" + "".join(f"{path}\tcat\n" for path in paths))
    good, hf = open_source(tmp_path / "good.csv"), open_source(tmp_path / "hf.tsv")
    assert good.keys == hf.keys == [str(path) for path in paths] and good.labels == [0, 1, 2]
    assert hf.labels == [0, 0, 0] and hf.classes == ("cat",)


def _shards(folder: Path, samples: list[list[tuple[str, bytes]]]) -> list[Path]:
    """One tar file per list of ``(member name, content)``."""
    folder.mkdir()
    for number, members in enumerate(samples):
        with tarfile.open(folder / f"shard-{number:02d}.tar", "w") as archive:
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return sorted(folder.glob("*.tar"))


def test_tar_shards_are_grouped_by_webdatasets_rule_with_random_access(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    jpegs = [path.read_bytes() for path in sorted(make_folder(tmp_path / "images", count=5).rglob("*.jpg"))]
    shards = _shards(tmp_path / "shards", [
        [("s0.jpg", jpegs[0]), ("s0.cls", b"3"), ("s0.json", b"{}"),
         ("dir/s1.JPG", jpegs[1]), ("dir/s1.cls", b"1\n"),  # a folder in the key, an extension in capitals
         ("s2.seg.png", b"mask"), ("s2.jpeg", jpegs[2]),  # the first image extension of the sample
         ("notes.txt", b"no image")],
        [("s3.jpg", jpegs[3]), ("s4.webp", jpegs[4]), ("s4.cls", b"cat")],  # a label that is no number: none
    ])
    source = open_source(str(tmp_path / "shards" / "shard-{00..01}.tar"))
    assert source.keys == ["shard-00.tar/s0", "shard-00.tar/dir/s1", "shard-00.tar/s2", "shard-01.tar/s3",
                           "shard-01.tar/s4"]
    assert source.labels == [3, 1, None, None, None]
    # webdataset's own reader, streaming the shards, groups them into the same samples
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = [sample for sample in webdataset.WebDataset([str(shard) for shard in shards], shardshuffle=False)
                    if any(key in sample for key in ("jpg", "jpeg", "webp"))]
    assert [sample["__key__"] for sample in streamed] == [key.split("/", 1)[1] for key in source.keys]
    for index in (4, 0, 2):  # any order: a resumed run reads only its parts
        image, label = source.load(index)
        assert bytes(image.numpy()) == jpegs[index] and label == source.labels[index]
    assert source.describe()["kind"] == "tar" and source.describe()["count"] == 5


def test_tar_shards_webdataset_cannot_group_and_files_that_are_no_tar(tmp_path):
    _shards(tmp_path / "twice", [[("s0.jpg", b"x"), ("s0.jpg", b"y")]])
    with pytest.raises(fxfeat.DataSourceError, match="not laid out as WebDataset's samples"):
        open_source(str(tmp_path / "twice" / "shard-00.tar"))
    (tmp_path / "fake.tar").write_bytes(b"not a tar archive" * 100)
    with pytest.raises(fxfeat.DataSourceError, match="not a readable tar archive"):
        open_source(str(tmp_path / "fake.tar"))
    with pytest.raises(fxfeat.DataSourceError, match="2 of the 3 tar shards"):
        open_source(str(tmp_path / "{fake,gone,lost}.tar"))


def test_brace_patterns():
    assert expand_braces("train-{000..002}.tar") == ["train-000.tar", "train-001.tar", "train-002.tar"]
    assert expand_braces("/data/{train,val}/part-{8..10}.tar") == [
        "/data/train/part-8.tar", "/data/train/part-9.tar", "/data/train/part-10.tar",
        "/data/val/part-8.tar", "/data/val/part-9.tar", "/data/val/part-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for malformed in ("train-{000..099.tar", "train-000..099}.tar"):
        with pytest.raises(fxfeat.DataSourceError, match="unbalanced braces") as error:
            open_source(malformed)
        assert "train-{000..099}.tar" in str(error.value)  # the hint shows a pattern that works


def test_sources_on_an_fsspec_filesystem(tmp_path):
    """A folder, a list and a shard on fsspec's in-memory filesystem: the same listing and bytes as on disk."""
    import fsspec

    memory = fsspec.filesystem("memory")
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as archive:
        for name, content in (("k.jpg", b"tar image"), ("k.cls", b"7")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    for path, content in {"/fxfeat-test/data/cats/1.jpg": b"first", "/fxfeat-test/data/dogs/2.png": b"second",
                          "/fxfeat-test/list.txt": b"data/dogs/2.png\n", "/fxfeat-test/shard.tar": shard.read_bytes()
                          }.items():
        memory.pipe_file(path, content)
    try:
        folder, listed, tar = (open_source(f"memory://fxfeat-test/{name}") for name in ("data", "list.txt",
                                                                                        "shard.tar"))
        assert (folder.kind, folder.classes, folder.labels) == ("folder", ("cats", "dogs"), [0, 1])
        assert folder.keys == ["memory://fxfeat-test/data/cats/1.jpg", "memory://fxfeat-test/data/dogs/2.png"]
        assert bytes(folder.load(1)[0].numpy()) == b"second"
        assert listed.keys == ["memory://fxfeat-test/data/dogs/2.png"] and bytes(listed.load(0)[0].numpy()) == b"second"
        assert (tar.keys, tar.labels, bytes(tar.load(0)[0].numpy())) == (["shard.tar/k"], [7], b"tar image")
        with pytest.raises(fxfeat.DataSourceError, match="does not exist"):
            open_source("memory://fxfeat-test/missing")
    finally:
        memory.rm("/fxfeat-test", recursive=True)
    assert isinstance(filesystem(str(tmp_path)), fsspec.implementations.local.LocalFileSystem)


def _torchvision_decode(encoded: torch.Tensor, mode: str) -> torch.Tensor:
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image
        return decode_image(encoded, mode=getattr(ImageReadMode, mode))


def _variants(picture: Image.Image) -> dict[str, bytes]:
    """The JPEG encodings the test images come in, and PNG modes."""
    variants = {}
    for name, image, options in (("baseline", picture, {"quality": 92}),
                                 ("progressive", picture, {"progressive": True}),
                                 ("4:4:4", picture, {"subsampling": 0, "quality": 98}),
                                 ("gray", picture.convert("L"), {}), ("cmyk", picture.convert("CMYK"), {}),
                                 ("png-rgb", picture, {}), ("png-gray", picture.convert("L"), {}),
                                 ("png-rgba", picture.convert("RGBA"), {}), ("png-palette", picture.convert("P"), {})):
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if name.startswith("png") else "JPEG", **options)
        variants[name] = buffer.getvalue()
    return variants


def test_torchcodec_decodes_the_test_images_bit_identical_to_torchvision_io(tmp_path):
    jpegs = sorted(make_folder(tmp_path / "images", count=10).rglob("*.jpg"))
    pictures = [Image.open(path).convert("RGB") for path in jpegs[:3]] + [Image.new("RGB", (1, 600), (9, 99, 199))]
    files = [path.read_bytes() for path in jpegs] + [data for picture in pictures
                                                     for data in _variants(picture).values()]
    for data in files:
        encoded = _encoded(data)
        for channels, mode in ((3, "RGB"), (1, "GRAY")):
            ours = decode(encoded, channels=channels)
            assert ours.dtype == torch.uint8 and torch.equal(ours, _torchvision_decode(encoded, mode))
    # what TorchCodec does not decode goes to PIL, as before: BMP, TIFF; an animation gives its first frame
    picture = pictures[0]
    for kind in ("BMP", "TIFF"):
        buffer = io.BytesIO()
        picture.save(buffer, kind)
        assert np.array_equal(decode(_encoded(buffer.getvalue())).permute(1, 2, 0).numpy(), np.asarray(picture))
    buffer = io.BytesIO()
    picture.save(buffer, "GIF", save_all=True, append_images=[picture.transpose(Image.FLIP_LEFT_RIGHT)])
    first = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    assert np.array_equal(decode(_encoded(buffer.getvalue())).permute(1, 2, 0).numpy(), np.asarray(first))
    with pytest.raises(ValueError, match="^empty file$"):
        decode(torch.empty(0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a readable image"):
        decode(_encoded(b"\xff\xd8\xff\xe0 truncated"))


def test_a_weights_file_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label\na.jpg,1\n")
    (tmp_path / "garbage.pth").write_bytes(bytes(range(7, 256)) * 3)
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = {"labels.csv": r"holds text, not a checkpoint \(it begins 'path,label'\)",
             "garbage.pth": "holds bytes that are not a checkpoint .it begins 07 08 09",
             "empty.pt": "holds nothing: it is empty"}
    for name, message in cases.items():
        with pytest.raises(fxfeat.WeightsUnavailableError, match=message):
            fxfeat.models.build_model("torchvision:resnet18", weights=str(tmp_path / name))
    result = subprocess.run(
        [sys.executable, "-m", "fxfeat", "extract", "torchvision:resnet18", str(tmp_path), "--out",
         str(tmp_path / "out"), "--weights", str(tmp_path / "garbage.pth"), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot read the checkpoint" in result.stderr and "Hint: --weights takes a state dict" in result.stderr
