"""``score.score_hf`` on an exported Qwen-VL reward model (backbone + value_head.safetensors):
transformers' Qwen2-VL / Qwen2.5-VL build their M-RoPE positions only when given
``mm_token_type_ids`` (1 at image tokens) beside ``image_grid_thw``; without them Qwen2-VL raises
and Qwen2.5-VL silently uses 1-D positions. The scores must equal the backbone's with M-RoPE."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_score_hf_uses_mrope_positions(tmp_path, version):
    from PIL import Image
    from safetensors.torch import save_file
    import transformers

    from mcore_align.data.images import ImageEncoder
    from mcore_align.models.heads import VALUE_HEAD_FILE, VALUE_HEAD_KEY
    from mcore_align.models.tiny_vision import make_tiny_qwen2_vl
    from mcore_align.score import _vision_processor, score_hf, tokenized_records

    hf = make_tiny_qwen2_vl(tmp_path / "hf", version) or tmp_path / "hf"
    cfg = json.loads((hf / "config.json").read_text())
    hidden = cfg.get("text_config", {}).get("hidden_size") or cfg["hidden_size"]
    head_1H = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0))
    save_file({VALUE_HEAD_KEY: head_1H}, str(hf / VALUE_HEAD_FILE))
    Image.new("RGB", (32, 32), (220, 40, 40)).save(tmp_path / "red.png")
    ds = tmp_path / "d.jsonl"
    ds.write_text(json.dumps({"query": "<image>What colour is this picture?", "response": "It is red.",
                              "rejected_response": "It is blue.", "images": ["red.png"]}) + "\n")
    got = torch.tensor(score_hf(hf, [str(ds)], paired=True), dtype=torch.float64)  # [1, 2]

    # reference: transformers' backbone in float64 with explicit M-RoPE inputs
    cls = {"2": "Qwen2VLForConditionalGeneration", "2.5": "Qwen2_5_VLForConditionalGeneration"}[version]
    model = getattr(transformers, cls).from_pretrained(hf, dtype=torch.float64).eval()
    vision = _vision_processor(hf)
    records, images = tokenized_records(vision.proc.tokenizer, [str(ds)], paired=True, max_length=256,
                                        cache_dir=str(tmp_path / "cache"), vision=vision, with_images=True)
    enc = ImageEncoder(vision)
    want = []
    with torch.no_grad():
        for t, paths in zip(records[0], images[0]):
            ids = torch.from_numpy(t)[None]
            inputs = enc.sequence_inputs(paths)
            assert int((ids == model.config.image_token_id).sum()) > 0
            h = model.model(input_ids=ids, pixel_values=inputs["pixel_values"].double(),
                            image_grid_thw=inputs["image_grid_thw"],
                            mm_token_type_ids=(ids == model.config.image_token_id).int()).last_hidden_state
            want.append(float(h[0, -1] @ head_1H[0].double()))
    torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float64), rtol=0, atol=1e-4)
