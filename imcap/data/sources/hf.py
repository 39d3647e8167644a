"""Hugging Face datasets: a local imagefolder, a save_to_disk directory, or a hub name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePath

from imcap.data.sources.records import Record, Source, SourceError, sample_key
from imcap.data.sources.tables import cell_captions


def read_hf(
    dataset: str,
    image_column: str,
    caption_column: str,
    splits: list[tuple[str, str]] | None = None,
    id_column: str | None = None,
) -> Source:
    """A local `imagefolder` (images + metadata.jsonl/metadata.csv), a save_to_disk directory, or a hub name.

    splits: (imcap split, dataset split) pairs; default every split of the dataset, `validation` named val.
    The image column holds images (their original bytes or files are used) or paths. An image's id is
    id_column's value, else its file name without the extension (in an imagefolder, as its metadata names
    it: cats/1), else its row number. Row order is kept."""
    import datasets  # slow to import, and only this source needs it

    path = Path(dataset)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        else:
            loaded = datasets.load_dataset(dataset)
    except Exception as e:  # datasets raises many kinds: missing files, bad metadata, no network
        raise SourceError(f"cannot load the dataset {dataset}: {type(e).__name__}: {e}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    pairs = splits or [("val" if name == "validation" else name, name) for name in loaded]
    records = {}
    for split, dataset_split in pairs:
        if dataset_split not in loaded:
            raise SourceError(f"{dataset} has no split {dataset_split!r} (splits: {', '.join(loaded)})")
        table = loaded[dataset_split]
        columns = [image_column, caption_column, *([id_column] if id_column else [])]
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise SourceError(
                f"{dataset} split {dataset_split!r} has no column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(table.column_names)}); name them with --image-column, "
                "--caption-column, --id-column"
            )
        table = table.select_columns(columns)
        if isinstance(table.features[image_column], datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))  # the original bytes, undecoded
        records[split] = _HFRecords(
            table,
            f"{dataset}[{dataset_split}]",
            path if path.is_dir() else None,
            image_column,
            caption_column,
            id_column,
        )
    return Source(f"hf {dataset}", records)


IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


class _HFRecords:
    """The records of one dataset split, read row by row (a sized iterable, for the progress bar)."""

    def __init__(
        self, table, name: str, root: Path | None, image_column: str, caption_column: str, id_column: str | None
    ):
        self.table, self.name, self.root = table, name, root
        self.image_column, self.caption_column, self.id_column = image_column, caption_column, id_column

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[Record]:
        for number, row in enumerate(self.table):
            image = row[self.image_column]
            data = image.get("bytes") if isinstance(image, dict) else None
            file = image.get("path") if isinstance(image, dict) else image
            path = None if data is not None or not file else (self.root / file if self.root else Path(file))
            name = self._name(file) if file else None
            if self.id_column:
                image_id = row[self.id_column]
            else:
                image_id = str(PurePath(name).with_suffix("")) if name else f"{number:08d}"
            yield Record(
                sample_key(str(image_id)),
                image_id,
                tuple(cell_captions(row[self.caption_column])),
                str(path) if path else f"{self.name} row {number}",
                name=name,
                path=path,
                data=data,
            )

    def _name(self, file: str) -> str:
        """A local imagefolder's image: its path relative to the folder of the metadata file naming it (its
        split's, or the dataset's), as that file names it (cats/1.jpg); other images: the file name."""
        if self.root and Path(file).is_absolute():
            root = self.root.resolve()
            for folder in Path(file).parents:
                if folder == root or any((folder / name).exists() for name in IMAGEFOLDER_METADATA):
                    return str(Path(file).relative_to(folder))
        return PurePath(file).name
