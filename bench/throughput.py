"""Training throughput of imcap's step against the straightforward step (bench/reference.py), side by side.

    python bench/throughput.py                      # the small CPU size
    python bench/throughput.py --size gpu           # 256 caption samples a step, 224 px, 10,000 words, 20 steps, bf16
    python bench/throughput.py --pipeline SHARDS    # also: the data pipeline's images/s per core on SHARDS
    python bench/throughput.py --scst               # instead: self-critical training's reward and step (scst.py)
    python bench/throughput.py --scst --size gpu --batch 1280   # the same at 256 images a step

Both steps train the same weights and are timed in the same run, alternating, so the ratios are
measured under the same conditions. Both train the same `--batch` caption samples (image-caption
pairs) a step: batch/k images with k captions each, which the reference trains as rows of one image
and one caption (each image repeated for its k captions) and imcap with one encoder pass per image.
Rates are caption samples per second, and the step's arithmetic rate (its FLOPs, counted once by torch's
FlopCounterMode, over its time). Modes: the encoder frozen or its layer4 trained; imcap with the static-shape
step (train.static_shapes: every caption at every step, masked), and imcap reading cached encoder
features (`imcap features build`) instead of images. With --e2e the batches
come from JPEG shards in memory (/dev/shm) through imcap's own data path, decoded by data workers or
(--decode device) on the device.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from reference import ReferenceCaptioner  # noqa: E402
from timing import TimedSteps, alternating  # noqa: E402

from imcap.config import load_config  # noqa: E402
from imcap.data.batch import CachedFeatures, Images  # noqa: E402
from imcap.model import Captioner, caption_loss  # noqa: E402
from imcap.train import make_optimizer  # noqa: E402

SIZES = {  # batch: caption samples per step, batch/captions images with `captions` captions each
    "cpu": dict(batch=40, image_size=224, vocab=1000, length=12, captions=5, dim=512, bf16=False),
    "gpu": dict(batch=256, image_size=224, vocab=10000, length=20, captions=5, dim=512, bf16=True),
}


def random_batch(images: int, k: int, length: int, vocab: int, size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pictures = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=g)
    captions = torch.randint(4, vocab, (images, k, length + 1), generator=g)
    captions[:, :, 0] = 1
    ends = torch.randint(length // 2, length + 1, (images, k), generator=g)  # real captions vary in length
    positions = torch.arange(length + 1).view(1, 1, -1)
    captions[positions == ends.unsqueeze(2)] = 2
    captions[positions > ends.unsqueeze(2)] = 0
    return pictures.to(device), captions.to(device)


def models(args, train_layer4: bool, device):
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "model.encoder.weights=none",
            f"model.encoder.train_layer4={str(train_layer4).lower()}",
            f"model.decoder.embed_dim={args.dim}",
            f"model.decoder.hidden_dim={args.dim}",
            f"model.decoder.attention_dim={args.dim}",
        ],
    )
    fast = Captioner(cfg.model, args.vocab).to(device).train()
    reference = ReferenceCaptioner(args.vocab, train_layer4, args.dim, args.dim, args.dim, 0.5)
    reference.load_state_dict(fast.state_dict())
    if args.compile:
        fast.decoder.step = torch.compile(fast.decoder.step, dynamic=True)
    return fast, reference.to(device).train()


def captioning_loss(model, inputs, args, device):
    """The cross-entropy loss of `model` on a batch (images, captions); `inputs(images, captions)` gives the
    model's arguments."""

    def loss(batch):
        images, captions = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits, alphas = model(*inputs(images, captions))
        return caption_loss(logits, alphas, captions, 0, 1.0)[0], captions.shape[0] * captions.shape[1]

    return loss


