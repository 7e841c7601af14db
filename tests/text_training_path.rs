//! The training path of the text tower (our differentiable ops, the shared-prefix forward)
//! against candle's generic composite path: same features and same context gradients, for
//! every class-token position and for class-specific contexts.

use candle_core::{Device, Tensor, Var};
use textrefiner_explorer::clip::tokenizer::ClipTokenizer;
use textrefiner_explorer::clip::{kernels, Clip};
use textrefiner_explorer::coop::{ClassTokenPosition, CoopOptions, PromptLearner};

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / n.max(1e-12)
}

#[test]
fn shared_prefix_and_custom_backward_match_the_composite_path() {
    let clip = Clip::load("embedded", &Device::Cpu).unwrap();
    let tok = ClipTokenizer::new();
    let names: Vec<String> = [
        "red kite",
        "blue fish with a striped tail",
        "moth",
        "green beetle with three black spots",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (position, class_specific) in [
        (ClassTokenPosition::End, false),
        (ClassTokenPosition::Middle, false),
        (ClassTokenPosition::Front, false),
        (ClassTokenPosition::End, true),
    ] {
        let opts = CoopOptions {
            n_ctx: 4,
            init: None,
            class_specific,
            position,
            seed: 3,
        };
        let learner = PromptLearner::new(&clip, &tok, &names, &opts).unwrap();
        let w = Tensor::randn(
            0f32,
            1.0,
            (names.len(), clip.config.projection_dim),
            &Device::Cpu,
        )
        .unwrap();
        let run = |fused: bool| {
            kernels::set_enabled(fused);
            let ctx = Var::from_tensor(&learner.ctx.as_tensor().copy().unwrap()).unwrap();
            let mut l = learner.clone();
            l.ctx = ctx.clone();
            let f = l.text_features(&clip).unwrap();
            let g = (&f * &w).unwrap().sum_all().unwrap().backward().unwrap();
            kernels::set_enabled(true);
            (f, g.get(ctx.as_tensor()).unwrap().clone())
        };
        let (f_ours, g_ours) = run(true);
        let (f_ref, g_ref) = run(false);
        let (rf, rg) = (rel(&f_ours, &f_ref), rel(&g_ours, &g_ref));
        println!("{position:?} class_specific={class_specific}: features {rf:.2e}, ctx gradient {rg:.2e}");
        assert!(
            rf < 1e-5 && rg < 1e-5,
            "{position:?} {class_specific}: {rf} {rg}"
        );
    }
}
