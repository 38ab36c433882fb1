"""The folder dataset: layout, classes.txt, split files and seeded splits, palette / grey / RGB masks, items."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from fcnseg.data.folder import FolderDataset, MaskColorError, read_classes_file, seeded_split
from fcnseg.errors import FcnsegError
from fcnseg.palette import palette_for

RED, GREEN, BLUE = (200, 0, 0), (0, 200, 0), (0, 0, 200)
VOID = (224, 224, 192)


# ------------------------------------------------------------------------------------------- writers


def write_classes(root: Path, text: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(text)


def write_image(root: Path, stem: str, w: int, h: int, ext: str = "png") -> Path:
    path = root / "images" / f"{stem}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(stem)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_palette_mask(root: Path, stem: str, values: np.ndarray) -> Path:
    """A "P" PNG whose pixel values are the indices (its palette colours are deliberately not the classes')."""
    path = root / "masks" / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.asarray(values, dtype=np.uint8)
    img = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
    img.putpalette([(7 * i) % 256 for i in range(768)])
    img.save(path)
    with Image.open(path) as back:
        assert back.mode == "P"
    return path


def write_grey_mask(root: Path, stem: str, values: np.ndarray) -> Path:
    path = root / "masks" / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint8)).save(path)
    with Image.open(path) as back:
        assert back.mode == "L"
    return path


def write_rgb_mask(root: Path, stem: str, colors: list[list[tuple[int, int, int]]], alpha: bool = False) -> Path:
    path = root / "masks" / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array(colors, dtype=np.uint8)
    if alpha:
        arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 128, np.uint8)], axis=2)
    Image.fromarray(arr).save(path)
    with Image.open(path) as back:
        assert back.mode == ("RGBA" if alpha else "RGB")
    return path


def simple_tree(root: Path, stems: list[str], classes: str = "background\ncat\ndog\n") -> Path:
    """One 3x2 image and grey mask per stem; mask value i % 3 everywhere for the i-th stem."""
    write_classes(root, classes)
    for i, stem in enumerate(stems):
        write_image(root, stem, 3, 2, "jpg" if i % 2 else "png")
        write_grey_mask(root, stem, np.full((2, 3), i % 3))
    return root


# ------------------------------------------------------------------------------------------- ids, splits


def test_ids_are_stems_with_image_and_mask(tmp_path):
    simple_tree(tmp_path, ["b", "a", "c"])
    write_image(tmp_path, "lonely", 3, 2)  # no mask: skipped
    write_grey_mask(tmp_path, "orphan", np.zeros((2, 3)))  # no image: skipped
    (tmp_path / "images" / ".DS_Store").write_bytes(b"junk")
    ds = FolderDataset(tmp_path, split="all")
    assert ds.ids == ["a", "b", "c"]
    assert ds.image_path(0) == tmp_path / "images" / "a.jpg"  # the second stem written: .jpg
    assert ds.image_path(1) == tmp_path / "images" / "b.png"
    assert ds.mask_path(2) == tmp_path / "masks" / "c.png"
    assert len(ds) == 3 and ds.split == "all"


def test_jpeg_suffixes_in_any_case(tmp_path):
    simple_tree(tmp_path, ["a"])
    write_image(tmp_path, "b", 3, 2, "JPEG")
    write_grey_mask(tmp_path, "b", np.zeros((2, 3)))
    assert FolderDataset(tmp_path, split="all").ids == ["a", "b"]


def test_split_files_give_the_splits_in_file_order(tmp_path):
    simple_tree(tmp_path, ["a", "b", "c", "d", "e"])
    (tmp_path / "train.txt").write_text("d\n a \n\nb\nd\nghost\n")  # spaces, blank line, duplicate, no files
    (tmp_path / "val.txt").write_text("e\nc\n")
    assert FolderDataset(tmp_path, "train").ids == ["d", "a", "b"]
    assert FolderDataset(tmp_path, "val").ids == ["e", "c"]
    assert FolderDataset(tmp_path, "all").ids == ["a", "b", "c", "d", "e"]


def test_one_split_file_without_the_other(tmp_path):
    simple_tree(tmp_path, ["a", "b"])
    (tmp_path / "train.txt").write_text("a\n")
    assert FolderDataset(tmp_path, "train").ids == ["a"]
    with pytest.raises(FcnsegError, match=r"val\.txt: split file not found; train\.txt exists"):
        FolderDataset(tmp_path, "val")


