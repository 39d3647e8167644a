"""DeviceBatches: the batches ahead of the step, in a thread; same batches, same order, errors surfaced."""

import itertools
import threading

import pytest
import torch
from helpers import TRAIN_LOADER, demo_as_jpegs, demo_collate, make_train_loader

from imcap.data.batch import Batch, Images
from imcap.data.prefetch import DeviceBatches
from imcap.data.shards import DataError, ShardWriter, list_shards


def test_device_batches_are_the_loaders_batches_in_order_with_their_inputs(demo_shards):
    kw = dict(rank=0, world_size=1, num_batches=6, skip=0, num_workers=2, **TRAIN_LOADER)
    shards, collate = list_shards(str(demo_shards), "train"), demo_collate(demo_shards, k=2)
    plain = list(make_train_loader(shards, collate, **kw))
    with DeviceBatches(make_train_loader(shards, collate, **kw), "cpu", ahead=2) as batches:  # a thread, as on a GPU
        prepared = list(batches)
        assert next(batches, None) is None  # stays exhausted
    assert [b.image_ids for b in prepared] == [b.image_ids for b in plain]
    for p, b in zip(prepared, plain):
        assert torch.equal(p.inputs.pixels, b.inputs.pixels) and torch.equal(p.captions, b.captions)


def tiny_batches(count: int | None, then: Exception | None = None):
    """`count` one-image batches (None: without end), then `then` raised, as a loader's error would be."""
    for _ in itertools.count() if count is None else range(count):
        yield Batch(
            torch.zeros(1, 1, 3, dtype=torch.long),
            Images(torch.zeros(1, 3, 4, 4, dtype=torch.uint8)),
            [["a"]],
            ["image"],
        )
    if then is not None:
        raise then


def test_an_error_in_the_loader_is_raised_in_the_training_thread_after_the_batches_before_it():
    batches = DeviceBatches(
        tiny_batches(2, DataError("no readable sample in shards/x/train-000003.tar")), "cpu", ahead=2
    )
    assert len([next(batches), next(batches)]) == 2
    with pytest.raises(DataError, match="train-000003.tar"):
        next(batches)
    batches.close()


def test_closing_stops_the_thread_while_it_waits_with_batches_nobody_takes():
    with DeviceBatches(tiny_batches(None), "cpu", ahead=1) as batches:
        next(batches)
        thread = batches.thread
    thread.join(timeout=5)
    assert not thread.is_alive() and "imcap-device-batches" not in [t.name for t in threading.enumerate()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("jpeg_on_device", [False, True])
def test_on_a_gpu_the_batches_prepared_on_a_side_stream_equal_the_cpu_ones(demo_shards, tmp_path, jpeg_on_device):
    """Demo images as JPEGs, decoded by nvJPEG on DeviceBatches' stream, then read on the default
    stream while the next batches are being prepared: the pixels the CPU decodes, every byte in place."""
    with ShardWriter(tmp_path, "train", max_samples=12) as writer:
        for sample in demo_as_jpegs(demo_shards, "train"):
            writer.write(sample)
    shards, collate = list_shards(str(tmp_path), "train"), demo_collate(demo_shards, k=2)
    kw = dict(
        rank=0,
        world_size=1,
        num_batches=20,
        skip=0,
        num_workers=2,
        jpeg_decode="device" if jpeg_on_device else "workers",
        epochs=2,
        **TRAIN_LOADER,
    )
    with DeviceBatches(make_train_loader(shards, collate, **kw), "cpu") as batches:
        expected = [(b.image_ids, b.inputs.pixels, b.captions) for b in batches]
    seen = []
    with DeviceBatches(make_train_loader(shards, collate, **kw), "cuda") as batches:
        for batch in batches:
            images = batch.inputs.pixels
            assert images.is_cuda and batch.captions.is_cuda
            checksum = images.sum(dtype=torch.int64)  # on the default stream: after the copy or decode
            seen.append((batch.image_ids, checksum.item(), images.cpu(), batch.captions.cpu()))
    assert [s[0] for s in seen] == [e[0] for e in expected] and len(seen) == 40
    for (_, checksum, images, captions), (_, cpu_images, cpu_captions) in zip(seen, expected):
        assert checksum == images.sum(dtype=torch.int64).item()
        assert torch.equal(captions, cpu_captions)
        assert (images.float() - cpu_images.float()).abs().mean() < 2  # nvJPEG and libjpeg round differently
