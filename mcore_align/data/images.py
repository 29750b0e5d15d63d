"""Images of vision-language records: resolve, load, check placeholders, expand with the processor.

Record formats (parsed by ``formats.py``; every format keeps ``images``, or a single
``image``, in ``Example.images``):

* ms-swift: ``query`` / ``response`` / ``rejected_response`` / ``images``, ``<image>`` in the query;
* LLaMA-Factory sharegpt / messages: ``conversations`` or ``messages`` with ``<image>`` in the
  turns, ``images`` paths relative to the dataset file (``mllm_demo.json``);
* TRL: ``prompt`` / ``chosen`` / ``rejected`` / ``images``, where a message's content may be a
  list of parts (``{"type": "image"}``, ``{"type": "text", "text": ...}``): each image part
  becomes one ``<image>`` placeholder (:func:`content_parts_to_text`).

An image entry is a path (absolute, or relative to the folder of the dataset file), a
``{"path": ...}`` / ``{"bytes": ...}`` dict (HF datasets' Image feature, as parquet / arrow
files store it), raw bytes, or a PIL image. In-memory images are cached as their encoded
bytes in the tokenized cache folder (``store.py``: ``images/<hash>``). ms-swift's
``rejected_images`` give the rejected sequence its own images for the same placeholders.

Placeholders: the k-th ``<image>`` in the prompt (turns in order) is the k-th image. The
number of placeholders must equal the number of images, else the record is a
:class:`~mcore_align.data.formats.BadRecord` (``image_count_mismatch``). Missing and
unreadable images are ``BadRecord``s too (``missing_image``, ``corrupt_image``); each message
names the record (``file:line`` or ``file[record i]``) and the image path, so
``data.on_bad_record`` decides between an error and a counted skip, as for text faults.

Expansion (:func:`prepare_vision_example`): each placeholder is replaced by the model's
image token repeated as many times as the checkpoint's own processor says for that image
(LLaVA-1.5 at 336 px: 576), *before* the chat template and tokenization run, so token
counts, ``max_length`` and packing see the image tokens, and response targets are found
on the expanded text as for text records.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .formats import BadRecord, Example

PLACEHOLDER = "<image>"
"""The image placeholder of dataset records (LLaMA-Factory, ms-swift and TRL conventions)."""


def content_parts_to_text(parts: list, where: str, loc: str) -> str:
    """TRL/OpenAI-style content parts -> text with one ``<image>`` per image part.

    ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]`` -> ``"<image>What is it?"``.
    """
    out = []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            out.append(p["text"])
        elif kind in ("image", "image_url"):
            out.append(PLACEHOLDER)
        else:
            raise BadRecord("mistyped_field", f"{loc}: field '{where}[{j}]' must be a {{'type': 'text', 'text': ...}} "
                            f"or {{'type': 'image'}} part, got {p!r}")
    return "".join(out)


@dataclass(frozen=True)
class ImageRef:
    """Where one image comes from: a file path or in-memory bytes (or a PIL image)."""

    path: Path | None = None
    data: Any = None
    """Encoded bytes or a PIL image (HF datasets' Image feature)."""
    field: str = "images"
    """The record field it came from (``images[0]``, ``rejected_images[1]``), for messages."""

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"in column '{self.field}' (in-memory)"

    def encoded(self) -> bytes:
        """In-memory images as encoded bytes, for the tokenized cache: the dataset's own bytes,
        or a decoded (PIL) image saved as PNG (lossless: it decodes to the same pixels)."""
        assert self.path is None
        if isinstance(self.data, (bytes, bytearray)):
            return bytes(self.data)
        buf = io.BytesIO()
        self.data.save(buf, format="PNG")
        return buf.getvalue()


def resolve_images(images: list, base_dir: str | Path | None, loc: str, key: str = "images") -> list[ImageRef]:
    """The record's image entries as :class:`ImageRef`; relative paths are taken relative to
    ``base_dir`` (the folder of the dataset file). ``key``: the record field (for messages)."""
    out = []
    for i, im in enumerate(images):
        where = key if key == "image" else f"{key}[{i}]"  # "image": RLAIF-V's one-image column
        if isinstance(im, dict):
            if im.get("bytes") is not None:  # HF datasets' Image feature stored undecoded
                out.append(ImageRef(data=im["bytes"], field=where))
                continue
            im = im.get("path")
        if isinstance(im, (bytes, bytearray)):
            out.append(ImageRef(data=bytes(im), field=where))
        elif isinstance(im, str) and im:
            p = Path(im).expanduser()
            if not p.is_absolute() and base_dir is not None:
                p = Path(base_dir) / p
            out.append(ImageRef(path=p, field=where))
        elif hasattr(im, "convert"):  # a PIL image (HF datasets' Image feature, decoded)
            out.append(ImageRef(data=im, field=where))
        else:
            raise BadRecord("mistyped_field", f"{loc}: field '{where}' must be a path, a {{'path'|'bytes': ...}} "
                            f"dict, bytes or an image, got {type(im).__name__}")
    return out


def load_image(ref: ImageRef, loc: str):
    """Open and fully decode one image as RGB (a lazy open would fail later, elsewhere)."""
    from PIL import Image, UnidentifiedImageError

    what = ref.describe()
    try:
        if ref.path is not None:
            img = Image.open(ref.path)
        elif isinstance(ref.data, (bytes, bytearray)):
            img = Image.open(io.BytesIO(ref.data))
        else:
            img = ref.data
        img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise BadRecord("missing_image", f"{loc}: image file {what} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadRecord("corrupt_image", f"{loc}: image {what} cannot be read as an image "
                        f"({type(e).__name__}: {e})") from None


def count_placeholders(ex: Example) -> int:
    if isinstance(ex.prompt, str):
        return ex.prompt.count(PLACEHOLDER)
    return sum(m["content"].count(PLACEHOLDER) for m in ex.prompt)


def check_placeholders(ex: Example, loc: str) -> None:
    """``<image>`` placeholders in the prompt == images; none in the responses."""
    n_ph = count_placeholders(ex)
    for key, imgs in ((ex.image_field, ex.images), ("rejected_images", ex.rejected_images)):
        if imgs is None or (key == "rejected_images" and ex.rejected is None):
            continue
        if n_ph != len(imgs):
            raise BadRecord("image_count_mismatch", f"{loc}: {n_ph} {PLACEHOLDER} placeholder(s) in the prompt but "
                            f"{len(imgs)} image(s) in '{key}'; each image needs exactly one placeholder")
    for name, r in (("chosen", ex.chosen), ("rejected", ex.rejected)):
        if r is not None and PLACEHOLDER in r:
            raise BadRecord("image_count_mismatch", f"{loc}: the {name} response contains {PLACEHOLDER}; images "
                            "can only be placed in the prompt")


class VisionProcessor:
    """The checkpoint's HF processor, asked how many image tokens each image becomes."""

    def __init__(self, processor):
        self.proc = processor
        self.image_token: str = processor.image_token
        self.image_token_id: int = processor.tokenizer.convert_tokens_to_ids(self.image_token)
        # Tokens the processor puts around an image's run (InternVL: <img> ... </img>; LLaVA: none)
        self.image_start: str = getattr(processor, "start_image_token", None) or ""
        self.image_end: str = getattr(processor, "end_image_token", None) or ""

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VisionProcessor":
        """transformers' ``AutoProcessor`` of ``path`` (families whose processor cannot be built
        here give their own: ``VisionFamily.processor``, ``models.vision.vision_processor``)."""
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(str(path)))

    def image_text(self, count: int) -> str:
        """What one ``<image>`` placeholder of ``count`` image tokens becomes before templating:
        the tokens, with the processor's start / end markers around them if it has any
        (InternVL: ``<img>`` ... ``</img>``; families may override, e.g. Qwen2-VL)."""
        return self.image_start + self.image_token * count + self.image_end

    def model_inputs(self, text: str, images: list) -> tuple[dict, dict]:
        """``({"input_ids": [1, S], ...}, image tensors)`` of rendered ``text`` holding ``<image>``
        placeholders, expanded by the HF processor itself (verification and tests)."""
        out = self.proc(text=[text.replace(PLACEHOLDER, self.image_token)], images=images, return_tensors="pt",
                        add_special_tokens=False)
        # the image processor's tensors: all the megatron side needs (InternVL's processor drops
        # num_patches, which its feature split uses)
        tensors = dict(self.proc.image_processor(images=images, return_tensors="pt"))
        return {"input_ids": out["input_ids"]}, tensors

    def encode_images(self, images: list) -> tuple[dict, list[int]]:
        """``(image tensors, image tokens per image)``. The counts come from the processor itself:
        each image is expanded alone (``<image>`` -> its tokens) and the image ids are counted."""
        counts = []
        for img in images:  # the processor's own expansion of one image: count its image tokens
            ids = self.proc(text=[self.image_token], images=[img], return_tensors="np",
                            add_special_tokens=False)["input_ids"][0]
            counts.append(int((ids == self.image_token_id).sum()))
        tensors = dict(self.proc.image_processor(images=images, return_tensors="pt")) if images else {}
        return tensors, counts


