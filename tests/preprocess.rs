//! CLIP preprocessing against torchvision + PIL on real photographs
//! (tests/fixtures/preprocess/make_fixtures.py), and the seeded training augmentation.
mod common;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use textrefiner_explorer::clip::preprocess::{
    eval_view, load_rgb, normalize_chw, random_resized_crop_params, train_view,
};

#[test]
fn eval_transform_matches_torchvision() {
    let dir = common::fixtures().join("preprocess");
    let mut worst = 0f32;
    for name in ["chelsea", "coffee", "rocket", "astronaut"] {
        let img = load_rgb(&dir.join(format!("{name}.jpg"))).unwrap();
        for size in [224u32, 96] {
            let ours = normalize_chw(&eval_view(&img, size));
            let reference =
                normalize_chw(&load_rgb(&dir.join(format!("{name}_{size}_ref.png"))).unwrap());
            assert_eq!(ours.len(), reference.len());
            let mad = ours
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / ours.len() as f32;
            println!("{name} {size}px: mean |ours - torchvision| = {mad:.5} (normalised units)");
            worst = worst.max(mad);
            assert!(mad <= 0.02, "{name} {size}: mean absolute difference {mad}");
        }
    }
    println!("worst mean absolute difference {worst:.5}");
}

#[test]
fn augmentation_is_seeded_and_valid() {
    let img = load_rgb(&common::fixtures().join("preprocess/coffee.jpg")).unwrap();
    let a = train_view(&mut ChaCha8Rng::seed_from_u64(7), &img, 64);
    let b = train_view(&mut ChaCha8Rng::seed_from_u64(7), &img, 64);
    let c = train_view(&mut ChaCha8Rng::seed_from_u64(8), &img, 64);
    assert_eq!(a.dimensions(), (64, 64));
    assert_eq!(a, b, "same seed, same view");
    assert_ne!(a, c, "different seed, different view");

    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (w, h) = (600u32, 400u32);
    let mut min_frac = 1f64;
    let mut max_frac = 0f64;
    for _ in 0..2000 {
        let (top, left, ch, cw) = random_resized_crop_params(&mut rng, w, h, (0.08, 1.0));
        assert!(top + ch <= h && left + cw <= w && ch > 0 && cw > 0);
        let frac = (ch * cw) as f64 / (w * h) as f64;
        min_frac = min_frac.min(frac);
        max_frac = max_frac.max(frac);
    }
    // area fraction spans the requested scale range (0.08 .. 1, allowing rounding)
    assert!(min_frac < 0.1 && min_frac > 0.07, "{min_frac}");
    assert!(max_frac > 0.8, "{max_frac}");
}
