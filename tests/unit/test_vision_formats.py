"""Image data formats beyond the basic ones: ms-swift ``rejected_images`` (the rejected side
shows other images), RLAIF-V hub columns, KTO records with images, and in-memory images
(bytes in parquet / arrow files, ``datasets`` Image features) stored in the tokenized cache
as content-hashed files, not pixels. References: the HF processor on the original files."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mcore_align.data.batch import ROLE_KL, ROLE_UNPAIRED
from mcore_align.data.config import DataConfig
from mcore_align.data.formats import BadRecord, detect_format
from mcore_align.data.loader import build_data

TOKENS_PER_IMAGE = 16  # tiny CLIP: (32 / 8) ** 2 patches


@pytest.fixture(scope="module")
def proc(ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(ckpt / "tokenizer"))


def _jsonl(tmp_path, shared_data, recs):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for i in range(1, 4):
        shutil.copy(shared_data / "mllm_demo_data" / f"{i}.jpg", tmp_path / "imgs" / f"{i}.jpg")
    # a 4th distinct image: the first one mirrored
    Image.open(tmp_path / "imgs" / "1.jpg").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "imgs" / "4.jpg")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _cfg(tmp_path, ds, **kw):
    return DataConfig(dataset=[ds], cache_dir=str(tmp_path / "cache"), max_length=256,
                      max_tokens_per_micro_batch=4096, val_fraction=0.0, **kw)


def _pixels(proc, img: Image.Image) -> torch.Tensor:
    return proc.image_processor(images=[img.convert("RGB")], return_tensors="pt")["pixel_values"][0]


def _runs_per_sequence(mb, image_id: int) -> list[int]:
    """Number of image-token runs in each packed sequence of ``mb`` (in row order)."""
    out = []
    for i in range(mb.num_sequences):
        a, n = int(mb.cu_seqlens[i]), int(mb.seq_lengths[i])
        tok = mb.tokens.reshape(-1)[a:a + n].numpy()
        n_tok = int((tok == image_id).sum())  # (adjacent <image><image> make one longer run)
        assert n_tok % TOKENS_PER_IMAGE == 0, n_tok
        out.append(n_tok // TOKENS_PER_IMAGE)
    return out


def _check_row_images(mb, gb, expected, proc):
    """Every image-token run of ``mb`` gets the HF processor's pixels of the image the raw
    record gives that sequence: ``expected[(record id, role)]`` -> list of PIL images."""
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    runs = _runs_per_sequence(mb, image_id)
    idx, k = mb.images["image_index"], 0
    assert len(idx) == sum(runs)
    for i, n in enumerate(runs):
        want = expected[(gb.record_ids[int(mb.pair_index[i])], int(mb.seq_role[i]))]
        assert len(want) == n
        for img in want:
            torch.testing.assert_close(mb.images["pixel_values"][idx[k]], _pixels(proc, img))
            k += 1


# ---- ms-swift rejected_images ------------------------------------------------------------
def test_rejected_images_give_the_rejected_side_its_own_images(tmp_path, shared_data, tok, proc):
    recs = [
        {"query": "<image>What is it?", "response": "A.", "rejected_response": "B.", "images": ["imgs/1.jpg"],
         "rejected_images": ["imgs/2.jpg"]},
        {"query": "<image>Shared?", "response": "Yes.", "rejected_response": "No.", "images": ["imgs/3.jpg"]},
        {"query": "<image><image>Two?", "response": "C.", "rejected_response": "D.",
         "images": ["imgs/1.jpg", "imgs/4.jpg"], "rejected_images": ["imgs/3.jpg", "imgs/1.jpg"]},
    ]
    ds = _jsonl(tmp_path, shared_data, recs)
    data = build_data(_cfg(tmp_path, ds), tok, "paired", global_batch_size=3)
    st = data.train.store
    img = {i: Image.open(tmp_path / "imgs" / f"{i}.jpg") for i in range(1, 5)}
    files = lambda r, key: [str((tmp_path / p).resolve()) for p in r[key]]  # noqa: E731
    for r, rec in enumerate(recs):
        c, j = st.rec_seq[r]
        assert st.seq_images(c) == files(rec, "images")
        assert st.seq_images(j) == files(rec, "rejected_images" if "rejected_images" in rec else "images")
        # the prompt text (and its image tokens) is shared: LLaVA-1.5 gives every image 16 tokens
        assert st.seq_plen[c] == st.seq_plen[j]
        np.testing.assert_array_equal(st.seq(c)[0][:st.seq_plen[c]], st.seq(j)[0][:st.seq_plen[j]])
    gb = next(iter(data.train))
    (mb,) = gb.micro_batches
    # each distinct image of the micro-batch once through the tower: 1, 2, 3, 4
    assert mb.images["pixel_values"].shape[0] == 4
    expected = {}
    for r, rec in enumerate(recs):
        expected[(r, 0)] = [img[int(p[5])] for p in rec["images"]]
        expected[(r, 1)] = [img[int(p[5])] for p in rec.get("rejected_images", rec["images"])]
    _check_row_images(mb, gb, expected, proc)


def test_rejected_images_count_must_match_placeholders(tmp_path, shared_data, tok):
    ds = _jsonl(tmp_path, shared_data, [{"query": "<image>Hi", "response": "A.", "rejected_response": "B.",
                                         "images": ["imgs/1.jpg"], "rejected_images": ["imgs/1.jpg", "imgs/2.jpg"]}])
    with pytest.raises(BadRecord, match=r"d\.jsonl:1: 1 <image> placeholder\(s\) in the prompt but 2 image\(s\) "
                                        r"in 'rejected_images'") as e:
        build_data(_cfg(tmp_path, ds), tok, "paired", global_batch_size=1)
    assert e.value.reason == "image_count_mismatch"


# ---- KTO with images -----------------------------------------------------------------------
def test_kto_records_with_images_and_their_kl_sequences(tmp_path, shared_data, tok, proc):
    recs = [{"messages": [{"role": "user", "content": f"<image>Describe {i}."},
                          {"role": "assistant", "content": f"Answer {i}."}],
             "label": bool(i % 2), "images": [f"imgs/{i}.jpg"]} for i in range(1, 5)]
    ds = _jsonl(tmp_path, shared_data, recs)
    data = build_data(_cfg(tmp_path, ds), tok, "kto", global_batch_size=4)
    gb = next(iter(data.train))
    (mb,) = gb.micro_batches
    roles = mb.seq_role.tolist()
    assert roles.count(ROLE_UNPAIRED) == 4 and roles.count(ROLE_KL) == 4
    # the KL sequence (this prompt + another example's completion) shows its own prompt's image
    img = {i: Image.open(tmp_path / "imgs" / f"{i}.jpg") for i in range(1, 5)}
    expected = {(r, role): [img[r + 1]] for r in range(4) for role in (ROLE_UNPAIRED, ROLE_KL)}
    _check_row_images(mb, gb, expected, proc)
    assert mb.images["pixel_values"].shape[0] == 4
    assert sorted(mb.kto_label.tolist()) == [False] * 4 + [True] * 4


# ---- RLAIF-V columns, in-memory images in parquet / arrow ----------------------------------------
def _rlaif_rows(shared_data, n=3):
    rows = []
    for i in range(n):
        raw = (shared_data / "mllm_demo_data" / f"{i + 1}.jpg").read_bytes()
        rows.append({"ds_name": "demo", "image": {"bytes": raw, "path": f"{i + 1}.jpg"},
                     "question": f"What is shown in picture {i}?", "chosen": f"Picture {i}.", "rejected": "Nothing.",
                     "origin_dataset": "x", "origin_split": "y", "idx": i, "image_path": f"img/{i}.jpg"})
    return rows


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_rlaif_v_parquet_with_image_bytes(tmp_path, shared_data, tok, proc):
    rows = _rlaif_rows(shared_data)
    assert detect_format(rows[0], "x") == "rlaif_v"
    ds = _write_parquet(tmp_path / "rlaif.parquet", rows)
    data = build_data(_cfg(tmp_path, ds), tok, "paired", global_batch_size=3)
    st = data.train.store
    assert st.meta["formats"] == {ds: "rlaif_v"}
    # the cache holds references to content-hashed copies of the encoded bytes, not pixels
    for r, row in enumerate(rows):
        c, j = st.rec_seq[r]
        digest = hashlib.blake2b(row["image"]["bytes"], digest_size=20).hexdigest()
        assert st.image_paths[int(st.seq_img[c][0])] == f"images/{digest}"
        assert st.seq_images(c) == st.seq_images(j) == [str(st.path / "images" / digest)]
        assert (st.path / "images" / digest).read_bytes() == row["image"]["bytes"]
    # ms-swift maps question -> query and puts the image in front of a question without <image>:
    # token ids equal LlavaProcessor's expansion of that rendered prompt
    ex_text = tok.apply_chat_template([{"role": "user", "content": "<image>" + rows[0]["question"]},
                                       {"role": "assistant", "content": rows[0]["chosen"]}], tokenize=False)
    ref = proc(text=[ex_text], images=[Image.open(shared_data / "mllm_demo_data" / "1.jpg").convert("RGB")],
               return_tensors="np", add_special_tokens=False)["input_ids"][0]
    np.testing.assert_array_equal(st.seq(int(st.rec_seq[0][0]))[0], ref)
    gb = next(iter(data.train))
    (mb,) = gb.micro_batches
    img = {r: Image.open(shared_data / "mllm_demo_data" / f"{r + 1}.jpg") for r in range(3)}
    _check_row_images(mb, gb, {(r, role): [img[r]] for r in range(3) for role in (0, 1)}, proc)
    assert mb.images["pixel_values"].shape[0] == 3


def test_rlaif_v_arrow_ipc_file_equals_parquet(tmp_path, shared_data, tok):
    """The same rows as an Arrow IPC *file* (pyarrow's format; `datasets` writes the stream
    format, covered below): the same cache arrays and image references as the parquet."""
    import pyarrow as pa

    rows = _rlaif_rows(shared_data)
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_file(str(tmp_path / "rlaif.arrow"), table.schema) as w:
        w.write_table(table)
    pq_store = build_data(_cfg(tmp_path / "a", _write_parquet(tmp_path / "rlaif.parquet", rows)), tok, "paired",
                          global_batch_size=3).train.store
    ar_store = build_data(_cfg(tmp_path / "b", str(tmp_path / "rlaif.arrow")), tok, "paired",
                          global_batch_size=3).train.store
    np.testing.assert_array_equal(np.asarray(ar_store.tokens), np.asarray(pq_store.tokens))
    assert ar_store.image_paths == pq_store.image_paths


def test_corrupt_image_bytes_name_row_and_column(tmp_path, shared_data, tok):
    rows = _rlaif_rows(shared_data)
    rows[1]["image"] = {"bytes": b"\x89PNG not an image", "path": None}
    ds = _write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(BadRecord, match=r"bad\.parquet\[row 1\]: image in column 'image' \(in-memory\) cannot be "
                                        r"read as an image") as e:
        build_data(_cfg(tmp_path, ds), tok, "paired", global_batch_size=1)
    assert e.value.reason == "corrupt_image"
    data = build_data(_cfg(tmp_path, ds, on_bad_record="skip"), tok, "paired", global_batch_size=1)
    assert data.report["dropped"] == {"corrupt_image": 1}


def test_datasets_image_features_parquet_and_arrow(tmp_path, shared_data, tok):
    """A `datasets` Dataset with an Image feature (decoded to PIL when iterated) written by
    `to_parquet` and by `save_to_disk` (arrow): both give the cache of the same records given
    as plain image files, token for token and pixel for pixel."""
    import datasets

    files = [str(shared_data / "mllm_demo_data" / f"{i}.jpg") for i in (1, 2, 3)]
    cols = {"query": [f"<image>Q{i}?" for i in range(3)], "response": ["a", "b", "c"],
            "rejected_response": ["x", "y", "z"], "images": [[f] for f in files]}
    # encoded bytes, as datasets stores images that did not come from a local file
    mem = {**cols, "images": [[{"bytes": open(f, "rb").read(), "path": None}] for f in files]}
    hf = datasets.Dataset.from_dict(mem).cast_column("images", datasets.Sequence(datasets.Image()))
    assert hasattr(hf[0]["images"][0], "convert")  # PIL when read through datasets
    hf.to_parquet(str(tmp_path / "hf.parquet"))
    hf.save_to_disk(str(tmp_path / "hf_disk"))
    ref = _jsonl(tmp_path, shared_data, [{k: v[i] for k, v in cols.items()} for i in range(3)])
    stores = {}
    for name, ds in (("files", ref), ("parquet", str(tmp_path / "hf.parquet")), ("arrow", str(tmp_path / "hf_disk"))):
        d = build_data(_cfg(tmp_path / name, ds), tok, "paired", global_batch_size=3)
        stores[name] = (d.train.store, next(iter(d.train)).micro_batches[0])
    st0, mb0 = stores["files"]
    for name in ("parquet", "arrow"):
        st, mb = stores[name]
        assert all(p.startswith("images/") for p in st.image_paths), st.image_paths
        np.testing.assert_array_equal(np.asarray(st.tokens), np.asarray(st0.tokens))
        torch.testing.assert_close(mb.images["pixel_values"], mb0.images["pixel_values"], rtol=0, atol=0)
        assert torch.equal(mb.images["image_index"], mb0.images["image_index"])


def test_pil_images_in_records_are_cached_as_png(tmp_path, shared_data, tok, proc):
    """Records that hold decoded PIL images (a hub dataset iterated with decoding on) are cached
    as lossless PNG files: the loader's pixels equal the processor's on the original image."""
    from mcore_align.data.store import prepare_record
    from mcore_align.data.images import VisionProcessor
    from mcore_align.data.tokenization import RecordTokenizer

    vp = VisionProcessor(proc)
    im = Image.open(shared_data / "mllm_demo_data" / "2.jpg")
    raw = {"query": "<image>Who?", "response": "a", "rejected_response": "b", "images": [im]}
    rt = RecordTokenizer(tok, "paired", 256, "delete", False)
    *_, images = prepare_record(rt, _cfg(tmp_path, "x"), "swift", "hub[row 0]", raw, vision=vp)
    (png,) = images[0]
    assert isinstance(png, bytes) and png[:4] == b"\x89PNG"
    import io

    torch.testing.assert_close(_pixels(proc, Image.open(io.BytesIO(png))), _pixels(proc, im), rtol=0, atol=0)


# ---- tools/preprocess_data.py on image datasets ----------------------------------------------
@pytest.mark.parametrize("workers,chunk", [(1, 1024), (2, 2)])
def test_preprocess_builds_the_trainers_image_cache(tmp_path, shared_data, ckpt, tok, workers, chunk):
    """A vision checkpoint's tokenizer: tools/preprocess_data.py expands images exactly as the
    trainer's own build: same cache folder (key includes the image processor), arrays, meta,
    image references and in-memory image files; the trainer then opens it without building."""
    import sys

    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "tools"))
    from preprocess_data import preprocess

    from mcore_align.data.images import model_kind_of_tokenizer
    from mcore_align.data.store import _ARRAYS, load_or_build_store

    files = _jsonl(tmp_path, shared_data, [
        {"query": "<image>What is it?", "response": "A.", "rejected_response": "B.", "images": ["imgs/1.jpg"],
         "rejected_images": ["imgs/2.jpg"]},
        {"query": "No image.", "response": "C.", "rejected_response": "D."},
        {"query": "<image>Missing?", "response": "E.", "rejected_response": "F.", "images": ["imgs/nope.jpg"]},
        {"query": "<image><image>Two?", "response": "G.", "rejected_response": "H.",
         "images": ["imgs/3.jpg", "imgs/4.jpg"]}])
    mem = _write_parquet(tmp_path / "rlaif.parquet", _rlaif_rows(shared_data))
    ref_cfg = DataConfig(dataset=[files, mem], cache_dir=str(tmp_path / "ref"), max_length=256, on_bad_record="skip")
    kind, vision = model_kind_of_tokenizer(tok)
    assert kind == "vision"
    ref = load_or_build_store(ref_cfg, tok, "paired", vision=vision, model_kind=kind)
    assert ref.meta["dropped"] == {"missing_image": 1} and ref.num_records == 6
    mine = DataConfig(dataset=[files, mem], cache_dir=str(tmp_path / "mine"), max_length=256, on_bad_record="skip")
    stats = preprocess(mine, str(ckpt / "tokenizer"), "paired", workers=workers, chunk=chunk, log=lambda m: None)
    built = tmp_path / "mine" / ref.path.name
    assert stats["built"] and stats["cache"] == str(built)  # the same cache key
    for n, t in _ARRAYS.items():
        np.testing.assert_array_equal(np.fromfile(built / f"{n}.bin", dtype=t),
                                      np.fromfile(ref.path / f"{n}.bin", dtype=t), err_msg=n)
    assert json.loads((built / "meta.json").read_text()) == ref.meta
    assert json.loads((built / "image_paths.json").read_text()) == ref.image_paths
    ref_imgs = sorted(p.name for p in (ref.path / "images").iterdir())
    assert len(ref_imgs) == 3 and sorted(p.name for p in (built / "images").iterdir()) == ref_imgs
    assert load_or_build_store(mine, tok, "paired", vision=vision, model_kind=kind).path == built


def test_hub_style_datasets_keep_image_bytes(tmp_path, shared_data):
    """A dataset loaded with `datasets.load_dataset` (here from a local folder, as from the hub)
    yields its Image features undecoded: the original encoded bytes, not PIL images."""
    import datasets

    from mcore_align.data.formats import _iter_hub

    raw = (shared_data / "mllm_demo_data" / "1.jpg").read_bytes()
    feats = datasets.Features({"query": datasets.Value("string"), "image": datasets.Image(),
                               "images": datasets.Sequence(datasets.Image())})
    hf = datasets.Dataset.from_dict({"query": ["<image>Hi"], "image": [{"bytes": raw, "path": None}],
                                     "images": [[{"bytes": raw, "path": None}]]}, features=feats)
    (tmp_path / "hub").mkdir()
    hf.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    ((loc, rec),) = list(_iter_hub(str(tmp_path / "hub")))
    assert loc.endswith("[row 0]")
    assert rec["image"]["bytes"] == raw and rec["images"][0]["bytes"] == raw


def test_skip_bad_images_drops_unreadable_images_only(tmp_path, shared_data, tok):
    """``data.skip_bad_images=true``: a missing or corrupt image drops its record (counted by
    reason) although ``on_bad_record`` is "error"; without it the first one stops the build
    naming the record and the path; other bad records still stop it."""
    from mcore_align.data.images import model_kind_of_tokenizer
    from mcore_align.data.store import load_or_build_store

    kind, vision = model_kind_of_tokenizer(tok)
    good = {"query": "<image>What is it?", "response": "A.", "rejected_response": "B.", "images": ["imgs/1.jpg"]}
    ds = _jsonl(tmp_path, shared_data, [
        good,
        {"query": "<image>Missing?", "response": "E.", "rejected_response": "F.", "images": ["imgs/nope.jpg"]},
        {"query": "<image>Corrupt?", "response": "G.", "rejected_response": "H.", "images": ["imgs/bad.jpg"]}])
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"not an image")
    store = load_or_build_store(_cfg(tmp_path, ds, skip_bad_images=True), tok, "paired", vision=vision, model_kind=kind)
    assert store.num_records == 1 and store.meta["dropped"] == {"missing_image": 1, "corrupt_image": 1}
    with pytest.raises(ValueError, match=r"d.jsonl:2: .*nope.jpg"):
        load_or_build_store(_cfg(tmp_path, ds), tok, "paired", vision=vision, model_kind=kind)
    mismatch = _jsonl(tmp_path, shared_data, [good, {**good, "query": "<image><image>Two?"}])  # 2 placeholders, 1 image
    with pytest.raises(ValueError, match="d.jsonl:2: 2 <image> placeholder"):
        load_or_build_store(_cfg(tmp_path, mismatch, skip_bad_images=True), tok, "paired", vision=vision,
                            model_kind=kind)