def expand_placeholders(ex: Example, counts: list[int], image_token) -> Example:
    """A copy of ``ex`` whose k-th ``<image>`` is ``image_token * counts[k]`` (or
    ``image_token(counts[k])`` when it is a function, e.g. ``VisionProcessor.image_text``)."""
    it = iter(counts)
    image_text = image_token if callable(image_token) else (lambda n: image_token * n)

    def expand(text: str) -> str:
        parts = text.split(PLACEHOLDER)
        return parts[0] + "".join(image_text(next(it)) + p for p in parts[1:])

    out = copy.copy(ex)
    out.prompt = (expand(ex.prompt) if isinstance(ex.prompt, str)
                  else [{**m, "content": expand(m["content"])} for m in ex.prompt])
    assert next(it, None) is None, "placeholder count checked before expansion"
    return out


@dataclass
class VisionExample:
    example: Example
    """The record with placeholders expanded into image tokens (ready for templating)."""
    image_inputs: dict
    """The processor's image tensors (``pixel_values`` ``[N_img, 3, H, W]``; LLaVA-NeXT:
    ``[N_img, tiles, 3, H, W]`` and ``image_sizes`` ``[N_img, 2]``)."""
    image_paths: list[str]
    tokens_per_image: list[int]
    refs: list[ImageRef] = None
    """Where each image came from (paths or in-memory bytes), in placeholder order."""
    rejected: "VisionExample | None" = None
    """ms-swift ``rejected_images``: the rejected sequence's own images, with the prompt
    expanded for them (token counts may differ per image); None: it shares these images."""


