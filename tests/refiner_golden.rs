//! CoOp + TextRefiner against an independent torch implementation of the spec
//! (tests/fixtures/refiner/make_fixtures.py): cache read and writes, aggregation, the local
//! transform in train and eval mode, the three losses, and the gradients of the context,
//! the extractor and the local transform.
mod common;

use candle_core::{Device, Tensor, Var};
use common::{fixtures, golden, rel_l2};
use textrefiner_explorer::clip::{l2_normalize, Clip};
use textrefiner_explorer::coop::PromptLearner;
use textrefiner_explorer::refiner::{losses, LocalCache, LocalTransform, Refiner, ALPHA};

const TOL: f32 = 1e-5;

fn check(name: &str, a: &Tensor, b: &Tensor) {
    let norm = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    if norm < 1e-5 {
        // Exactly zero in theory (e.g. the bias before a training-mode BatchNorm): compare
        // absolutely, as both sides hold rounding noise only.
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("{name:<22} max abs {diff:.2e} (reference norm {norm:.1e})");
        assert!(diff <= 1e-6, "{name}: max abs difference {diff}");
        return;
    }
    let e = rel_l2(a, b);
    println!("{name:<22} rel L2 {e:.2e}");
    assert!(e <= TOL, "{name}: relative L2 error {e}");
}

#[test]
fn textrefiner_matches_reference() {
    let g = golden("refiner/golden.safetensors");
    let clip = Clip::load(fixtures().join("clip/hf").to_str().unwrap(), &Device::Cpu).unwrap();
    let eot: Vec<usize> = g["eot"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as usize)
        .collect();
    let names: Vec<String> = (0..eot.len()).map(|i| format!("class {i}")).collect();
    let learner = PromptLearner::from_parts(
        Var::from_tensor(&g["ctx"]).unwrap(),
        g["token_embeds"].clone(),
        eot,
        4,
        names,
    );
    let t = l2_normalize(&learner.text_features(&clip).unwrap()).unwrap();
    check("text features", &t, &g["t"]);

    let var = |k: &str| Var::from_tensor(&g[k]).unwrap();
    let mut transform = LocalTransform {
        w1: var("lt_w1"),
        b1: var("lt_b1"),
        bn_w: var("lt_bn_w"),
        bn_b: var("lt_bn_b"),
        w2: var("lt_w2"),
        b2: var("lt_b2"),
        running_mean: g["running_mean0"].clone(),
        running_var: g["running_var0"].clone(),
    };
    let refiner = Refiner {
        transform: transform.clone(),
        cache: LocalCache::from_memory(g["cache0"].clone()),
        extractor: var("extractor"),
        alpha: ALPHA,
    };
    let (fine, refined) = refiner.refine(&t).unwrap();
    check("cache read (fine)", &fine, &g["fine"]);
    check("refined", &refined, &g["refined"]);

    let (b, n, d) = g["local"].dims3().unwrap();
    // the fused training path (what `train` runs)
    let trans = transform
        .forward_train_normalized(&g["local"].reshape((b * n, d)).unwrap())
        .unwrap();
    let trans = trans.reshape((b, n, d)).unwrap();
    check(
        "BN running mean",
        &transform.running_mean,
        &g["running_mean1"],
    );
    check("BN running var", &transform.running_var, &g["running_var1"]);
    let img = l2_normalize(&g["img_embeds"]).unwrap();
    let labels = g["labels"].to_dtype(candle_core::DType::U32).unwrap();
    let scale = g["logit_scale"].to_scalar::<f32>().unwrap() as f64;
    let l = losses(&img, &t, &refined, &trans, &g["cls_attn"], &labels, scale).unwrap();
    check("L_global", &l.global, &g["l_global"]);
    check("L_local", &l.local, &g["l_local"]);
    check("L_reg", &l.reg, &g["l_reg"]);
    check("total loss", &l.total, &g["loss"]);

    let grads = l.total.backward().unwrap();
    check(
        "grad ctx",
        grads.get(learner.ctx.as_tensor()).unwrap(),
        &g["grad_ctx"],
    );
    check(
        "grad extractor",
        grads.get(refiner.extractor.as_tensor()).unwrap(),
        &g["grad_extractor"],
    );
    for (name, v) in [
        ("w1", &transform.w1),
        ("b1", &transform.b1),
        ("bn_w", &transform.bn_w),
        ("bn_b", &transform.bn_b),
        ("w2", &transform.w2),
        ("b2", &transform.b2),
    ] {
        check(
            &format!("grad local {name}"),
            grads.get(v.as_tensor()).unwrap(),
            &g[&format!("grad_lt_{name}")],
        );
    }

    let eval = transform
        .forward(&g["local"].reshape((b * n, d)).unwrap(), false)
        .unwrap();
    check(
        "transform (eval)",
        &l2_normalize(&eval).unwrap(),
        &g["trans_eval"],
    );

    let mut cache = LocalCache::from_memory(g["cache0"].clone());
    let tokens = trans.detach().reshape((b * n, d)).unwrap();
    for k in 0..3 {
        let shifted = l2_normalize(&(&tokens + 0.3 * k as f64).unwrap()).unwrap();
        cache.write(&shifted).unwrap();
        check(
            &format!("cache after write {}", k + 1),
            &cache.memory,
            &g[&format!("cache{}", k + 1)],
        );
    }
}
