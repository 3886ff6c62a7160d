"""Text documents from a ``datasets`` source: a ``save_to_disk`` directory, a local dataset directory or data file
(parquet, csv, arrow), or a Hub dataset name (``name`` or ``name:config``; needs network)."""
from pathlib import Path

import datasets

DATA_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class TextColumn:
    """Read-only sequence view of one string column, fetched row by row so nothing large is copied."""

    def __init__(self, dataset: datasets.Dataset, column: str, origin: str):
        self.dataset, self.column, self.origin = dataset, column, origin

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:
        text = self.dataset[index][self.column]
        if not isinstance(text, str):
            raise ValueError(f"{self.origin}: row {index} has no text in column '{self.column}'")
        return text


def _load(source: str, split: str):
    path = Path(source)
    if path.is_dir():
        if any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS):
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path))
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{source}: unsupported data file type '{path.suffix}'")
        return datasets.load_dataset(builder, data_files=str(path), split=split)
    name, _, config = source.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ValueError(f"cannot load dataset '{source}' from the Hugging Face Hub ({error}); "
                         "pass a local file or directory instead") from None


def _pick_split(loaded, split: str, origin: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(f"{origin}: no '{split}' split among {sorted(loaded)}")


def _pick_text_column(dataset: datasets.Dataset, origin: str) -> str:
    if "text" in dataset.column_names:
        return "text"
    strings = [name for name, feature in dataset.features.items()
               if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"{origin}: no 'text' column and no single string column among {dataset.column_names}")


def load_text_documents(source: str, split: str = "train") -> TextColumn:
    """The documents of ``source``'s ``split``, from its ``text`` column (or its only string column)."""
    dataset = _pick_split(_load(source, split), split, source)
    column = _pick_text_column(dataset, source)
    if len(dataset) == 0:
        raise ValueError(f"{source}: dataset split is empty")
    return TextColumn(dataset, column, source)