def prepare_vision_example(ex: Example, loc: str, base_dir: str | Path | None,
                           processor: VisionProcessor) -> VisionExample:
    """Resolve, check, load and encode the images of ``ex``; expand its placeholders."""
    check_placeholders(ex, loc)
    out = _encode(ex, ex.images, ex.image_field, loc, base_dir, processor)
    if ex.rejected_images is not None and ex.rejected is not None:
        out.rejected = _encode(ex, ex.rejected_images, "rejected_images", loc, base_dir, processor)
    return out


def _encode(ex: Example, images: list, key: str, loc: str, base_dir, processor: VisionProcessor) -> VisionExample:
    refs = resolve_images(images, base_dir, loc, key)
    tensors, counts = processor.encode_images([load_image(r, loc) for r in refs])
    return VisionExample(expand_placeholders(ex, counts, processor.image_text), tensors,
                         [r.describe() for r in refs], counts, refs)


def micro_batch_image_inputs(per_sequence: list[dict]) -> dict:
    """The image tensors of a packed micro-batch: each sequence's tensors concatenated in
    packing order (dim 0 = image), so the i-th image meets the i-th placeholder run of the row.

    A chosen/rejected pair that shares one image lists it once per sequence: both sequences
    hold its placeholder run, and each run needs its features.
    Sequences without images contribute nothing; ``{}`` when no sequence has one.

    Tensors whose other dimensions differ are zero-padded at the end of each dimension to the
    largest, as HF image processors pad a batch (LLaVA-NeXT's ``pixel_values`` ``[1, tiles, 3,
    H, W]`` with tile counts 5 and 4 -> ``[2, 5, 3, H, W]``; the model reads each image's real
    tile count from ``image_sizes``, so the padding is never used).
    """
    import torch

    keys = {k for d in per_sequence for k in d}
    out = {}
    for k in sorted(keys):
        parts = [d[k] for d in per_sequence if k in d]
        if len({p.shape[1:] for p in parts}) > 1:
            assert len({p.dim() for p in parts}) == 1, f"{k}: image tensors of different ranks"
            big = [max(p.shape[i] for p in parts) for i in range(1, parts[0].dim())]
            padded = []
            for p in parts:
                q = p.new_zeros(p.shape[0], *big)
                q[(slice(None), *(slice(0, n) for n in p.shape[1:]))] = p
                padded.append(q)
            parts = padded
        out[k] = torch.cat(parts, dim=0)
    return out


