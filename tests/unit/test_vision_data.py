"""Vision-language records: parsing (ms-swift, LLaMA-Factory, TRL), images relative to the
dataset file, placeholder expansion checked against the checkpoint's own HF processor, and
errors naming the record and image for missing / corrupt images and count mismatches."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcore_align.data.formats import BadRecord, detect_format, iter_dataset, normalize
from mcore_align.data.images import VisionProcessor, prepare_vision_example
from mcore_align.data.tokenization import RecordTokenizer
from mcore_align.models.tiny_vision import make_tiny_llava

TOKENS_PER_IMAGE = 16  # tiny CLIP: (32 / 8) ** 2 patches, class token dropped


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "hf", "qwen2")


@pytest.fixture(scope="module")
def proc(llava):
    return VisionProcessor.from_pretrained(llava)


def _records(path: Path):
    for loc, raw in iter_dataset(str(path), seed=0):
        yield loc, normalize(raw, detect_format(raw, loc), loc)


def _tokenize(proc, ex, loc, kind):
    rt = RecordTokenizer(proc.proc.tokenizer, kind, 4096, "delete", False)
    resp = rt.responses(ex, "x", loc)
    return rt.tokenize([[rt.templater.render(ex, r, loc) for r in resp]])[0], rt, resp


def test_mllm_demo_expands_like_the_hf_processor(shared_data, proc):
    """Every record of LLaMA-Factory's mllm_demo.json: images found relative to the file, one
    image-token run per image, and token ids equal to LlavaProcessor's own expansion of the
    unexpanded rendered text."""
    path = shared_data / "mllm_demo.json"
    n = 0
    for loc, ex in _records(path):
        v = prepare_vision_example(ex, loc, path.parent, proc)
        assert v.tokens_per_image == [TOKENS_PER_IMAGE] * len(ex.images)
        assert v.image_inputs["pixel_values"].shape == (len(ex.images), 3, 32, 32)
        rec, rt, resp = _tokenize(proc, v.example, loc, "sft")
        tok = rec.tokens[0]
        assert int((tok == proc.image_token_id).sum()) == TOKENS_PER_IMAGE * len(ex.images)
        # Independent reference: transformers' processor expands <image> in the raw rendered text.
        text = rt.templater.render(ex, resp[0], loc).text
        imgs = [Image.open(path.parent / p).convert("RGB") for p in ex.images]
        ref = proc.proc(text=[text], images=imgs, return_tensors="np", add_special_tokens=False)
        np.testing.assert_array_equal(tok, ref["input_ids"][0])
        np.testing.assert_allclose(v.image_inputs["pixel_values"].numpy(), ref["pixel_values"], rtol=0, atol=1e-6)
        # targets: only response tokens, never image tokens
        assert not rec.targets[0][tok == proc.image_token_id].any()
        n += 1
    assert n == 6


def _write(tmp_path: Path, shared_data: Path, records: list) -> Path:
    shutil.copytree(shared_data / "mllm_demo_data", tmp_path / "imgs")
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f


PAIR_RECORDS = [
    # ms-swift
    {"query": "<image>Who is he?", "response": "A football player.", "rejected_response": "A cat.",
     "images": ["imgs/2.jpg"]},
    # LLaMA-Factory sharegpt
    {"conversations": [{"from": "human", "value": "Compare <image> and <image>."}],
     "chosen": {"from": "gpt", "value": "Both are photos."}, "rejected": {"from": "gpt", "value": "No."},
     "images": ["imgs/1.jpg", "imgs/3.jpg"]},
    # TRL with content parts
    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A speech."}]}],
     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}],
     "images": ["imgs/3.jpg"]},
]


@pytest.mark.parametrize("i,fmt", [(0, "swift"), (1, "sharegpt"), (2, "trl")])
def test_paired_formats_with_images(tmp_path, shared_data, proc, i, fmt):
    f = _write(tmp_path, shared_data, [PAIR_RECORDS[i]])
    ((loc, ex),) = list(_records(f))
    assert loc == f"{f}:1" and detect_format(PAIR_RECORDS[i], loc) == fmt
    v = prepare_vision_example(ex, loc, f.parent, proc)
    rec, _, _ = _tokenize(proc, v.example, loc, "paired")
    n_img = len(PAIR_RECORDS[i]["images"])
    for tok in rec.tokens:  # chosen and rejected each hold every image token, in the shared prompt
        assert int((tok[:rec.prompt_len] == proc.image_token_id).sum()) == TOKENS_PER_IMAGE * n_img
    assert v.image_paths == [str(f.parent / p) for p in PAIR_RECORDS[i]["images"]]


def _prepare_first(f: Path, proc):
    ((loc, ex),) = list(_records(f))
    return prepare_vision_example(ex, loc, f.parent, proc)


def test_missing_image_names_record_and_path(tmp_path, shared_data, proc):
    f = _write(tmp_path, shared_data, [{**PAIR_RECORDS[0], "images": ["imgs/nope.jpg"]}])
    with pytest.raises(BadRecord, match=rf"{f}:1: image file {tmp_path}/imgs/nope.jpg does not exist") as e:
        _prepare_first(f, proc)
    assert e.value.reason == "missing_image"


def test_corrupt_image_names_record_and_path(tmp_path, shared_data, proc):
    f = _write(tmp_path, shared_data, [{**PAIR_RECORDS[0], "images": ["imgs/bad.jpg"]}])
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(BadRecord, match=rf"{f}:1: image {tmp_path}/imgs/bad.jpg cannot be read") as e:
        _prepare_first(f, proc)
    assert e.value.reason == "corrupt_image"


def test_truncated_image_is_corrupt(tmp_path, shared_data, proc):
    f = _write(tmp_path, shared_data, [{**PAIR_RECORDS[0], "images": ["imgs/cut.jpg"]}])
    data = (shared_data / "mllm_demo_data" / "2.jpg").read_bytes()
    (tmp_path / "imgs" / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(BadRecord, match=rf"{f}:1: image {tmp_path}/imgs/cut.jpg cannot be read"):
        _prepare_first(f, proc)


@pytest.mark.parametrize("rec,msg", [
    ({**PAIR_RECORDS[0], "images": ["imgs/1.jpg", "imgs/2.jpg"]},
     r"1 <image> placeholder\(s\) in the prompt but 2 image\(s\)"),
    ({**PAIR_RECORDS[0], "query": "Who is he?"}, r"0 <image> placeholder\(s\) in the prompt but 1 image\(s\)"),
    ({**PAIR_RECORDS[0], "query": "<image><image>Who?"}, r"2 <image> placeholder\(s\) in the prompt but 1 image"),
    ({**PAIR_RECORDS[0], "query": "Who?", "response": "<image>"}, r"0 <image> placeholder"),
    ({**PAIR_RECORDS[0], "rejected_response": "A <image> cat."}, r"the rejected response contains <image>"),
])
def test_placeholder_image_count_mismatch(tmp_path, shared_data, proc, rec, msg):
    f = _write(tmp_path, shared_data, [rec])
    with pytest.raises(BadRecord, match=rf"{f}:1: {msg}") as e:
        _prepare_first(f, proc)
    assert e.value.reason == "image_count_mismatch"


def test_image_cache_key_follows_the_dataset_location(proc, tmp_path):
    """Image paths are cached resolved against the dataset's folder: the same records in another
    folder (a moved or copied dataset) must not reuse the first folder's cache, whose paths point
    at the old images. Text keys stay location-independent."""
    from mcore_align.data.config import DataConfig
    from mcore_align.data.store import cache_key

    keys = {}
    for where in ("a", "b"):
        d = tmp_path / where
        d.mkdir()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "red.png")
        (d / "d.jsonl").write_text(json.dumps({"query": "<image>Colour?", "response": "red", "rejected_response": "blue",
                                               "images": ["red.png"]}) + "\n")
        cfg = DataConfig(dataset=[str(d / "d.jsonl")], cache_dir=str(tmp_path / "cache"))
        keys[where] = (cache_key(cfg, proc.proc.tokenizer, "paired", proc),
                       cache_key(cfg, proc.proc.tokenizer, "paired"))
    assert keys["a"][0] != keys["b"][0]
    assert keys["a"][1] == keys["b"][1]
