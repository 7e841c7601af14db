//! The training loop on the demo world with the embedded model: steps lower the loss, cancel
//! stops it, a diverging run stops with a clear message.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use textrefiner_explorer::checkpoint;
use textrefiner_explorer::clip::Clip;
use textrefiner_explorer::data::dataset::{Dataset, Subset};
use textrefiner_explorer::features::{extract, FeatureBank, Views};
use textrefiner_explorer::train::{
    class_features, train, train_checkpointed, Method, TrainConfig, TrainEvent,
};

fn setup(shots: usize) -> (Clip, Vec<String>, textrefiner_explorer::train::Features) {
    let clip = Clip::load("embedded", &Device::Cpu).unwrap();
    let base = Dataset::world(1, 64, 5).subset(Subset::Base);
    let (items, _) = base.few_shot(shots, 1).unwrap();
    let f = extract(
        &clip,
        &FeatureBank::none(),
        &base,
        &items,
        Views::Augmented { count: 2, seed: 1 },
        |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    (clip, base.class_names.clone(), f)
}

/// Cross-entropy of the trained class features (refined ones for TextRefiner) over all rows.
fn eval_loss(
    clip: &Clip,
    t: &textrefiner_explorer::train::Trained,
    names: &[String],
    f: &textrefiner_explorer::train::Features,
) -> f32 {
    let (base, refined) = class_features(clip, t, names).unwrap();
    let w = refined.unwrap_or(base);
    let logits = (f.image.matmul(&w.t().unwrap()).unwrap() * clip.logit_scale as f64).unwrap();
    let labels = candle_core::Tensor::from_vec(f.labels.clone(), f.len(), &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(&logits, &labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn training_lowers_the_loss_for_both_methods() {
    let (clip, names, f) = setup(8);
    assert_eq!(f.views, 2);
    assert_eq!(f.len(), 12 * 8 * 2);
    for method in [Method::Coop, Method::CoopRefiner] {
        let cfg = TrainConfig {
            method,
            epochs: 8,
            warmup_epochs: 0,
            lr: 0.01,
            ..Default::default()
        };
        let untrained = train(
            &clip,
            &names,
            &f,
            &TrainConfig {
                epochs: 0,
                ..cfg.clone()
            },
            &AtomicBool::new(false),
            |_| {},
        )
        .unwrap();
        let mut steps = 0;
        let trained = train(&clip, &names, &f, &cfg, &AtomicBool::new(false), |e| {
            if let TrainEvent::Step { local, reg, .. } = e {
                steps += 1;
                if method == Method::Coop {
                    assert_eq!((*local, *reg), (0.0, 0.0));
                } else {
                    assert!(*local > 0.0 && *reg >= 0.0);
                }
            }
        })
        .unwrap();
        assert_eq!(
            steps,
            8 * 3,
            "one view per image per epoch: 96 images / 32 = 3 steps"
        );
        let (before, after) = (
            eval_loss(&clip, &untrained, &names, &f),
            eval_loss(&clip, &trained, &names, &f),
        );
        println!("{method:?}: training-set loss {before:.4} -> {after:.4}");
        assert!(
            after < before - 0.01,
            "{method:?}: loss {before} -> {after}"
        );
        assert_eq!(trained.epochs_done, 8);
        assert_eq!(trained.refiner.is_some(), method == Method::CoopRefiner);
    }
}

#[test]
fn cancel_stops_mid_epoch() {
    let (clip, names, f) = setup(8);
    let cancel = AtomicBool::new(false);
    let mut steps = 0;
    let err = train(&clip, &names, &f, &TrainConfig::default(), &cancel, |e| {
        if let TrainEvent::Step { .. } = e {
            steps += 1;
            if steps == 2 {
                cancel.store(true, Ordering::Relaxed);
            }
        }
    })
    .unwrap_err();
    assert_eq!(steps, 2);
    assert!(
        err.to_string().contains("cancelled in epoch 1 at step 3"),
        "{err}"
    );
}

#[test]
fn diverging_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint() {
    let (clip, names, f) = setup(4);
    // the warm-up epoch (lr 1e-5) is fine; the next one at lr 1e9 diverges
    let cfg = TrainConfig {
        method: Method::CoopRefiner,
        lr: 1e9,
        warmup_epochs: 1,
        epochs: 5,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("run");
    let err = train_checkpointed(
        &clip,
        &names,
        &f,
        &cfg,
        &AtomicBool::new(false),
        |_| {},
        |t| checkpoint::save(&stem, &clip, t, serde_json::Value::Null),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("training stopped") && err.contains("loss became"),
        "{err}"
    );
    let failed_epoch: usize = err
        .split("in epoch ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(failed_epoch >= 2);
    let (kept, meta) = checkpoint::load(&stem, &clip, &Device::Cpu).unwrap();
    assert_eq!(
        meta.epochs_done,
        failed_epoch - 1,
        "the checkpoint of the last finished epoch is kept"
    );
    let ctx = kept
        .learner
        .ctx
        .as_tensor()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(ctx.is_finite(), "{ctx}");
}