# ---- the trainer's side: which model the data is for, images of cached records -------------
VISION_TEXT_MODEL = "text_model"
"""``model_kind_of_tokenizer`` result: a text-only checkpoint (image records are errors)."""


def model_kind_of_tokenizer(tokenizer) -> tuple[str, "VisionProcessor | None"]:
    """What the data is tokenized for, read from where the tokenizer was loaded.

    * ``("vision", processor)``: the tokenizer is a checkpoint's ``tokenizer/`` folder whose
      ``model_spec.json`` declares a vision model (conversion copies the HF processor files
      there): image placeholders are expanded with that processor;
    * ``("text_model", None)``: a text-only checkpoint: records with images are
      ``BadRecord("images_on_text_model")`` (an error, or dropped and counted);
    * ``("unknown", None)``: a bare tokenizer (data-only use, tools): images are counted as
      ``images_ignored`` and the text is kept, as before vision support.
    """
    src = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    spec_file = src.parent / "model_spec.json"
    if not src.is_dir() or not spec_file.is_file():
        return "unknown", None
    import json

    spec = json.loads(spec_file.read_text()).get("model_spec", {})
    if not spec.get("vision"):
        return VISION_TEXT_MODEL, None
    from mcore_align.models.vision import vision_processor

    return "vision", vision_processor(src, spec["vision"]["family"])


def processor_fingerprint(processor: "VisionProcessor") -> str:
    """Identity of the image processing for the tokenized-cache key (token counts per image)."""
    import hashlib
    import json

    ip = processor.proc.image_processor
    doc = {"image_token": processor.image_token, "image_token_id": processor.image_token_id,
           "image_processor": ip.to_dict() if hasattr(ip, "to_dict") else repr(ip),
           "patch_size": getattr(processor.proc, "patch_size", None),
           "strategy": getattr(processor.proc, "vision_feature_select_strategy", None),
           "extra": getattr(processor.proc, "num_additional_image_tokens", None)}
    if getattr(processor.proc, "image_seq_length", None) is not None:  # InternVL: tokens per tile
        doc["seq"] = processor.proc.image_seq_length
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ImageEncoder:
    """Cached records' image paths -> the processor's tensors, for the loader.

    Images are decoded when a micro-batch is collated (the cache holds paths, not pixels);
    the last few encoded images are kept, so the two sequences of a pair (and repeated
    images) are decoded and preprocessed once."""

    def __init__(self, processor: VisionProcessor, keep: int = 64):
        self.processor, self.keep = processor, keep
        self._memo: dict[str, dict] = {}

    def encode(self, path: str) -> dict:
        hit = self._memo.pop(path, None)
        if hit is None:
            img = load_image(ImageRef(path=Path(path)), f"cached record image {path}")
            hit = {k: v for k, v in self.processor.proc.image_processor(images=[img], return_tensors="pt").items()}
        self._memo[path] = hit  # most recent last
        while len(self._memo) > self.keep:
            self._memo.pop(next(iter(self._memo)))
        return hit

    def sequence_inputs(self, paths: list[str]) -> dict:
        """Tensors of one sequence's images, in placeholder order (``{}`` without images)."""
        return micro_batch_image_inputs([self.encode(p) for p in paths])
