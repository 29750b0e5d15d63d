"""The trainer's data side for vision-language models: the tokenized cache keeps image
references (not pixels) and image tokens count in lengths; truncation never cuts an image;
micro-batches carry each distinct image once, in placeholder order; a text-only checkpoint
refuses image records."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mcore_align.data.batch import micro_batch_images
from mcore_align.data.config import DataConfig
from mcore_align.data.formats import BadRecord
from mcore_align.data.loader import build_data

TOKENS_PER_IMAGE = 16  # tiny CLIP: (32 / 8) ** 2 patches


def _dataset(tmp_path, shared_data, recs):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for i in (1, 2, 3):
        shutil.copy(shared_data / "mllm_demo_data" / f"{i}.jpg", tmp_path / "imgs" / f"{i}.jpg")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _pair(q, imgs, c="yes", r="no"):
    return {"query": q, "response": c, "rejected_response": r, "images": imgs}


def test_cache_keeps_paths_and_batches_carry_each_image_once(tmp_path, shared_data, ckpt, tok):
    from transformers import AutoProcessor

    recs = [_pair("<image>What is it?", ["imgs/1.jpg"]), _pair("<image>and<image>?", ["imgs/2.jpg", "imgs/3.jpg"]),
            _pair("No image here.", [])]
    ds = _dataset(tmp_path, shared_data, recs)
    cfg = DataConfig(dataset=[ds], cache_dir=str(tmp_path / "cache"), max_length=256, max_tokens_per_micro_batch=2048)
    data = build_data(cfg, tok, "paired", global_batch_size=3)
    st = data.train.store
    # references resolved relative to the dataset file, not pixels
    assert st.image_paths == [str((tmp_path / "imgs" / f"{i}.jpg").resolve()) for i in (1, 2, 3)]
    assert not any(p.suffix == ".npy" for p in st.path.iterdir())
    image_id = AutoProcessor.from_pretrained(str(ckpt / "tokenizer")).tokenizer.convert_tokens_to_ids("<image>")
    for r, n_img in enumerate((1, 2, 0)):
        c, j = st.rec_seq[r]
        assert st.seq_images(c) == st.seq_images(j) == st.image_paths[[0, 1, 3][r]:[0, 1, 3][r] + n_img]
        for s in (c, j):  # lengths include the image tokens
            tok_s, tgt_s = st.seq(s)
            assert int((tok_s == image_id).sum()) == TOKENS_PER_IMAGE * n_img
            assert not tgt_s[tok_s == image_id].any()
    gb = next(iter(data.train))
    (mb,) = gb.micro_batches
    runs = []  # image-token runs of the packed row, in order
    flat = mb.tokens.reshape(-1).numpy()
    is_img = np.concatenate([[0], (flat == image_id).astype(int), [0]])
    starts, ends = np.flatnonzero(np.diff(is_img) == 1), np.flatnonzero(np.diff(is_img) == -1)
    runs = list(ends - starts)
    assert runs == [TOKENS_PER_IMAGE] * 6  # 3 images, each in chosen and rejected
    assert mb.images["pixel_values"].shape[0] == 3  # each distinct image once
    idx = mb.images["image_index"]
    assert len(idx) == 6
    # Independent reference: the HF processor's pixels of the image of each run.
    proc = AutoProcessor.from_pretrained(str(ckpt / "tokenizer"))
    paths_in_row = [p for i in range(mb.num_sequences) for p in
                    st.seq_images(int(st.rec_seq[gb.record_ids[int(mb.pair_index[i])], int(mb.seq_role[i])]))]
    for k, p in enumerate(paths_in_row):
        ref = proc.image_processor(images=[Image.open(p).convert("RGB")], return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(mb.images["pixel_values"][idx[k]], ref)


def test_micro_batch_images_order():
    class Enc:
        def encode(self, p):
            return {"pixel_values": torch.full((1, 1), float(ord(p)))}

    out = micro_batch_images([["a"], ["a"], ["b", "c"], ["b", "c"], []], Enc())
    assert out["pixel_values"].reshape(-1).tolist() == [ord("a"), ord("b"), ord("c")]
    assert out["image_index"].tolist() == [0, 0, 1, 2, 1, 2]
    assert micro_batch_images([[], []], Enc()) == {}


def test_truncation_that_cuts_an_image_drops_the_record(tmp_path, shared_data, tok):
    long = " ".join(["word"] * 60)
    recs = [_pair(f"<image>{long}", ["imgs/1.jpg"]),  # left cut removes image tokens -> dropped
            _pair(f"{long} <image>?", ["imgs/2.jpg"]),  # left cut only removes text -> kept
            _pair("<image>short", ["imgs/3.jpg"])]
    ds = _dataset(tmp_path, shared_data, recs)
    cfg = DataConfig(dataset=[ds], cache_dir=str(tmp_path / "cache"), max_length=60,
                     truncation_strategy="truncation_left", max_tokens_per_micro_batch=256)
    data = build_data(cfg, tok, "paired", global_batch_size=1)
    assert data.report["dropped"] == {"image_cut_by_truncation": 1}, data.report["dropped"]
    assert data.report["records_kept"] == 2
    assert data.report["warnings"].get("truncated_left") == 1


def test_text_only_checkpoint_refuses_image_records(tmp_path, shared_data, tok):
    ckpt = tmp_path / "textckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    tok.save_pretrained(ckpt / "tokenizer")
    (ckpt / "model_spec.json").write_text(json.dumps({"dtype": "fp32", "model_spec": {"family": "qwen2"}}))
    from transformers import AutoTokenizer

    text_tok = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    ds = _dataset(tmp_path, shared_data, [_pair("<image>Hi", ["imgs/1.jpg"]), _pair("Hello", [])])
    cfg = DataConfig(dataset=[ds], cache_dir=str(tmp_path / "cache"), max_length=128, max_tokens_per_micro_batch=256)
    with pytest.raises(BadRecord, match=r"d\.jsonl:1: the record has 1 image\(s\) but the model is text-only"):
        build_data(cfg, text_tok, "paired", global_batch_size=1)
    cfg = DataConfig(dataset=[ds], cache_dir=str(tmp_path / "cache"), max_length=128, max_tokens_per_micro_batch=256,
                     on_bad_record="skip")
    data = build_data(cfg, text_tok, "paired", global_batch_size=1)
    assert data.report["dropped"] == {"images_on_text_model": 1}
    assert data.train.image_encoder is None


def test_vit_lr_needs_a_trainable_tower():
    from mcore_align.config import ModelConfig

    with pytest.raises(ValueError, match=r"model\.vit_lr=1e-05 has no effect: the vision tower is frozen "
                                         r"\(freeze_vit=true\); set model\.freeze_vit=false"):
        ModelConfig(load="x", vit_lr=1e-5)
    with pytest.raises(ValueError, match=r"frozen \(train_type=lora freezes its weights; its adapters train at optim\.learning_rate\)"):
        ModelConfig(load="x", vit_lr=1e-5, freeze_vit=False, train_type="lora")
    with pytest.raises(ValueError, match=r"model\.vit_lr must be > 0, got -1"):
        ModelConfig(load="x", vit_lr=-1.0, freeze_vit=False)
    assert ModelConfig(load="x", vit_lr=1e-5, freeze_vit=False).vit_lr == 1e-5
    m = ModelConfig(load="x", freeze_vit="false")
    assert m.freeze_vit is False and m.freeze_aligner is True


def test_lora_config_reaches_the_unfrozen_vision_parts():
    from mcore_align.config import ModelConfig

    assert ModelConfig(load="x", train_type="lora").lora_config().vision_children == ()
    assert ModelConfig(load="x", train_type="lora", freeze_vit=False).lora_config().vision_children == ("vit",)
    assert ModelConfig(load="x", train_type="lora", freeze_vit=False,
                       freeze_aligner=False).lora_config().vision_children == ("vit", "aligner")
