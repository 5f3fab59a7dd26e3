"""Image-caption data for the diffusion task: an imagefolder (images + metadata.jsonl), the bundled Van Gogh set,
or a hub dataset, turned into the tensors of diffusers' text-to-image LoRA script (resize, crop, flip, [-1, 1]).

The transforms are written with PIL rather than torchvision (not a dependency here): resize the short side
(bilinear), center or random crop, optional horizontal flip, then scale to [-1, 1].
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from peftlab.config import DataConfig, ImageDataConfig
from peftlab.data.sources import first_bad_line, map_columns, root_cause
from peftlab.errors import PeftlabError, did_you_mean

BUNDLED_IMAGES = {"vangogh": "vangogh"}
FIELDS = ("image", "caption")
# Hugging Face imagefolder: metadata.jsonl's `file_name` becomes the `image` column, captions are `text`.
IMAGEFOLDER_COLUMNS = {"caption": "text"}


def bundled_folder(name: str) -> Path:
    if name not in BUNDLED_IMAGES:
        raise PeftlabError(f"data.source 'bundled:{name}': not a bundled image set; {did_you_mean(name, BUNDLED_IMAGES)}")
    return Path(str(resources.files("peftlab.data") / "bundled" / BUNDLED_IMAGES[name]))


def load_image_table(cfg: DataConfig) -> Any:
    """A `datasets.Dataset` with columns image (PIL) and caption."""
    import datasets

    datasets.disable_progress_bars()
    source = cfg.source
    if source.startswith("bundled:"):
        table = _imagefolder(bundled_folder(source.removeprefix("bundled:")), source)
    elif Path(source).exists():
        if not Path(source).is_dir():
            raise PeftlabError(f"data.source '{source}': the diffusion task reads an image folder, found a file; "
                               "fix: point it at a folder of images with a metadata.jsonl of captions")
        table = _imagefolder(Path(source), source)
    else:
        try:
            table = datasets.load_dataset(source, split=cfg.split)
        except Exception as exc:  # datasets raises many types for "not cached and offline"
            raise PeftlabError(
                f"data.source '{source}': cannot load it from the hub or the local cache ({exc.__class__.__name__}); "
                "fix: pass a local image folder with metadata.jsonl, or bundled:vangogh"
            ) from None
    return map_columns(table, FIELDS, (), {**IMAGEFOLDER_COLUMNS, **cfg.columns}, source)


def _imagefolder(folder: Path, source: str) -> Any:
    import datasets

    if not (folder / "metadata.jsonl").is_file():
        raise PeftlabError(f"data.source '{source}': no metadata.jsonl in the folder; fix: add one line per image, "
                           '{"file_name": "1.jpg", "text": "a caption"} (the Hugging Face imagefolder layout)')
    try:
        table = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    except Exception as exc:
        bad = first_bad_line(folder / "metadata.jsonl", "json")
        if bad:
            raise PeftlabError(f"data.source '{source}': cannot parse {folder / 'metadata.jsonl'}: {bad}; "
                               "fix: correct or remove that line") from None
        raise PeftlabError(f"data.source '{source}': cannot read it as an imagefolder ({root_cause(exc)}); fix: check "
                           "that every file_name in metadata.jsonl exists and is an image") from None
    if len(table) == 0:
        raise PeftlabError(f"data.source '{source}': the folder holds no captioned images; fix: add images with a "
                           "metadata.jsonl of {\"file_name\": ..., \"text\": ...} lines, or point data.source at such a folder")
    return table


@dataclass
class ImageStats:
    images: int
    min_side_px: int
    upscaled: int  # images whose short side is below the training resolution
    caption_tokens_mean: float
    captions_truncated: int  # captions longer than the text encoder's 77 tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageCaptions(torch.utils.data.Dataset):
    """Pixel tensors in [-1, 1] and caption token ids, as diffusers' train_text_to_image_lora.py feeds them."""

    def __init__(self, images: list[Image.Image], input_ids: torch.Tensor, cfg: ImageDataConfig, seed: int) -> None:
        self.images, self.input_ids, self.cfg = images, input_ids, cfg
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        flip = self.cfg.random_flip and self.rng.random() < 0.5
        return {"pixel_values": self.pixels(index, flip), "input_ids": self.input_ids[index], "index": index}

    def pixels(self, index: int, flip: bool, center: bool | None = None) -> torch.Tensor:
        center = self.cfg.center_crop if center is None else center
        return to_tensor(crop(self.images[index], self.cfg.resolution, center, flip, self.rng))


def crop(image: Image.Image, size: int, center: bool, flip: bool, rng: random.Random) -> Image.Image:
    """Resize the short side to `size`, take a size x size crop, maybe mirror it."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    if center:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    image = image.crop((left, top, left + size, top + size))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def build_image_data(cfg: DataConfig, tokenizer: Any, seed: int) -> tuple[ImageCaptions, ImageStats]:
    table = load_image_table(cfg)
    table = table.shuffle(seed=seed)
    if cfg.max_samples:
        table = table.select(range(min(cfg.max_samples, len(table))))
    images = [image.convert("RGB") for image in table["image"]]
    captions = [cfg.images.caption_prefix + (caption or "").strip() for caption in table["caption"]]
    if not any(captions):
        raise PeftlabError(f"data.source '{cfg.source}': every caption is empty; fix: set data.columns.caption to the "
                           "caption column, or use data.images.caption_prefix as a trigger word")
    full = tokenizer(captions, add_special_tokens=True)["input_ids"]
    ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    res = cfg.images.resolution
    stats = ImageStats(
        images=len(images),
        min_side_px=min(min(image.size) for image in images),
        upscaled=sum(min(image.size) < res for image in images),
        caption_tokens_mean=round(sum(map(len, full)) / len(full), 1),
        captions_truncated=sum(len(f) > tokenizer.model_max_length for f in full),
    )
    return ImageCaptions(images, ids, cfg.images, seed), stats