def test_seeded_split_is_deterministic_disjoint_and_complete(tmp_path):
    stems = [f"img{i:02d}" for i in range(10)]
    simple_tree(tmp_path, stems)
    train = FolderDataset(tmp_path, "train").ids
    val = FolderDataset(tmp_path, "val").ids
    assert FolderDataset(tmp_path, "train").ids == train and FolderDataset(tmp_path, "val").ids == val
    assert not set(train) & set(val)
    assert sorted(train + val) == stems
    assert len(val) == 2  # 20 % of 10
    # The documented rule, worked independently: sorted stems shuffled by Random(seed), the last 20 % to val.
    order = sorted(stems)
    random.Random(0).shuffle(order)
    assert val == sorted(order[8:]) and train == sorted(order[:8])
    other = FolderDataset(tmp_path, "val", seed=1, val_fraction=0.5).ids
    assert len(other) == 5
    order = sorted(stems)
    random.Random(1).shuffle(order)
    assert other == sorted(order[5:])


def test_seeded_split_sizes():
    assert seeded_split([], 0.2, 0) == ([], [])
    assert seeded_split(["a"], 0.2, 0) == (["a"], [])
    for n in range(2, 30):
        stems = [str(i) for i in range(n)]
        for fraction in (0.01, 0.2, 0.5, 0.99):
            train, val = seeded_split(stems, fraction, 3)
            assert 1 <= len(val) <= n - 1 and len(train) + len(val) == n


def test_empty_splits_are_errors_naming_the_split(tmp_path):
    simple_tree(tmp_path, ["a"])
    assert FolderDataset(tmp_path, "train").ids == ["a"]
    with pytest.raises(FcnsegError, match=r"split 'val' is empty; 1 of 1 images have a mask"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "train.txt").write_text("a\n")
    (tmp_path / "val.txt").write_text("ghost\n")
    with pytest.raises(FcnsegError, match=r"val\.txt: split 'val' is empty"):
        FolderDataset(tmp_path, "val")


def test_no_pairs_at_all(tmp_path):
    write_classes(tmp_path, "a\nb\n")
    write_image(tmp_path, "x", 2, 2)
    (tmp_path / "masks").mkdir()
    with pytest.raises(FcnsegError, match=r"split 'all' is empty; 0 of 1 images have a mask \(0 masks\)"):
        FolderDataset(tmp_path, "all")


# ------------------------------------------------------------------------------------------- bad arguments


def test_argument_errors(tmp_path):
    with pytest.raises(FcnsegError, match="--root"):
        FolderDataset(None)
    with pytest.raises(FcnsegError, match=r"--root .*nowhere: no such folder"):
        FolderDataset(tmp_path / "nowhere")
    with pytest.raises(FcnsegError, match=r"--split 'test'"):
        FolderDataset(tmp_path, "test")
    for bad in (0, 1.0, -0.5, "0.2", True):
        with pytest.raises(FcnsegError, match="val_fraction"):
            FolderDataset(tmp_path, val_fraction=bad)
    write_classes(tmp_path, "a\n")
    with pytest.raises(FcnsegError, match=r"images: folder not found"):
        FolderDataset(tmp_path)


def test_missing_classes_file_says_what_is_expected(tmp_path):
    write_image(tmp_path, "a", 2, 2)
    write_grey_mask(tmp_path, "a", np.zeros((2, 2)))
    with pytest.raises(FcnsegError) as info:
        FolderDataset(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'classes.txt'}: class list not found; expected one class name a line")
    assert "tab" in msg and "R,G,B" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------- classes.txt


def test_classes_with_colors(tmp_path):
    write_classes(tmp_path, "background\t0,0,0\npotted plant\t 10, 20 ,30\r\nsky\t255,255,255\n")
    names, palette = read_classes_file(tmp_path / "classes.txt")
    assert names == ("background", "potted plant", "sky")
    assert palette.dtype == np.uint8 and palette.tolist() == [[0, 0, 0], [10, 20, 30], [255, 255, 255]]


def test_classes_without_colors_use_palette_for(tmp_path):
    write_classes(tmp_path, "\ufeffroad\n\ncar\nperson\n")  # byte-order mark, blank line
    names, palette = read_classes_file(tmp_path / "classes.txt")
    assert names == ("road", "car", "person")
    assert np.array_equal(palette, palette_for(names, 3))


def test_classes_some_colors_given(tmp_path):
    write_classes(tmp_path, "road\ncar\t1,2,3\nperson\n")
    names, palette = read_classes_file(tmp_path / "classes.txt")
    generated = palette_for(names, 3)
    assert palette.tolist() == [generated[0].tolist(), [1, 2, 3], generated[2].tolist()]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("", r"classes\.txt: lists no classes; expected one class name a line"),
        ("a\nb\ta,b,c\n", r"classes\.txt:2: colour 'a,b,c' of class 'b'; expected R,G,B"),
        ("a\t1,2\n", r"classes\.txt:1: colour '1,2' of class 'a'"),
        ("a\t1,2,256\n", r"classes\.txt:1: colour '1,2,256'"),
        ("a\nb\na\n", r"classes\.txt:3: class 'a' is listed twice"),
        ("\t1,2,3\n", r"classes\.txt:1: empty class name"),
        ("a\t1,2,3\nb\t1,2,3\n", r"classes 'a' and 'b' share the colour 1,2,3"),
        ("a\t224,224,192\n", r"class 'a' has the void colour 224,224,192"),
        ("".join(f"c{i}\n" for i in range(256)), r"lists 256 classes; at most 255 fit"),
    ],
)
def test_bad_classes_files(tmp_path, text, pattern):
    write_classes(tmp_path, text)
    with pytest.raises(FcnsegError, match=pattern):
        read_classes_file(tmp_path / "classes.txt")


