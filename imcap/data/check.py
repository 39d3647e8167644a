"""`imcap shards check`: decode every sample of every shard as the trainer would, and compare the counts
with sizes.json. Each problem names its shard and, where it can, the sample's key."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from imcap.data.build import ordered_pool
from imcap.data.samples import SampleError, decode_sample
from imcap.data.shards import (
    SIZES_FILE,
    DataError,
    beside,
    is_url,
    list_shards,
    read_shard,
    read_sizes_file,
    shard_file_name,
    write_sizes,
)

CHECK_IMAGE_SIZE = 224  # check decodes as training at 224 px does (JPEGs drafted towards it)


class ShardCheck(NamedTuple):
    shard: str
    samples: int
    bad: list[tuple[str, str]]  # (key, reason) of samples the trainer would skip
    unreadable: str  # why the tar could not be read to its end; "" when it could


def check_shard(shard: str) -> ShardCheck:
    errors: list[str] = []
    bad, samples = [], 0
    for sample in read_shard(shard, errors):
        samples += 1
        try:
            decode_sample(sample, CHECK_IMAGE_SIZE, None)
        except SampleError as e:
            bad.append((sample["__key__"], str(e)))
    return ShardCheck(shard, samples, bad, errors[0] if errors else "")


def check_shards(spec: str, workers: int = 1, fix_sizes: bool = False) -> tuple[list[str], str]:
    """Decode every sample of every shard and compare the counts with sizes.json.
    -> (problems, each naming its shard and where possible its key; a summary line)."""
    if fix_sizes and is_url(spec):
        raise DataError(
            f"--fix-sizes rewrites the sizes.json beside the shards, and {spec} is not on this machine's disk: "
            "check and fix the local copy, then upload its sizes.json"
        )
    shards = list_shards(spec)  # every .tar of a directory, any split
    with ordered_pool(min(workers, len(shards))) as ordered_map:
        checks = list(
            tqdm(ordered_map(check_shard, shards), total=len(shards), desc="check", unit="shard", disable=None)
        )
    problems = []
    for check in checks:
        problems += [f"{check.shard}: key {key}: {reason}" for key, reason in check.bad]
        if check.unreadable:
            problems.append(f"{check.shard}: unreadable after {check.samples} samples: {check.unreadable}")
    counted: dict[str, dict[str, int]] = {}
    for check in checks:
        counted.setdefault(beside(check.shard, SIZES_FILE), {})[shard_file_name(check.shard)] = check.samples
    wrong_sizes = 0
    for sizes_file, counts in counted.items():
        sizes_problems, wrong = compare_sizes(sizes_file, counts, fix_sizes)
        problems += sizes_problems
        wrong_sizes += wrong
    bad = sum(len(c.bad) for c in checks)
    summary = (
        f"checked {len(shards)} shards, {sum(c.samples for c in checks)} samples: {bad} bad samples, "
        f"{sum(bool(c.unreadable) for c in checks)} unreadable shards, {wrong_sizes} sample counts "
        + ("fixed in sizes.json" if fix_sizes else "missing from or wrong in sizes.json")
    )
    return problems, summary


def compare_sizes(sizes_file: str, counts: dict[str, int], fix_sizes: bool) -> tuple[list[str], int]:
    """A sizes.json against the samples counted in the shards beside it, and (on a local disk) the shards it
    lists that do not exist. -> (problems, entries wrong); with fix_sizes the entries are fixed instead."""
    problems = []
    try:
        sizes = read_sizes_file(sizes_file)
    except ValueError as e:  # a sizes.json that is not one: --fix-sizes writes a new one
        sizes = {}
        problems.append(str(e))
    wrong = [(name, n) for name, n in counts.items() if sizes.get(name) != n]
    # at a URL, the shards are those sizes.json lists: one that is not there was found unreadable
    gone = (
        [] if is_url(sizes_file) else [n for n in sizes if n not in counts and not Path(beside(sizes_file, n)).exists()]
    )
    if fix_sizes:
        if wrong or gone or problems:
            write_sizes(
                Path(sizes_file).parent, {name: n for name, n in {**sizes, **counts}.items() if name not in gone}
            )
        return problems, len(wrong) + len(gone)
    problems += [
        f"{beside(sizes_file, name)}: {sizes_file} "
        + (
            f"says {sizes[name]} samples, the shard holds {n}"
            if name in sizes
            else f"has no entry (the shard holds {n} samples); run `imcap shards check --fix-sizes`"
        )
        for name, n in wrong
    ]
    problems += [
        f"{beside(sizes_file, name)}: listed in {sizes_file} with {sizes[name]} samples, but there is no such "
        "shard; run `imcap shards check --fix-sizes` to remove it"
        for name in gone
    ]
    return problems, len(wrong) + len(gone)
