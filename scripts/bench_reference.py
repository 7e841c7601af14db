"""PyTorch reference for `textrefiner-explorer bench`: the same workloads with Hugging Face
transformers' CLIP on random weights of the real sizes, float32, CPU, timed after one warm-up.
Prints {"times": [seconds per repetition]} as JSON.

image: vision tower forward + post_layernorm + visual_projection on ALL tokens (what the
       explorer's feature bank needs), default attention (SDPA), batch B of random pixels.
text / text-kernel: 100 prompts ("a photo of a <class>." from bench_classnames.txt, token ids
       from the Rust tokenizer in --ids), padded to 77 tokens as clip.tokenize does.

Needs: pip install torch transformers (a throw-away venv is fine).
"""
import argparse
import json
import time

import torch
from transformers import CLIPConfig, CLIPModel

PRESETS = {
    "b32": dict(vision_config=dict(patch_size=32)),
    "b16": dict(vision_config=dict(patch_size=16)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kind", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ids")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = CLIPModel(CLIPConfig(**PRESETS[a.model])).eval()
    if a.kind == "image":
        x = torch.randn(a.batch, 3, 224, 224)

        def run():
            h = model.vision_model(pixel_values=x).last_hidden_state
            return model.visual_projection(model.vision_model.post_layernorm(h))
    else:
        with open(a.ids) as f:
            rows = json.load(f)[: a.batch]
        ids = torch.zeros(len(rows), 77, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)

        def run():
            return model.get_text_features(input_ids=ids).pooler_output
    run()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
