"""Data pipeline: image I/O, sources, cache, datasets, samplers and SRDataModule (real PNG files in tmp dirs)."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import skimage.data
import torch
from torch.utils.data import DataLoader

from effsr.data import SRDataModule
from effsr.data.augment import DihedralAugment, _CV2Transpose
from effsr.data.cache import ArrayCache, PairSource
from effsr.data.cli import data_main
from effsr.data.datasets import RandomPatchDataset, SubImageDataset, min_eval_hr_size
from effsr.data.io import read_image, write_image
from effsr.data.sample import SAMPLE_HELDOUT, SAMPLE_TRAIN
from effsr.data.samplers import EvalSampler, SampleKey, TrainBatchSampler, TrainSampler, sample_random
from effsr.errors import ConfigError, DataError
from effsr.metrics import ssim
from effsr.ops.imresize import bicubic_degrade


def photo(height: int, width: int, offset: int = 0) -> np.ndarray:
    """A crop of a real photograph (skimage's astronaut), RGB uint8."""
    image = skimage.data.astronaut()
    return np.ascontiguousarray(image[offset : offset + height, offset : offset + width])


def hr_folder(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Writes one PNG per (height, width) into ``folder``."""
    for number, (height, width) in enumerate(sizes):
        write_image(folder / f"img{number:02d}.png", photo(height, width, offset=10 * number))
    return folder


# ------------------------------------------------------------------------------------------------ io
@pytest.mark.unit
def test_read_image_converts_gray_rgba_16bit_and_palette(tmp_path: Path) -> None:
    rgb = photo(20, 24)
    gray = rgb[:, :, 0]
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    assert np.array_equal(read_image(tmp_path / "gray.png"), np.stack([gray] * 3, axis=2))
    bgra = np.concatenate([rgb[:, :, ::-1], np.full((20, 24, 1), 7, np.uint8)], axis=2)
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)
    sixteen = rgb.astype(np.uint16) * 257
    sixteen[0, 0] = [128, 383, 65535]
    cv2.imwrite(str(tmp_path / "deep.png"), np.ascontiguousarray(sixteen[:, :, ::-1]))
    converted = read_image(tmp_path / "deep.png")
    assert converted.dtype == np.uint8 and converted[0, 0].tolist() == [0, 1, 255]
    assert np.array_equal(converted[1:], rgb[1:])
    from PIL import Image

    Image.fromarray(rgb).quantize(colors=16).save(tmp_path / "palette.png")
    palette = read_image(tmp_path / "palette.png")
    assert palette.shape == (20, 24, 3) and palette.dtype == np.uint8
    assert np.array_equal(palette, np.asarray(Image.open(tmp_path / "palette.png").convert("RGB")))


@pytest.mark.unit
def test_read_image_rejects_truncated_corrupt_empty_and_missing(tmp_path: Path) -> None:
    write_image(tmp_path / "whole.png", photo(64, 64))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "tail.png").write_bytes(data[:-12])
    (tmp_path / "notes.png").write_bytes(b"this is not an image at all")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("cut.png", "tail.png", "notes.png", "empty.png", "missing.png"):
        with pytest.raises(DataError, match=name):
            read_image(tmp_path / name)
    with pytest.raises(DataError, match="truncated"):
        read_image(tmp_path / "cut.png")


@pytest.mark.unit
def test_write_image_is_atomic_and_round_trips(tmp_path: Path) -> None:
    image = photo(30, 40)
    write_image(tmp_path / "sub" / "out.png", image)
    assert np.array_equal(read_image(tmp_path / "sub" / "out.png"), image)
    assert [path.name for path in (tmp_path / "sub").iterdir()] == ["out.png"]


# -------------------------------------------------------------------------------------- augmentation
def _numpy_dihedral(image: np.ndarray, element: int) -> np.ndarray:
    if element & 1:
        image = image[:, ::-1]
    if element & 2:
        image = image[::-1]
    if element & 4:
        image = image.transpose(1, 0, 2)
    return image


@pytest.mark.unit
def test_dihedral_augment_is_d4_identical_on_lr_and_hr() -> None:
    lr, hr = photo(12, 16), photo(48, 64)
    reference = A.Transpose(p=1.0)(image=hr)["image"]
    assert np.array_equal(_CV2Transpose(p=1.0)(image=hr)["image"], reference)
    augment = DihedralAugment()
    outputs = set()
    for element in range(8):
        lr_out, hr_out = augment(lr, hr, element)
        assert np.array_equal(lr_out, _numpy_dihedral(lr, element))
        assert np.array_equal(hr_out, _numpy_dihedral(hr, element))
        outputs.add(hr_out.tobytes())
    assert len(outputs) == 8


@pytest.mark.unit
def test_random_patches_lie_on_the_lr_grid(tmp_path: Path) -> None:
    folder = hr_folder(tmp_path / "hr", [(100, 120), (90, 96)])
    cache = ArrayCache(tmp_path / "cache", scale=2)
    entries = cache.build_all([PairSource(p.stem, p) for p in sorted(folder.iterdir())])
    dataset = RandomPatchDataset(entries, scale=2, lr_patch_size=10, seed=5)
    for position in range(20):
        key = SampleKey(epoch=3, position=position, index=position % 2)
        sample = dataset[key]
        hr_full, lr_full = entries[key.index].load()
        top = sample_random(5, 3, position, 1) % (lr_full.shape[0] - 9)
        left = sample_random(5, 3, position, 2) % (lr_full.shape[1] - 9)
        element = sample_random(5, 3, position, 3) & 7
        expected_lr = _numpy_dihedral(lr_full[top : top + 10, left : left + 10], element)
        expected_hr = _numpy_dihedral(hr_full[2 * top : 2 * top + 20, 2 * left : 2 * left + 20], element)
        assert torch.equal(sample["lr"], torch.from_numpy(np.ascontiguousarray(expected_lr.transpose(2, 0, 1))))
        assert torch.equal(sample["hr"], torch.from_numpy(np.ascontiguousarray(expected_hr.transpose(2, 0, 1))))
        assert sample["index"].item() == key.index
    hr_whole, lr_whole = entries[0].load()
    assert np.array_equal(lr_whole, bicubic_degrade(photo(100, 120), 2)[1])


# --------------------------------------------------------------------- determinism, workers, ranks
def _batches(loader: DataLoader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


@pytest.mark.unit
def test_streams_differ_across_workers_and_ranks_and_reproduce(tmp_path: Path) -> None:
    folder = hr_folder(tmp_path / "hr", [(96, 96)] * 3)
    entries = ArrayCache(tmp_path / "cache", 2).build_all([PairSource(p.stem, p) for p in sorted(folder.iterdir())])
    dataset = RandomPatchDataset(entries, scale=2, lr_patch_size=8, seed=11)

    def loader(workers: int, rank: int = 0, replicas: int = 1, epoch: int = 0) -> DataLoader:
        sampler = TrainSampler(len(dataset), samples_per_epoch=16, seed=11, rank=rank, num_replicas=replicas)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=workers)

    single = _batches(loader(0))
    two_workers = _batches(loader(2))
    assert len(single) == 8
    for a, b in zip(single, two_workers, strict=True):
        assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["index"], b["index"])
    worker0, worker1 = two_workers[0::2], two_workers[1::2]
    assert not any(torch.equal(a["hr"], b["hr"]) for a in worker0 for b in worker1)
    rank0, rank1 = _batches(loader(0, 0, 2)), _batches(loader(0, 1, 2))
    assert len(rank0) == len(rank1) == 4
    assert not any(torch.equal(a["hr"], b["hr"]) for a in rank0 for b in rank1)
    positions0 = [key.position for key in loader(0, 0, 2).sampler]
    positions1 = [key.position for key in loader(0, 1, 2).sampler]
    assert sorted(positions0 + positions1) == list(range(16))
    again = _batches(loader(0))
    assert all(torch.equal(a["hr"], b["hr"]) for a, b in zip(single, again, strict=True))
    next_epoch = _batches(loader(0, epoch=1))
    assert not all(torch.equal(a["hr"], b["hr"]) for a, b in zip(single, next_epoch, strict=True))
    key = SampleKey(0, 5, 1)
    assert torch.equal(dataset[key]["hr"], RandomPatchDataset(entries, 2, 8, seed=11)[key]["hr"])
    assert not torch.equal(dataset[key]["hr"], RandomPatchDataset(entries, 2, 8, seed=12)[key]["hr"])


@pytest.mark.unit
def test_train_sampler_covers_pool_and_honours_subset() -> None:
    sampler = TrainSampler(dataset_size=10, samples_per_epoch=20, seed=0, rank=0, num_replicas=1)
    indices = [key.index for key in sampler]
    assert sorted(indices) == sorted(list(range(10)) * 2)
    sampler.set_subset(np.array([3, 7]))
    assert set(key.index for key in sampler) == {3, 7}
    sampler.set_subset(None)
    assert len(set(key.index for key in sampler)) == 10
    with pytest.raises(ConfigError, match="empty"):
        sampler.set_subset(np.array([], dtype=np.int64))
    with pytest.raises(ConfigError, match="lie in"):
        sampler.set_subset(np.array([10]))
    assert len(TrainSampler(10, 21, rank=1, num_replicas=2)) == 10


@pytest.mark.unit
def test_eval_sampler_two_ranks_odd_count_each_image_once() -> None:
    seen = [index for rank in range(2) for index in EvalSampler(7, rank=rank, num_replicas=2)]
    assert sorted(seen) == list(range(7))
    assert [len(EvalSampler(7, rank=rank, num_replicas=2)) for rank in range(2)] == [4, 3]


# ----------------------------------------------------------------------------------------- grid / ClassSR
@pytest.mark.unit
def test_grid_subimages_with_rescales_and_subset(tmp_path: Path) -> None:
    hr_folder(tmp_path / "hr", [(256, 320), (192, 192)])
    module = SRDataModule(
        scale=4, train=str(tmp_path / "hr"), val_sets=[], train_crop="grid", hr_subimage_size=128,
        hr_subimage_step=64, train_rescales=[1.0, 0.75], cache_dir=str(tmp_path / "cache"), batch_size=4,
        samples_per_epoch=12, num_workers=0,
    )
    module.prepare_data()
    module.setup("fit")
    dataset = module.train_dataset
    assert isinstance(dataset, SubImageDataset)
    # x1: 3x4 + 2x2 sub-images; x0.75 (192x240, 144x144): 2x3 + 2x2 (incl. the ones flush with the end)
    assert module.num_subimages == 12 + 4 + 6 + 4
    lr, hr = module.subimage(5)
    assert lr.shape == (32, 32, 3) and hr.shape == (128, 128, 3)
    name, top, left = dataset.subimage_source(5)
    hr_full, lr_full = dataset.store.arrays(int(dataset.table[5, 0]))
    assert np.array_equal(hr, hr_full[top : top + 128, left : left + 128])
    assert np.array_equal(lr, lr_full[top // 4 : top // 4 + 32, left // 4 : left // 4 + 32])
    assert name == "img00" and (top, left) == (64, 64)
    scored = list(module.subimage_dataloader(batch_size=8))
    assert torch.equal(torch.cat([batch["index"] for batch in scored]), torch.arange(26))
    assert torch.equal(scored[0]["hr"][5], torch.from_numpy(hr.transpose(2, 0, 1).copy()))
    module.set_train_subset(np.array([2, 20]))
    batches = list(module.train_dataloader())
    drawn = torch.cat([batch["index"] for batch in batches])
    assert len(drawn) == 12 and set(drawn.tolist()) == {2, 20}
    assert batches[0]["lr"].shape == (4, 3, 32, 32) and batches[0]["hr"].dtype == torch.uint8
    module.set_train_subset(None)
    assert len(set(torch.cat([b["index"] for b in module.train_dataloader()]).tolist())) > 2


# --------------------------------------------------------------------------------------------- cache
@pytest.mark.unit
def test_cache_reused_rebuilt_on_change_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hr" / "a.png"
    write_image(path, photo(40, 48))
    cache = ArrayCache(tmp_path / "cache", scale=2)
    (entry,) = cache.build_all([PairSource("a", path)])
    built_at = entry.hr_file.stat().st_mtime_ns
    (again,) = cache.build_all([PairSource("a", path)])
    assert again == entry and entry.hr_file.stat().st_mtime_ns == built_at
    write_image(path, photo(40, 48, offset=30))
    (changed,) = cache.build_all([PairSource("a", path)])
    assert changed.hr_file != entry.hr_file and not entry.hr_file.exists()
    assert np.array_equal(changed.load()[0], photo(40, 48, offset=30))
    write_image(path, photo(40, 48, offset=60))
    fresh = cache.entry(PairSource("a", path))

    def broken_save(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        cache.build(fresh)
    assert not fresh.is_built() and not fresh.lr_file.exists()
    assert not [p for p in cache.folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.unit
def test_official_lr_used_when_present_and_mismatch_names_both(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    hr = photo(96, 120)
    write_image(root / "DIV2K" / "DIV2K_train_HR" / "0001.png", hr)
    official = cv2.resize(hr, (60, 48), interpolation=cv2.INTER_AREA)
    write_image(root / "DIV2K" / "DIV2K_train_LR_bicubic" / "X2" / "0001x2.png", official)
    module = SRDataModule(scale=2, train="div2k", data_root=str(root), val_sets=[], lr_patch_size=16,
                          cache_dir=str(tmp_path / "cache"), num_workers=0, samples_per_epoch=4)
    module.setup("fit")
    assert np.array_equal(np.asarray(module.train_dataset.store.arrays(0)[1]), official)
    generated = SRDataModule(scale=2, train="div2k", data_root=str(root), val_sets=[], lr_patch_size=16,
                             cache_dir=str(tmp_path / "cache"), num_workers=0, lr_source="generated")
    generated.setup("fit")
    assert np.array_equal(np.asarray(generated.train_dataset.store.arrays(0)[1]), bicubic_degrade(hr, 2)[1])
    write_image(root / "DIV2K" / "DIV2K_train_LR_bicubic" / "X2" / "0001x2.png", official[:40])
    with pytest.raises(DataError, match=r"0001x2\.png.*0001\.png"):
        module.setup("fit")


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.unit
def test_bad_sources_raise_clear_errors(tmp_path: Path) -> None:
    def module(**overrides: object) -> SRDataModule:
        settings: dict = {"scale": 2, "val_sets": [], "cache_dir": str(tmp_path / "cache"), "num_workers": 0}
        return SRDataModule(**{**settings, **overrides})

    with pytest.raises(DataError, match="does not exist.*expected layout"):
        module(train=str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images.*expected layout"):
        module(train=str(tmp_path / "empty")).setup("fit")
    with pytest.raises(DataError, match="DIV2K_train_HR"):
        module(train="div2k", data_root=str(tmp_path)).setup("fit")
    with pytest.raises(ConfigError, match="data_root"):
        module(train="df2k").setup("fit")
    for scale in (1, 0, -2):
        with pytest.raises(ConfigError, match="scale"):
            module(scale=scale)
    (tmp_path / "DIV2K" / "DIV2K_train_HR").mkdir(parents=True)
    with pytest.raises(ConfigError, match="x2/x3/x4"):
        module(scale=8, train="div2k", data_root=str(tmp_path), lr_source="official").setup("fit")
    with pytest.raises(ConfigError, match="multiples of the scale"):
        hr_folder(tmp_path / "grid", [(64, 64)])
        module(scale=3, train=str(tmp_path / "grid"), train_crop="grid").setup("fit")


@pytest.mark.unit
def test_truncated_training_image_names_the_file(tmp_path: Path) -> None:
    folder = hr_folder(tmp_path / "hr", [(64, 64), (64, 64)])
    data = (folder / "img01.png").read_bytes()
    (folder / "img01.png").write_bytes(data[: len(data) // 3])
    module = SRDataModule(scale=2, train=str(folder), val_sets=[], cache_dir=str(tmp_path / "cache"), num_workers=0)
    with pytest.raises(DataError, match=r"img01\.png.*truncated"):
        module.prepare_data()


@pytest.mark.unit
def test_image_smaller_than_patch_raises_or_is_skipped(tmp_path: Path) -> None:
    folder = hr_folder(tmp_path / "hr", [(100, 100), (40, 120)])
    settings: dict = {"scale": 2, "train": str(folder), "val_sets": [], "cache_dir": str(tmp_path / "c"),
                      "lr_patch_size": 24, "num_workers": 0}
    with pytest.raises(DataError, match=r"img01\.png.*48x48"):
        SRDataModule(**settings).setup("fit")
    skipping = SRDataModule(**settings, skip_small_images=True)
    skipping.setup("fit")
    assert len(skipping.train_dataset) == 1


@pytest.mark.unit
def test_hr_lr_folder_pairs_mismatch_and_layout_detection(tmp_path: Path) -> None:
    hr_folder(tmp_path / "MySet" / "HR", [(48, 60)])
    lr = bicubic_degrade(photo(48, 60), 2)[1]
    write_image(tmp_path / "MySet" / "LR_bicubic" / "X2" / "img00x2.png", lr[:, :, ::-1])
    module = SRDataModule(scale=2, val_sets=[str(tmp_path / "MySet" / "HR")], cache_dir=str(tmp_path / "c"),
                          num_workers=0)
    module.setup("validate")
    assert module.eval_set_names == ["MySet"]
    (batch,) = list(module.val_dataloader()[0])
    assert torch.equal(batch["lr"][0], torch.from_numpy(np.ascontiguousarray(lr[:, :, ::-1].transpose(2, 0, 1))))
    write_image(tmp_path / "wrong" / "img00.png", lr[:10])
    mismatched = SRDataModule(scale=2, val_sets=[f"{tmp_path / 'MySet' / 'HR'}:{tmp_path / 'wrong'}"],
                              cache_dir=str(tmp_path / "c"), num_workers=0)
    with pytest.raises(DataError, match=r"mismatch.*wrong/img00\.png.*HR/img00\.png"):
        mismatched.setup("validate")


# ------------------------------------------------------------------------------------------ datamodule
@pytest.mark.integration
def test_datamodule_sample_set_end_to_end() -> None:
    """The default cache folder: the session's (conftest's ``$EFFSR_CACHE``, where the CLI tests' ``train: sample``
    runs write the sample PNGs once per session)."""
    module = SRDataModule(scale=4, train="sample", val_sets=["sample"], test_sets=["sample"], lr_patch_size=24,
                          batch_size=4, samples_per_epoch=8, num_workers=0, max_val_images=2)
    module.prepare_data()
    module.setup("fit")
    assert len(module.train_dataset) == len(SAMPLE_TRAIN)
    batches = list(module.train_dataloader())
    assert len(batches) == 2
    assert batches[0]["lr"].shape == (4, 3, 24, 24) and batches[0]["hr"].shape == (4, 3, 96, 96)
    assert batches[0]["lr"].dtype == torch.uint8 and batches[0]["index"].dtype == torch.int64
    (val_loader,) = module.val_dataloader()
    names = [batch["name"][0] for batch in val_loader]
    assert module.eval_set_names == ["sample"] and names == list(SAMPLE_HELDOUT[:2])
    module.setup("test")
    (test_loader,) = module.test_dataloader()
    assert module.eval_set_names == ["sample"]
    for batch in test_loader:
        lr, hr = batch["lr"], batch["hr"]
        assert hr.shape[2] == lr.shape[2] * 4 and hr.shape[3] == lr.shape[3] * 4 and hr.shape[2] % 4 == 0
    assert len(test_loader) == len(SAMPLE_HELDOUT)


@pytest.mark.unit
def test_predict_folder_or_file(tmp_path: Path) -> None:
    write_image(tmp_path / "lr" / "a.png", photo(17, 23))
    write_image(tmp_path / "lr" / "b.jpg", photo(9, 11))
    module = SRDataModule(scale=2, predict_path=str(tmp_path / "lr"), val_sets=[], cache_dir=str(tmp_path / "c"),
                          num_workers=0)
    module.setup("predict")
    batches = list(module.predict_dataloader())
    assert [batch["name"][0] for batch in batches] == ["a", "b"]
    assert batches[0]["lr"].shape == (1, 3, 17, 23) and batches[0]["lr"].dtype == torch.uint8
    single = SRDataModule(scale=2, predict_path=str(tmp_path / "lr" / "a.png"), val_sets=[], num_workers=0,
                          cache_dir=str(tmp_path / "c"))
    single.setup("predict")
    assert len(single.predict_dataloader()) == 1
    with pytest.raises(DataError, match="predict_path"):
        SRDataModule(scale=2, predict_path=str(tmp_path / "none"), val_sets=[], num_workers=0).setup("predict")


@pytest.mark.unit
def test_train_batch_sampler_matches_plain_batching_and_changes_size() -> None:
    sampler = TrainSampler(dataset_size=10, samples_per_epoch=11, seed=3, rank=1, num_replicas=2)  # 5 per rank
    plain = [[key for key in batch] for batch in DataLoader(list(sampler), batch_size=2, collate_fn=list)]
    batches = TrainBatchSampler(sampler, 2)
    assert len(batches) == 3 and list(batches) == plain  # [2, 2, 1]: same batches as batch_size=2
    keys = iter(batches)
    first = next(keys)
    batches.set_batch_size(4)
    rest = list(keys)
    assert [len(batch) for batch in [first, *rest]] == [2, 4, 4]  # epoch length stays 3 steps; batches full
    drawn = [key for batch in [first, *rest] for key in batch]
    assert [key.position for key in drawn] == list(range(1, 20, 2))  # rank 1: positions 1, 3, 5, ... continued
    assert drawn[:5] == list(sampler)
    assert [len(batch) for batch in TrainBatchSampler(sampler, 2, 1)] == [1, 1, 1]
    with pytest.raises(ConfigError, match="batch size"):
        batches.set_batch_size(0)


@pytest.mark.unit
def test_datamodule_set_batch_size_without_rebuilding_the_loader(tmp_path: Path) -> None:
    data = SRDataModule(scale=2, train=str(hr_folder(tmp_path / "hr", [(64, 64)] * 2)), lr_patch_size=8,
                        batch_size=2, samples_per_epoch=8, num_workers=0, cache_dir=str(tmp_path / "cache"),
                        val_sets=())
    data.set_batch_size(3)  # before the loader exists: applied when it is built
    loader = data.train_dataloader()
    assert len(loader) == 4 and [batch["lr"].shape[0] for batch in loader] == [3] * 4
    data.set_batch_size(data.batch_size)
    assert [batch["lr"].shape[0] for batch in loader] == [2] * 4
    with pytest.raises(ConfigError, match="batch size"):
        data.set_batch_size(-1)


# ------------------------------------------------------------------------------------------ eval image sizes
@pytest.mark.unit
def test_eval_image_too_small_for_the_protocol_is_a_data_error_naming_it(tmp_path: Path) -> None:
    assert [min_eval_hr_size(scale) for scale in (2, 3, 4)] == [16, 18, 20]
    for scale in (2, 3, 4):  # the minimum is tight: SSIM runs at it and fails one LR pixel below it
        side = min_eval_hr_size(scale)
        image = torch.rand(1, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(scale))
        assert torch.allclose(ssim(image, image, crop_border=scale), torch.ones(1, dtype=torch.float64))
        with pytest.raises(ConfigError, match="SSIM needs images of at least"):
            ssim(image[..., : side - scale, :], image[..., : side - scale, :], crop_border=scale)
    write_image(tmp_path / "Small" / "big.png", photo(40, 40))
    write_image(tmp_path / "Small" / "tiny.png", photo(7, 9))  # x4: mod-cropped to 8x4
    settings: dict = {"scale": 4, "cache_dir": str(tmp_path / "c"), "num_workers": 0}
    with pytest.raises(DataError, match=r"tiny\.png.*'Small'.*8x4 after mod-crop.*at least 20x20"):
        SRDataModule(**settings, val_sets=[], test_sets=[str(tmp_path / "Small")]).setup("test")
    with pytest.raises(DataError, match=r"tiny\.png"):  # also when validating, and by `effsr data prepare`
        SRDataModule(**settings, val_sets=[str(tmp_path / "Small")]).build_cache("validate")
    write_image(tmp_path / "Edge" / "edge.png", photo(23, 20))  # x4: 20x20 after mod-crop, the minimum
    edge = SRDataModule(**settings, val_sets=[], test_sets=[str(tmp_path / "Edge")])
    edge.setup("test")
    assert [tuple(batch["hr"].shape[2:]) for batch in edge.test_dataloader()[0]] == [(20, 20)]


# ------------------------------------------------------------------------------------------ benchmark layouts
def _shipped_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """An LR file as a release ships it, made to differ from effsr's own bicubic (+1 where possible)."""
    lr = bicubic_degrade(hr, scale)[1]
    return np.where(lr < 255, lr + 1, lr - 1).astype(np.uint8)


def _eval_lr(entry: str, scale: int, cache: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(set names, {image name: LR used}) of a test set entry."""
    module = SRDataModule(scale=scale, val_sets=[], test_sets=[entry], cache_dir=str(cache), num_workers=0)
    module.setup("test")
    images = {batch["name"][0]: batch["lr"][0].permute(1, 2, 0).numpy() for batch in module.test_dataloader()[0]}
    return module.eval_set_names, images


@pytest.mark.unit
def test_classsr_release_layout_uses_its_lr_whichever_folder_is_given(tmp_path: Path) -> None:
    root = tmp_path / "Test2K"
    shipped: dict[tuple[int, str], np.ndarray] = {}
    for scale, size in ((4, (48, 64)), (2, (40, 44))):
        for number, name in enumerate(("1201", "1202")):
            hr = photo(*size, offset=7 * number + scale)
            write_image(root / "HR" / f"X{scale}" / f"{name}.png", hr)
            shipped[scale, name] = _shipped_lr(hr, scale)
            write_image(root / "LR" / f"X{scale}" / f"{name}.png", shipped[scale, name])
    hr_x4 = root / "HR" / "X4"
    for entry in (root, root / "HR", hr_x4, f"{hr_x4}:{root / 'LR' / 'X4'}"):
        names, images = _eval_lr(str(entry), 4, tmp_path / "c")
        assert names == ["Test2K"] and sorted(images) == ["1201", "1202"]
        for name, lr in images.items():
            assert np.array_equal(lr, read_image(root / "LR" / "X4" / f"{name}.png"))
            assert np.array_equal(lr, shipped[4, name])
            assert not np.array_equal(lr, bicubic_degrade(read_image(hr_x4 / f"{name}.png"), 4)[1])
    names, images = _eval_lr(str(root), 2, tmp_path / "c")  # the scale picks HR/X2 and LR/X2
    assert names == ["Test2K"] and all(np.array_equal(lr, shipped[2, name]) for name, lr in images.items())
    with pytest.raises(DataError, match=r"X4.*data\.scale is 2"):
        _eval_lr(str(hr_x4), 2, tmp_path / "c")
    with pytest.raises(DataError, match=r"no X3 folder.*X2, X4"):
        _eval_lr(str(root), 3, tmp_path / "c")
    (root / "LR" / "X4" / "1202.png").unlink()
    with pytest.raises(DataError, match=r"LR/X4 has no LR image for .*HR/X4/1202\.png"):
        _eval_lr(str(root), 4, tmp_path / "c")


@pytest.mark.unit
def test_edsr_benchmark_layout_uses_lr_bicubic_of_the_scale(tmp_path: Path) -> None:
    root = tmp_path / "benchmark" / "Set5"
    hrs = {"baby": photo(36, 48), "bird": photo(48, 36, offset=20)}
    shipped: dict[tuple[int, str], np.ndarray] = {}
    for name, hr in hrs.items():
        write_image(root / "HR" / f"{name}.png", hr)
        for scale in (2, 3):
            shipped[scale, name] = _shipped_lr(hr, scale)
            stem = f"{name}x{scale}" if name == "baby" else name  # both LR naming schemes
            write_image(root / "LR_bicubic" / f"X{scale}" / f"{stem}.png", shipped[scale, name])
    for entry, scale in ((root, 2), (root / "HR", 2), (root, 3)):
        names, images = _eval_lr(str(entry), scale, tmp_path / "c")
        assert names == ["Set5"] and sorted(images) == ["baby", "bird"]
        for name, lr in images.items():
            assert np.array_equal(lr, shipped[scale, name])
            assert not np.array_equal(lr, bicubic_degrade(hrs[name], scale)[1])
    (root / "LR_bicubic" / "X2" / "babyx2.png").unlink()
    with pytest.raises(DataError, match=r"LR_bicubic/X2 has no LR image for .*HR/baby\.png.*lr_source=generated"):
        _eval_lr(str(root), 2, tmp_path / "c")


# ------------------------------------------------------------------------------------------ training lists
def _two_train_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Folders A (img00, img01) and B (img00 with other content): equal names must stay apart."""
    write_image(tmp_path / "A" / "img00.png", photo(64, 64))
    write_image(tmp_path / "A" / "img01.png", photo(64, 80, offset=30))
    write_image(tmp_path / "B" / "img00.png", photo(80, 64, offset=60))
    return tmp_path / "A", tmp_path / "B"


@pytest.mark.unit
def test_train_list_concatenates_folders_and_named_sets(tmp_path: Path) -> None:
    first, second = _two_train_folders(tmp_path)
    write_image(tmp_path / "root" / "DIV2K" / "DIV2K_train_HR" / "0001.png", photo(48, 48, offset=90))
    settings: dict = {"scale": 2, "val_sets": [], "cache_dir": str(tmp_path / "c"), "num_workers": 0,
                      "lr_patch_size": 8, "samples_per_epoch": 12, "batch_size": 4}
    mixed = SRDataModule(**settings, train=[str(first), "div2k", str(second)], data_root=str(tmp_path / "root"))
    mixed.setup("fit")
    files = [first / "img00.png", first / "img01.png", tmp_path / "root" / "DIV2K" / "DIV2K_train_HR" / "0001.png",
             second / "img00.png"]
    pairs = mixed.train_dataset.store.pairs
    assert [pair.source.hr_path for pair in pairs] == files
    assert [pair.name for pair in pairs] == ["A/img00", "A/img01", "div2k/0001", "B/img00"]
    assert len({pair.hr_file for pair in pairs}) == 4  # one cache entry per file, equal names included
    for index, path in enumerate(files):  # index i of the combined set is file i
        assert np.array_equal(mixed.train_dataset.store.arrays(index)[0], read_image(path))
    indices = torch.cat([batch["index"] for batch in mixed.train_dataloader()])
    assert sorted(indices.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # 12 draws = 3 permutations of 4


@pytest.mark.unit
def test_train_list_grid_subimage_indices_are_offsets_of_each_folder(tmp_path: Path) -> None:
    first, second = _two_train_folders(tmp_path)
    settings: dict = {"scale": 2, "val_sets": [], "cache_dir": str(tmp_path / "c"), "num_workers": 0,
                      "train_crop": "grid", "hr_subimage_size": 32, "hr_subimage_step": 16}
    alone = []
    for folder in (first, second):
        module = SRDataModule(**settings, train=str(folder))
        module.setup("fit")
        alone.append(module)
    both = SRDataModule(**settings, train=[str(first), str(second)])
    both.setup("fit")
    count = alone[0].num_subimages
    assert both.num_subimages == count + alone[1].num_subimages
    for index in range(both.num_subimages):
        source, local = (alone[0], index) if index < count else (alone[1], index - count)
        lr, hr = both.subimage(index)
        expected_lr, expected_hr = source.subimage(local)
        assert np.array_equal(lr, expected_lr) and np.array_equal(hr, expected_hr)
    scored = torch.cat([batch["index"] for batch in both.subimage_dataloader(batch_size=8)])
    assert scored.tolist() == list(range(both.num_subimages))


@pytest.mark.unit
def test_train_list_errors_name_the_entry(tmp_path: Path) -> None:
    first, _ = _two_train_folders(tmp_path)
    settings: dict = {"scale": 2, "val_sets": [], "cache_dir": str(tmp_path / "c"), "num_workers": 0}
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=rf"data\.train entry '{missing}'.*does not exist"):
        SRDataModule(**settings, train=[str(first), missing]).setup("fit")
    with pytest.raises(ConfigError, match=r"img00\.png twice"):
        SRDataModule(**settings, train=[str(first), str(first)]).setup("fit")
    with pytest.raises(ConfigError, match="empty list"):
        SRDataModule(**settings, train=[]).setup("fit")


@pytest.mark.integration
def test_train_list_parses_on_the_command_line(tmp_path: Path) -> None:
    first, second = _two_train_folders(tmp_path)
    cache = tmp_path / "c"
    code = data_main(["prepare", "--stage", "fit", "--data.train", f"[{first}, {second}]", "--data.val_sets", "[]",
                      "--data.scale", "2", "--data.cache_dir", str(cache), "--data.num_workers", "0"])
    assert code == 0
    assert len(list((cache / "arrays" / "x2").glob("*.hr.npy"))) == 3  # A's two images and B's one
