"""PyTorch reference for `textrefiner-explorer bench-train`: one CoOp (+ TextRefiner) training
step written in plain PyTorch, float32, CPU, timed after one warm-up. Prints
{"times": [seconds per step]} as JSON.

--kind step       the step on precomputed image features (what the explorer does): prompts
                  "[SOS] X X X X <class>. [EOT]" at the exact length of the longest one (the ids
                  come from the Rust tokenizer through --ids), the frozen B/16-size text tower
                  forward and backward, TextRefiner's cache read, aggregation, local transform
                  on 32 x 197 local tokens, the three losses, SGD (momentum 0.9, wd 5e-4), and
                  the cache write.
--kind reference  the reference step as users run it: the frozen ViT-B/16 image tower on 32
                  fresh 224 x 224 images (no gradient), prompts padded to 77 tokens, then the
                  same text / TextRefiner step.

Random weights at the real sizes (transformers' CLIPModel, default attention). Needs torch and
transformers (a throw-away venv is fine).
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

ALPHA, MOMENTUM, BALANCE, DISTILL = 0.2, 0.8, 50.0, 20.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", required=True)
    ap.add_argument("--kind", default="step")
    ap.add_argument("--method", default="coop-refiner")
    ap.add_argument("--n-ctx", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    reference = a.kind == "reference"
    cfg = CLIPConfig(vision_config=dict(patch_size=16, num_hidden_layers=12 if reference else 1))
    model = CLIPModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tm = model.text_model
    d = cfg.projection_dim
    with open(a.ids) as f:
        rows = json.load(f)
    C = len(rows)
    L = 77 if reference else max(len(r) for r in rows)
    ids = torch.zeros(C, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    eot = torch.tensor([r.index(49407) for r in rows])
    n = a.n_ctx
    with torch.no_grad():
        emb = tm.embeddings.token_embedding(ids)
    prefix, suffix = emb[:, :1], emb[:, 1 + n:]
    ctx = nn.Parameter(emb[0, 1:1 + n].clone())
    params = [ctx]
    refiner = a.method == "coop-refiner"
    if refiner:
        mid = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, d)).train()
        extractor = nn.Linear(2 * d, d, bias=False)
        cache = F.normalize(torch.rand(25, d), dim=1)
        params += list(mid.parameters()) + list(extractor.parameters())
    opt = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    B = a.batch
    N = 197
    labels = torch.randint(0, C, (B,))
    img_feat = F.normalize(torch.randn(B, d), dim=1)
    local = torch.randn(B, N, d)
    cls_attn = F.softmax(torch.randn(B, N - 1), dim=1)
    mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
    scale = 100.0

    def step():
        nonlocal cache
        if reference:
            with torch.no_grad():
                px = torch.randn(B, 3, 224, 224)
                h = model.vision_model(pixel_values=px).last_hidden_state
                h = model.visual_projection(model.vision_model.post_layernorm(h))
                img, loc = F.normalize(h[:, 0], dim=1), h
        else:
            img, loc = img_feat, local
        prompts = torch.cat([prefix, ctx[None].expand(C, -1, -1), suffix], dim=1)
        x = tm.embeddings(inputs_embeds=prompts)
        for layer in tm.encoder.layers:
            x = layer(x, mask)
            if isinstance(x, tuple):
                x = x[0]
        x = tm.final_layer_norm(x)
        t = F.normalize(model.text_projection(x[torch.arange(C), eot]), dim=1)
        if not refiner:
            loss = F.cross_entropy(scale * img @ t.t(), labels)
        else:
            fine = F.softmax(t @ cache.t(), dim=1) @ cache
            refined = ALPHA * extractor(torch.cat([t, fine], dim=1)) + t
            l_global = F.cross_entropy(scale * img @ refined.t(), labels)
            trans = F.normalize(mid(loc.reshape(B * N, d)), dim=1).reshape(B, N, d)
            top = cls_attn.topk(5, dim=1).indices + 1
            idx = torch.cat([torch.zeros(B, 1, dtype=torch.long), top], dim=1)
            picked = trans.gather(1, idx[..., None].expand(-1, -1, d))
            tok7 = torch.cat([picked, trans.mean(1, keepdim=True)], dim=1).reshape(B * 7, d)
            l_local = F.cross_entropy(scale * tok7 @ t.t(), labels.repeat_interleave(7))
            l_reg = (F.normalize(refined, dim=1) - t).abs().mean()
            loss = l_global + l_local / BALANCE + DISTILL * l_reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        if refiner:
            with torch.no_grad():
                tk = trans.reshape(B * N, d)
                s = tk @ cache.t()
                a_q = F.softmax(s, dim=0)
                w = a_q / a_q.max(dim=0, keepdim=True).values
                assign = s.argmax(dim=1)
                onehot = F.one_hot(assign, cache.shape[0]).float() * w
                upd = onehot.t() @ tk
                hit = onehot.sum(0) > 0
                new = torch.where(hit[:, None], MOMENTUM * cache + (1 - MOMENTUM) * upd, cache)
                cache = F.normalize(new, dim=1)
        return loss.item()

    step()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "threads": torch.get_num_threads(), "seq_len": L}))


if __name__ == "__main__":
    main()