# ------------------------------------------------------------------------------------------- masks


def test_palette_masks_give_their_indices(tmp_path):
    write_classes(tmp_path, "a\nb\nc\n")
    values = np.array([[0, 1, 2], [255, 2, 0]])
    write_image(tmp_path, "x", 3, 2)
    write_palette_mask(tmp_path, "x", values)
    image, mask = FolderDataset(tmp_path, "all")[0]
    assert mask.tolist() == values.tolist()


def test_grey_masks_give_their_values(tmp_path):
    write_classes(tmp_path, "a\nb\nc\n")
    values = np.array([[2, 2, 255], [1, 0, 0]])
    write_image(tmp_path, "x", 3, 2)
    write_grey_mask(tmp_path, "x", values)
    _, mask = FolderDataset(tmp_path, "all")[0]
    assert mask.tolist() == values.tolist()


@pytest.mark.parametrize("alpha", [False, True])
def test_rgb_masks_map_through_the_palette(tmp_path, alpha):
    write_classes(tmp_path, f"red\t{','.join(map(str, RED))}\ngreen\t0,200,0\nblue\t0,0,200\n")
    write_image(tmp_path, "x", 4, 2)
    write_rgb_mask(tmp_path, "x", [[RED, GREEN, BLUE, VOID], [BLUE, BLUE, RED, GREEN]], alpha=alpha)
    _, mask = FolderDataset(tmp_path, "all")[0]
    assert mask.tolist() == [[0, 1, 2, 255], [2, 2, 0, 1]]


def test_rgb_masks_with_generated_colors(tmp_path):
    write_classes(tmp_path, "road\ncar\n")
    colors = [tuple(int(v) for v in row) for row in palette_for(["road", "car"], 2)]
    write_image(tmp_path, "x", 3, 1)
    write_rgb_mask(tmp_path, "x", [[colors[1], VOID, colors[0]]])
    _, mask = FolderDataset(tmp_path, "all")[0]
    assert mask.tolist() == [[1, 255, 0]]


def test_rgb_mask_with_a_foreign_color_names_file_and_color(tmp_path):
    write_classes(tmp_path, "red\t200,0,0\ngreen\t0,200,0\n")
    write_image(tmp_path, "x", 3, 1)
    path = write_rgb_mask(tmp_path, "x", [[RED, (9, 9, 9), (9, 9, 9)]])
    ds = FolderDataset(tmp_path, "all")
    with pytest.raises(MaskColorError) as info:
        ds[0]
    msg = str(info.value)
    assert msg.startswith(f"{path}: colour 9,9,9 (2 px) not in the palette of {tmp_path / 'classes.txt'}")
    assert isinstance(info.value, FcnsegError) and info.value.kind == "unknown-colour"


def test_item_types_shapes_and_values(tmp_path):
    write_classes(tmp_path, "a\nb\n")
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "x.png")
    write_grey_mask(tmp_path, "x", np.array([[0, 1, 255], [1, 1, 0]]))
    image, mask = FolderDataset(tmp_path, "all")[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 2, 3)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (2, 3)
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    assert mask.tolist() == [[0, 1, 255], [1, 1, 0]]


def test_transforms_are_applied_to_the_pair(tmp_path):
    simple_tree(tmp_path, ["a"])
    ds = FolderDataset(tmp_path, "all", transforms=lambda img, m: (img[:, :1], m[:1]))
    image, mask = ds[0]
    assert image.shape == (3, 1, 3) and mask.shape == (1, 3)


def test_size_mismatch_is_an_error_on_access(tmp_path):
    write_classes(tmp_path, "a\n")
    write_image(tmp_path, "x", 3, 2)
    write_grey_mask(tmp_path, "x", np.zeros((3, 3)))
    with pytest.raises(FcnsegError, match="mask is 3x3 but its image x.png is 3x2"):
        FolderDataset(tmp_path, "all")[0]


def test_repr_and_classes(tmp_path):
    simple_tree(tmp_path, ["a", "b"])
    ds = FolderDataset(tmp_path, "train")
    assert ds.classes == ("background", "cat", "dog") and ds.num_classes == 3
    assert repr(ds) == "FolderDataset(split='train', images=1, classes=3)"


def test_registered_as_folder(tmp_path):
    from fcnseg.data import get_dataset

    simple_tree(tmp_path, ["a", "b", "c"])
    ds = get_dataset("folder", root=tmp_path, split="all")
    assert isinstance(ds, FolderDataset) and ds.ids == ["a", "b", "c"]
