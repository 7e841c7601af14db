//! A base-to-new experiment as the CLI and the GUI run it: open a dataset, split it into base
//! and new classes (DATA.md), draw the few-shot training set, fetch image features from the
//! feature bank, train CoOp or CoOp + TextRefiner on the base classes, and evaluate zero-shot
//! CLIP and the trained prompt on base and new test images.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::clip::Clip;
use crate::data::dataset::{Dataset, Item, Subset};
use crate::error::Result;
use crate::eval::BaseNew;
use crate::features::{self, FeatureBank, Features, Progress, Views};
use crate::train::{self, class_features, zero_shot_features, TrainConfig, TrainEvent, Trained};

/// What data to prepare.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DataSpec {
    /// `world`, `world:SEED` or a dataset folder.
    pub data: String,
    pub shots: usize,
    /// Few-shot sampling seed (DATA.md: 1, 2, 3).
    pub seed: u64,
    /// Precomputed augmented views per training image; 0 trains on the plain (eval) view.
    pub views: usize,
    /// Cap on test images per class (first ones in listing order); `None` keeps all.
    pub test_per_class: Option<usize>,
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            data: "world".into(),
            shots: 16,
            seed: 1,
            views: 4,
            test_per_class: None,
        }
    }
}

/// What the preparation and training report.
#[derive(Debug, Clone)]
pub enum Event {
    /// Feature extraction of `what` ("train", "base test", "new test").
    Extract {
        what: &'static str,
        progress: Progress,
    },
    Train(TrainEvent),
}

/// Datasets and features of one experiment.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub spec: DataSpec,
    pub dataset: Dataset,
    pub base: Dataset,
    pub new: Dataset,
    /// The few-shot training items (base labels).
    pub train_items: Vec<Item>,
    pub train: Features,
    pub base_test_items: Vec<Item>,
    pub base_test: Features,
    pub new_test_items: Vec<Item>,
    pub new_test: Features,
}

fn cap_per_class(items: &[Item], cap: Option<usize>) -> Vec<Item> {
    match cap {
        None => items.to_vec(),
        Some(k) => {
            let mut seen = std::collections::HashMap::<u32, usize>::new();
            items
                .iter()
                .filter(|it| {
                    let n = seen.entry(it.label).or_default();
                    *n += 1;
                    *n <= k
                })
                .cloned()
                .collect()
        }
    }
}

/// Open the data and compute (or fetch) every feature the experiment needs.
pub fn prepare(
    clip: &Clip,
    bank: &FeatureBank,
    spec: &DataSpec,
    mut on_event: impl FnMut(&Event),
    cancel: &AtomicBool,
) -> Result<Prepared> {
    let dataset = Dataset::open(&spec.data, clip.image_size() as u32)?;
    prepare_dataset(clip, bank, dataset, spec, &mut on_event, cancel)
}

/// [`prepare`] for a dataset already opened.
pub fn prepare_dataset(
    clip: &Clip,
    bank: &FeatureBank,
    dataset: Dataset,
    spec: &DataSpec,
    on_event: &mut impl FnMut(&Event),
    cancel: &AtomicBool,
) -> Result<Prepared> {
    let base = dataset.subset(Subset::Base);
    let new = dataset.subset(Subset::New);
    let (train_items, _val) = base.few_shot(spec.shots, spec.seed)?;
    let views = if spec.views == 0 {
        Views::Eval
    } else {
        Views::Augmented {
            count: spec.views,
            seed: spec.seed,
        }
    };
    let train = features::extract(
        clip,
        bank,
        &base,
        &train_items,
        views,
        |p| {
            on_event(&Event::Extract {
                what: "train",
                progress: *p,
            })
        },
        cancel,
    )?;
    let base_test_items = cap_per_class(&base.test, spec.test_per_class);
    let base_test = features::extract(
        clip,
        bank,
        &base,
        &base_test_items,
        Views::Eval,
        |p| {
            on_event(&Event::Extract {
                what: "base test",
                progress: *p,
            })
        },
        cancel,
    )?;
    let new_test_items = cap_per_class(&new.test, spec.test_per_class);
    let new_test = features::extract(
        clip,
        bank,
        &new,
        &new_test_items,
        Views::Eval,
        |p| {
            on_event(&Event::Extract {
                what: "new test",
                progress: *p,
            })
        },
        cancel,
    )?;
    Ok(Prepared {
        spec: spec.clone(),
        dataset,
        base,
        new,
        train_items,
        train,
        base_test_items,
        base_test,
        new_test_items,
        new_test,
    })
}

/// Base / new / HM of zero-shot CLIP and of a trained prompt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Metrics {
    pub zero_shot: BaseNew,
    pub trained: BaseNew,
}

/// Zero-shot base / new accuracy.
pub fn zero_shot(clip: &Clip, p: &Prepared) -> Result<BaseNew> {
    let b = train::accuracy(
        &p.base_test,
        &zero_shot_features(clip, &p.base.class_names)?,
    )?;
    let n = train::accuracy(&p.new_test, &zero_shot_features(clip, &p.new.class_names)?)?;
    Ok(BaseNew::new(b, n))
}

/// Base / new accuracy of a trained prompt (refined features when it has a refiner).
pub fn evaluate_trained(clip: &Clip, p: &Prepared, trained: &Trained) -> Result<BaseNew> {
    let acc = |names: &[String], f: &Features| -> Result<f32> {
        let (t, refined) = class_features(clip, trained, names)?;
        train::accuracy(f, refined.as_ref().unwrap_or(&t))
    };
    Ok(BaseNew::new(
        acc(&p.base.class_names, &p.base_test)?,
        acc(&p.new.class_names, &p.new_test)?,
    ))
}

/// Train on the prepared base classes and evaluate. With `save`, the checkpoint there is
/// rewritten (atomically) after every epoch, and with the metrics at the end.
pub fn run(
    clip: &Clip,
    p: &Prepared,
    cfg: &TrainConfig,
    cancel: &AtomicBool,
    save: Option<&Path>,
    mut on_event: impl FnMut(&Event),
) -> Result<(Trained, Metrics)> {
    let trained = train::train_checkpointed(
        clip,
        &p.base.class_names,
        &p.train,
        cfg,
        cancel,
        |e| on_event(&Event::Train(e.clone())),
        |t| match save {
            Some(stem) => crate::checkpoint::save(
                stem,
                clip,
                t,
                serde_json::json!({"data": p.spec.data, "partial": true}),
            ),
            None => Ok(()),
        },
    )?;
    let metrics = Metrics {
        zero_shot: zero_shot(clip, p)?,
        trained: evaluate_trained(clip, p, &trained)?,
    };
    if let Some(stem) = save {
        let m = serde_json::json!({"data": p.spec.data, "shots": p.spec.shots, "seed": p.spec.seed, "zero_shot": metrics.zero_shot, "trained": metrics.trained});
        crate::checkpoint::save(stem, clip, &trained, m)?;
    }
    Ok((trained, metrics))
}
