//! Our checkpoint format: round trip, clear errors on a model of another size and on a
//! corrupt file, and atomic writes (a failed write leaves the previous checkpoint intact).

use std::sync::atomic::AtomicBool;

use candle_core::Device;
use textrefiner_explorer::checkpoint;
use textrefiner_explorer::clip::Clip;
use textrefiner_explorer::data::dataset::{Dataset, Subset};
use textrefiner_explorer::features::{extract, FeatureBank, Views};
use textrefiner_explorer::train::{class_features, train, Method, TrainConfig};

fn trained() -> (Clip, textrefiner_explorer::train::Trained, Vec<String>) {
    let clip = Clip::load("embedded", &Device::Cpu).unwrap();
    let base = Dataset::world(1, 64, 5).subset(Subset::Base);
    let names = base.class_names.clone();
    let (items, _) = base.few_shot(2, 3).unwrap();
    let f = extract(
        &clip,
        &FeatureBank::none(),
        &base,
        &items,
        Views::Eval,
        |_| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    let cfg = TrainConfig {
        method: Method::CoopRefiner,
        epochs: 2,
        warmup_epochs: 0,
        ..Default::default()
    };
    let t = train(&clip, &names, &f, &cfg, &AtomicBool::new(false), |_| {}).unwrap();
    (clip, t, names)
}

#[test]
fn round_trip_gives_identical_features() {
    let (clip, t, names) = trained();
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("run1");
    checkpoint::save(&stem, &clip, &t, serde_json::json!({"base": 0.5})).unwrap();
    let (back, meta) = checkpoint::load(&stem, &clip, &Device::Cpu).unwrap();
    assert_eq!(meta.class_names, names);
    assert_eq!(meta.epochs_done, 2);
    assert_eq!(meta.metrics["base"], 0.5);
    let (a_t, a_r) = class_features(&clip, &t, &names).unwrap();
    let (b_t, b_r) = class_features(&clip, &back, &names).unwrap();
    let diff = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(diff(&a_t, &b_t) < 1e-6);
    assert!(diff(&a_r.unwrap(), &b_r.unwrap()) < 1e-6);
    let r = back.refiner.unwrap();
    assert_eq!(
        r.transform.running_mean.to_vec1::<f32>().unwrap(),
        t.refiner
            .as_ref()
            .unwrap()
            .transform
            .running_mean
            .to_vec1::<f32>()
            .unwrap()
    );
}

#[test]
fn checkpoint_of_another_model_size_is_explained() {
    let (clip, t, _) = trained();
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("run");
    checkpoint::save(&stem, &clip, &t, serde_json::Value::Null).unwrap();
    // the tiny HF fixture has a 20-d joint space and a 30-wide text tower, the embedded 64/64
    let other = Clip::load(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/clip/hf"),
        &Device::Cpu,
    )
    .unwrap();
    let err = checkpoint::load(&stem, &other, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("run.safetensors")
            && err.contains("ctx has shape [4, 64]")
            && err.contains("another CLIP"),
        "{err}"
    );
}

#[test]
fn corrupt_checkpoint_and_failed_write() {
    let (clip, t, _) = trained();
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("good");
    checkpoint::save(&stem, &clip, &t, serde_json::Value::Null).unwrap();
    let before = std::fs::read(stem.with_extension("safetensors")).unwrap();

    // A write that fails half way (injected: half of the file written, then an error), of the
    // tensors or of the description, leaves the previous pair intact and loadable.
    let json_before = std::fs::read(stem.with_extension("json")).unwrap();
    for failing in ["safetensors", "json"] {
        textrefiner_explorer::util::inject_write_failure(&stem.with_extension(failing));
        let err = checkpoint::save(&stem, &clip, &t, serde_json::json!({"second": true}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("good.{failing}")) && err.contains("half way"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(stem.with_extension("safetensors")).unwrap(),
            before,
            "previous tensors survive"
        );
        assert_eq!(
            std::fs::read(stem.with_extension("json")).unwrap(),
            json_before,
            "previous description survives"
        );
        assert!(checkpoint::load(&stem, &clip, &Device::Cpu).is_ok());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files are removed");
    }
    // a tensors file that does not belong to its description is refused
    let other = dir.path().join("other");
    checkpoint::save(&other, &clip, &t, serde_json::json!({"other": 1})).unwrap();
    let mut ts =
        candle_core::safetensors::load(stem.with_extension("safetensors"), &Device::Cpu).unwrap();
    let ctx = (ts["ctx"].clone() + 1.0).unwrap();
    ts.insert("ctx".into(), ctx);
    textrefiner_explorer::util::save_safetensors_atomic(&other.with_extension("safetensors"), &ts)
        .unwrap();
    let err = checkpoint::load(&other, &clip, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("other.safetensors") && err.contains("does not belong"),
        "{err}"
    );

    let bad = dir.path().join("bad");
    std::fs::copy(stem.with_extension("json"), bad.with_extension("json")).unwrap();
    std::fs::write(
        bad.with_extension("safetensors"),
        &before[..before.len() / 2],
    )
    .unwrap();
    let err = checkpoint::load(&bad, &clip, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}
