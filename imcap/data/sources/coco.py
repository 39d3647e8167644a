"""COCO captions JSON, and Karpathy's split JSON (COCO, Flickr8k, Flickr30k)."""

from __future__ import annotations

from pathlib import Path

from imcap.data.sources.records import Problem, Record, Source, by_key, image_record, read_json, required

COCO_LAYOUT = (
    "COCO captions JSON: {'images': [{'id', 'file_name'}, ...], 'annotations': [{'image_id', 'caption'}, ...]}"
)


def read_coco(splits: list[tuple[str, Path, Path]]) -> Source:
    """(split, captions_*.json, image directory) triples; captions in the annotations' order."""
    records, problems = {}, []
    for split, annotations_file, image_dir in splits:
        data = read_json(Path(annotations_file), COCO_LAYOUT)
        images: dict = {}
        for i, image in enumerate(required(data, "images", str(annotations_file), COCO_LAYOUT)):
            where = f"{annotations_file}: images[{i}]"
            images[required(image, "id", where, COCO_LAYOUT)] = (required(image, "file_name", where, COCO_LAYOUT), [])
        for i, note in enumerate(required(data, "annotations", str(annotations_file), COCO_LAYOUT)):
            where = f"{annotations_file}: annotations[{i}]"
            owner, caption = (
                required(note, "image_id", where, COCO_LAYOUT),
                required(note, "caption", where, COCO_LAYOUT),
            )
            if owner not in images:
                problems.append(Problem("caption of an unlisted image", where, f"image_id {owner}"))
                continue
            images[owner][1].append(caption)
        split_records = [image_record(name, captions, image_dir, image) for image, (name, captions) in images.items()]
        records[split] = by_key([*records.get(split, []), *split_records])
    return Source("coco " + " ".join(str(a) for _, a, _ in splits), records, problems)


# -------------------------------------------------------------------------------------- Karpathy splits

KARPATHY_LAYOUT = (
    "Karpathy split JSON: {'images': [{'filepath' (optional), 'filename', 'split', "
    "'sentences': [{'raw', 'tokens'}, ...]}, ...]}"
)


def read_karpathy(split_file: Path, image_root: Path, restval_split: str = "train") -> Source:
    """dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json; images at image_root/filepath/filename.
    Karpathy's `restval` images (COCO) go to restval_split: train by default, as in the papers."""
    data = read_json(Path(split_file), KARPATHY_LAYOUT)
    splits: dict[str, list[Record]] = {}
    for i, image in enumerate(required(data, "images", str(split_file), KARPATHY_LAYOUT)):
        where = f"{split_file}: images[{i}]"
        name = required(image, "filename", where, KARPATHY_LAYOUT)
        split = required(image, "split", where, KARPATHY_LAYOUT)
        captions = tuple(
            required(s, "raw", f"{where}.sentences[{j}]", KARPATHY_LAYOUT)
            for j, s in enumerate(required(image, "sentences", where, KARPATHY_LAYOUT))
        )
        record = image_record(name, captions, Path(image_root) / image.get("filepath", ""), image.get("cocoid"))
        splits.setdefault(restval_split if split == "restval" else split, []).append(record)
    return Source(f"karpathy {split_file}", {split: by_key(records) for split, records in splits.items()})
