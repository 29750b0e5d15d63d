#!/usr/bin/env python
"""Vision-language DPO throughput of mcore_align next to TRL's DPOTrainer: the same tiny
LLaVA-1.5 (mcore_align/models/tiny_vision.py), the same image preference pairs, batch and
machine; plus the share of step time spent in the vision tower (+ projector).

    pip install --target /work/trl-pkgs trl==1.16.0 --no-deps     # scratch; not a dependency
    PYTHONPATH=/work/trl-pkgs python benchmarks/bench_vlm_dpo_vs_trl.py [--steps 8] [--gbs 8]

Data: the three photos of shared/data/mllm_demo_data, each asked the questions of
mllm_demo.json in several phrasings; chosen = that photo's answer, rejected = another
photo's answer (ms-swift records for mcore_align; the same texts, rendered with the same chat
template, as TRL plain-text records with ``<image>`` and a PIL image). Both sides train every
parameter (LLM, CLIP tower and projector: mcore_align ``freeze_vit=false
freeze_aligner=false``, TRL's default) with DPO sigmoid, beta 0.1, a co-resident reference
model, fp32, one process with 2 threads (mcore_align: CPU execution mode, TP=1, packed
micro-batches; TRL: padded batches, ``use_cpu``).

Vision share: module hooks on every ``vision_tower`` / ``multi_modal_projector`` (policy and
reference): forward from the tower's pre-hook to the projector's hook; backward from the
projector's backward pre-hook to the backward hook of the tower's first encoder layer (its
input is the trainable patch embedding). Divided by the summed step times of all steps.
TRL runs the tower on each pair's image twice per model (chosen and rejected rows), mcore_align
once per pair (the pair's sequences share the prompt's image features).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MCORE_ALIGN_DATA", ROOT.parent / "shared" / "data"))

# Timing hooks, shared by both sides (written into each child's script).
HOOKS = r'''
import atexit, json, os, time
_T = {"fwd_s": 0.0, "bwd_s": 0.0, "fwd_calls": 0, "bwd_calls": 0}

def instrument(root):
    """Hook the vision tower(s) and projector(s) under ``root`` (see the benchmark's docstring)."""
    mods = dict(root.named_modules())
    towers = [n for n in mods if n.endswith("vision_tower")]
    for t in towers:
        proj = mods[t[: -len("vision_tower")] + "multi_modal_projector"]
        first = next(m for n, m in mods.items() if n.startswith(t + ".") and n.endswith("layers.0"))
        state = {}
        mods[t].register_forward_pre_hook(lambda m, a, s=state: s.__setitem__("f", time.perf_counter()))
        def fwd_end(m, a, o, s=state):
            _T["fwd_s"] += time.perf_counter() - s.pop("f"); _T["fwd_calls"] += 1
        proj.register_forward_hook(fwd_end)
        proj.register_full_backward_pre_hook(lambda m, g, s=state: s.__setitem__("b", time.perf_counter()))
        def bwd_end(m, gi, go, s=state):
            if "b" in s:
                _T["bwd_s"] += time.perf_counter() - s.pop("b"); _T["bwd_calls"] += 1
        first.register_full_backward_hook(bwd_end)
    return len(towers)

def arm():  # in the main process only (a spawned helper process re-imports __main__)
    atexit.register(lambda: open(os.environ["VISION_TIMES"], "w").write(json.dumps(_T)))
'''

MCORE_SCRIPT = HOOKS + r'''
import sys
if __name__ == "__main__":  # megatron's async checkpoint writer spawns a process that imports __main__
    import mcore_align.models.vision as V
    _orig = V.attach_vision
    def _attach(model, spec, opts):
        _orig(model, spec, opts)
        if getattr(model, "vision", None) is not None:
            instrument(model.vision)
    V.attach_vision = _attach
    arm()
    from mcore_align.train import main
    sys.exit(main(sys.argv[1:]))
'''

TRL_SCRIPT = HOOKS + r'''
import json, sys, time, torch
from datasets import Dataset
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
from trl import DPOConfig, DPOTrainer
hf, data, out = sys.argv[1], sys.argv[2], sys.argv[6]
steps, gbs, max_len = (int(x) for x in sys.argv[3:6])
torch.set_num_threads(2)
proc = AutoProcessor.from_pretrained(hf)
rows = [json.loads(l) for l in open(data)]
for r in rows:
    r["images"] = [Image.open(p).convert("RGB") for p in r["images"]]
ds = Dataset.from_list(rows)
times = []
class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t)
cfg = DPOConfig(output_dir=out, per_device_train_batch_size=gbs, max_steps=steps, learning_rate=1e-5,
                logging_steps=1000, report_to=[], save_strategy="no", max_length=max_len, beta=0.1,
                use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0)
model = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=proc, callbacks=[Timer()])
arm()
n = instrument(trainer.model) + (instrument(trainer.ref_model) if trainer.ref_model is not None else 0)
print("instrumented towers:", n, file=sys.stderr)
trainer.train()
json.dump(times, open(out + "/times.json", "w"))
'''

PHRASINGS = ["{q}", "Look at the picture. {q}", "{q} Answer briefly.", "Question: {q}"]


def make_pairs(work: Path, hf: Path) -> tuple[Path, Path, float]:
    """ms-swift records (mcore_align) and TRL plain-text records (same rendered texts)."""
    from transformers import AutoProcessor

    demo = json.loads((DATA / "mllm_demo.json").read_text())[:3]  # the English records, one per photo
    img_dir = work / "data"
    img_dir.mkdir(parents=True, exist_ok=True)
    qa = []  # (image file, question, answer)
    for r in demo:
        img = Path(r["images"][0]).name
        shutil.copy(DATA / r["images"][0], img_dir / img)
        msgs = r["messages"]
        for u, a in zip(msgs[0::2], msgs[1::2]):
            qa.append((img, u["content"].replace("<image>", "").strip(), a["content"]))
    proc = AutoProcessor.from_pretrained(hf)
    tok = proc.tokenizer
    swift, trl, tokens = [], [], 0
    for i, (img, q, a) in enumerate(qa):
        wrong = qa[(i + 2) % len(qa)][2]  # another photo's answer
        for ph in PHRASINGS:
            query = "<image>" + ph.format(q=q)
            swift.append({"query": query, "response": a, "rejected_response": wrong, "images": [img]})
            prompt = tok.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                             add_generation_prompt=True)
            full = [tok.apply_chat_template([{"role": "user", "content": query}, {"role": "assistant", "content": x}],
                                            tokenize=False) for x in (a, wrong)]
            trl.append({"prompt": prompt, "chosen": full[0][len(prompt):], "rejected": full[1][len(prompt):],
                        "images": [str(img_dir / img)]})
            from PIL import Image

            im = Image.open(img_dir / img).convert("RGB")
            tokens += sum(len(proc(text=f, images=[im], add_special_tokens=False)["input_ids"][0]) for f in full)
    (img_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swift))
    (work / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    return img_dir / "pairs.jsonl", work / "trl.jsonl", tokens / len(swift)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=112, help="px; patch 14 -> (size/14)^2 image tokens")
    p.add_argument("--tokens-per-micro-batch", type=int, default=8192,
                   help="mcore_align's packing budget (8192: a step's 8 pairs in one micro-batch, as TRL's one batch)")
    p.add_argument("--skip-trl", action="store_true")
    a = p.parse_args()
    from mcore_align.checkpoint import convert_hf_to_mcore
    from mcore_align.models.tiny_vision import make_tiny_llava

    work = Path(tempfile.mkdtemp(prefix="bench_vlm_dpo_"))
    hf = make_tiny_llava(work / "hf", "qwen2", num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=4 * a.hidden,
                         num_heads=8, num_kv_heads=2, vision_layers=a.vision_layers, vision_hidden=a.vision_hidden,
                         image_size=a.image_size, patch_size=14)
    convert_hf_to_mcore(hf, work / "mcore", dtype="fp32")
    swift, trl_data, tok_per_pair = make_pairs(work, hf)
    n_pairs = sum(1 for _ in open(swift))
    print(f"{n_pairs} pairs, {tok_per_pair:.0f} real tokens per pair ({(a.image_size // 14) ** 2} image tokens "
          f"per sequence); work dir {work}", flush=True)
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}

    save = work / "mcore_run"
    env["VISION_TIMES"] = str(work / "mcore_vision.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", str(work / "mcore_bench.py"),
           f"model.load={work / 'mcore'}", f"data.dataset=[{swift}]", f"max_length={a.max_length}",
           f"max_tokens_per_micro_batch={a.tokens_per_micro_batch}", f"global_batch_size={a.gbs}", f"train_iters={a.steps}",
           "learning_rate=1e-5", "rpo_alpha=null", "device=cpu", f"train.save={save}", "progress_bar=false",
           "plot=false", f"data.cache_dir={work / 'cache'}", "model.freeze_vit=false", "model.freeze_aligner=false",
           "val_fraction=0"]
    (work / "mcore_bench.py").write_text(MCORE_SCRIPT)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"mcore_align run failed:\n{r.stderr[-4000:]}")
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    results["mcore_align TP=1 (1 proc x 2 threads)"] = ([x["step_time"] for x in rows if "step_time" in x],
                                                        json.loads((work / "mcore_vision.json").read_text()))
    if not a.skip_trl:
        out = work / "trl"
        out.mkdir()
        env["VISION_TIMES"] = str(work / "trl_vision.json")
        r = subprocess.run([sys.executable, "-c", TRL_SCRIPT, str(hf), str(trl_data), str(a.steps), str(a.gbs),
                            str(a.max_length), str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"TRL run failed:\n{r.stderr[-4000:]}")
        results["TRL DPOTrainer (1 proc x 2 threads)"] = (json.loads((out / "times.json").read_text()),
                                                          json.loads((work / "trl_vision.json").read_text()))

    print(f"\nVLM DPO, {a.gbs} pairs/step, LLM hidden {a.hidden} x {a.layers} layers, CLIP hidden {a.vision_hidden} x "
          f"{a.vision_layers} layers at {a.image_size} px, steps 3..{a.steps} (vision share: all steps)")
    print("| run | s/step median (min-max) | pairs/s at median (at min) | real tokens/s at median (at min) "
          "| vs TRL (median / min) | vision fwd+bwd share of step | tower calls fwd/bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    trl_t = results.get("TRL DPOTrainer (1 proc x 2 threads)", (None,))[0]
    for name, (times, vis) in results.items():
        t = times[2:]
        med, lo = statistics.median(t), min(t)
        share = (vis["fwd_s"] + vis["bwd_s"]) / sum(times)
        vs = (f"{statistics.median(trl_t[2:]) / med:.2f}x / {min(trl_t[2:]) / lo:.2f}x" if trl_t else "-")
        print(f"| {name} | {med:.2f} ({lo:.2f}-{max(t):.2f}) | {a.gbs / med:.2f} ({a.gbs / lo:.2f}) | "
              f"{a.gbs / med * tok_per_pair:.0f} ({a.gbs / lo * tok_per_pair:.0f}) | {vs} | {share:.1%} "
              f"(fwd {vis['fwd_s']:.2f} s + bwd {vis['bwd_s']:.2f} s of {sum(times):.1f} s) | "
              f"{vis['fwd_calls']}/{vis['bwd_calls']} |")


if __name__ == "__main__":
    main()