def compare(args, device, train_layer4: bool, reference_batches, imcap_batches) -> list[TimedSteps]:
    fast, reference = models(args, train_layer4, device)
    on_device = device_batches(args, args.batch // args.captions, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        cached = fast.encoder.frozen_features(next(on_device)[0]).to(torch.bfloat16)  # what a feature cache holds
    plain = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-4)
    ours, _ = make_optimizer(fast, load_config(None, ["train.lr=1e-4"]), 1)  # imcap's own parameter groups
    static = copy.deepcopy(fast)
    static.static_shapes = True
    ours_static, _ = make_optimizer(static, load_config(None, ["train.lr=1e-4"]), 1)

    def images(model):
        return captioning_loss(model, lambda images, captions: (captions, Images(images)), args, device)

    steps = [
        TimedSteps(
            "reference",
            captioning_loss(reference, lambda images, captions: (images, captions), args, device),
            reference_batches,
            plain,
            device,
        ),
        TimedSteps("imcap", images(fast), imcap_batches, ours, device),
        TimedSteps("imcap, static shapes", images(static), imcap_batches, ours_static, device),
        TimedSteps(
            "imcap, cached features",
            captioning_loss(fast, lambda images, captions: (captions, CachedFeatures(cached)), args, device),
            on_device,
            ours,
            device,
        ),
    ]
    alternating(steps, args.seconds)
    return steps


def device_batches(args, images: int, device):
    """The same random batch of `images` images with k captions each, already on the device."""
    pictures, captions = random_batch(images, args.captions, args.length, args.vocab, args.image_size, device)
    while True:
        yield pictures, captions


def shard_batches(args, images: int, device, shard_dir: str):
    """Batches from JPEG shards in memory through imcap's data path: its pipeline and data workers,
    then DeviceBatches (the copy to the device, and decoding there, a few batches ahead), as the trainer reads them."""
    from imcap.config import DataConfig
    from imcap.data.batch import Collate
    from imcap.data.prefetch import DeviceBatches
    from imcap.data.shards import count_samples, list_shards
    from imcap.data.streams import Part, TrainStream, batches_per_epoch, train_loader
    from imcap.text import Vocabulary

    shards = list_shards(shard_dir, "train")
    # every worker needs shards of its own; an epoch of 20 batches or more, as in training
    shards *= max(-(-args.workers // len(shards)), -(-20 * images // count_samples(shards)))
    vocab = Vocabulary.load(Path(shard_dir) / "vocab.json")
    data = DataConfig(
        batch_size=images,
        image_size=args.image_size,
        train_crop="random",
        shuffle_buffer=1000,
        jpeg_decode="device" if args.decode == "device" else "workers",
    )
    stream = TrainStream(
        shards,
        Collate(vocab, args.length - 1, args.captions),
        data,
        0,
        Part(),
        range(10**6),
        0,
        batches_per_epoch(count_samples(shards), images, 1, 1),
    )
    with DeviceBatches(train_loader(stream, args.workers), device, args.ahead) as batches:  # closed with this
        for batch in batches:  # generator: the workers stop
            yield batch.inputs.pixels, batch.captions


def pipeline_rate(shard_dir: str, image_size: int, seconds: float = 20.0) -> float:
    """Decoded, cropped images per second per core through imcap's pipeline (one process, no workers)."""
    from imcap.data.batch import Collate
    from imcap.data.shards import list_shards
    from imcap.data.streams import EvalStream, Part, eval_loader
    from imcap.text import Vocabulary

    vocab = Vocabulary.load(Path(shard_dir) / "vocab.json")
    loader = eval_loader(EvalStream(list_shards(shard_dir, "train"), Collate(vocab, 30, 1), Part(), 32, image_size))
    images, start = 0, time.process_time()  # CPU time of this process: images per core-second
    while time.process_time() - start < seconds:
        for batch in loader:
            images += len(batch)
            if time.process_time() - start >= seconds:
                break
    return images / (time.process_time() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="cpu")
    parser.add_argument(
        "--seconds", type=float, default=None, help="timed seconds per step kind (default: 6 CPU, 8 GPU)"
    )
    parser.add_argument("--modes", default="frozen,layer4")
    parser.add_argument("--compile", action="store_true", help="torch.compile imcap's decoder step")
    parser.add_argument("--e2e", metavar="SHARDS", help="take batches from these JPEG shards (copied to /dev/shm)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument(
        "--decode",
        choices=["workers", "device"],
        default="workers",
        help="with --e2e: where JPEGs are decoded (imcap's data.jpeg_decode)",
    )
    parser.add_argument(
        "--ahead",
        type=int,
        default=None,
        help="with --e2e: batches DeviceBatches prepares ahead in its thread (default: 2 on a GPU, "
        "0 on a CPU); 0: in the training thread, between steps",
    )
    parser.add_argument(
        "--pipeline", metavar="SHARDS", help="also measure the pipeline's images/s per core on these shards"
    )
    parser.add_argument(
        "--scst", action="store_true", help="instead: self-critical training's reward and step (bench/scst.py)"
    )
    for key, value in SIZES["cpu"].items():
        parser.add_argument(
            f"--{key.replace('_', '-')}", type=type(value) if not isinstance(value, bool) else int, default=None
        )
    args = parser.parse_args()
    if args.scst and args.size == "cpu" and args.batch is None:
        args.batch = 160  # the demo's 32 images x 5 samples: self-critical training on a CPU trains the demo
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.bf16 = bool(args.bf16)
    args.seconds = args.seconds or (8.0 if args.size == "gpu" else 6.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    )
    if args.e2e:
        from imcap.data.prefetch import DeviceBatches
        from imcap.text import Vocabulary

        args.ahead = DeviceBatches.default_ahead(device) if args.ahead is None else args.ahead
        args.vocab = len(Vocabulary.load(Path(args.e2e) / "vocab.json"))  # the shards' captions decide it
    print(f"device: {card}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if args.scst:
        import scst

        return scst.run(args, device, args.batch // args.captions)
    print(
        f"both: {args.batch // args.captions} images x {args.captions} captions per step (the reference: a row "
        "per caption, an encoder pass per row); "
        f"{args.image_size} px, vocabulary {args.vocab}, {args.length} decoder steps, dims {args.dim}, "
        f"{'bf16' if args.bf16 else 'fp32'}{', compiled decoder step' if args.compile else ''}"
        + (
            f", batches from JPEG shards in memory, decoded by the {args.decode}, {args.ahead} ahead"
            if args.e2e
            else ", batches already on the device"
        )
        + " (cached features: always on the device)"
    )
    shard_dir = None
    if args.e2e:
        import shutil

        shard_dir = tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        for f in Path(args.e2e).iterdir():
            if f.is_file():
                shutil.copyfile(f, Path(shard_dir) / f.name)
    for mode in args.modes.split(","):

        def batches(images):
            return shard_batches(args, images, device, shard_dir) if shard_dir else device_batches(args, images, device)

        reference, *ours = compare(
            args, device, mode == "layer4", batches(args.batch // args.captions), batches(args.batch // args.captions)
        )
        print(
            f"{mode:7s} reference {reference.rate:10.1f} caption-samples/s, {reference.tflops:.3f} TFLOP/s | "
            + " | ".join(
                f"{s.name} {s.rate:10.1f} ({s.rate / reference.rate:.2f}x), {s.tflops:.3f} TFLOP/s" for s in ours
            ),
            flush=True,
        )
        if shard_dir:  # where the time of an end-to-end step goes
            print(
                f"{'':7s} waiting for the next batch: reference {reference.waited / reference.seconds:.0%} of its "
                f"time, imcap {ours[0].waited / ours[0].seconds:.0%}",
                flush=True,
            )
    if args.pipeline:
        print(
            f"pipeline: {pipeline_rate(args.pipeline, 224):.0f} images/s per core (decode + resize + crop to 224 px, "
            f"{args.pipeline})"
        )


if __name__ == "__main__":
    main()
