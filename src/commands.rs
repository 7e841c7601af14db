//! The engine's headless commands: `train`, `eval`, `compare`, `import-checkpoint` and
//! `results`. Human-readable tables by default, `--json` for scripts; feature extraction shows
//! an indicatif progress bar on a terminal and a summary line otherwise.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;

use crate::checkpoint;
use crate::clip::Clip;
use crate::data::dataset::Subset;
use crate::eval::{self, BaseNew, Evaluation, Flip};
use crate::experiment::{self, DataSpec, Event, Prepared};
use crate::features::{FeatureBank, Progress};
use crate::train::{self, Method, TrainConfig, TrainEvent, Trained};

/// Which data, how many shots, which views.
#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Model: `embedded`, a local folder, a weights file, or a hub id.
    #[arg(long, default_value = "embedded")]
    pub model: String,
    /// Dataset: `world`, `world:SEED`, or a folder (folder per class, CoOp's split_zhou_*.json
    /// layout, FGVCAircraft, ImageNet).
    #[arg(long, default_value = "world")]
    pub data: String,
    #[arg(long, default_value_t = 16)]
    pub shots: usize,
    /// Few-shot sampling and training seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Precomputed augmented views per training image (0: the plain view, no augmentation).
    #[arg(long, default_value_t = 4)]
    pub views: usize,
    /// A fresh augmented view of every image in every epoch, as the reference does (encodes
    /// epochs x images views; overrides --views).
    #[arg(long)]
    pub fresh_augmentation: bool,
    /// Use at most this many test images per class.
    #[arg(long)]
    pub test_per_class: Option<usize>,
    /// Feature bank folder (default: ~/.cache/textrefiner-explorer/features).
    #[arg(long, env = "TEXTREFINER_FEATURES")]
    pub feature_cache: Option<PathBuf>,
    /// Compute features in memory only.
    #[arg(long)]
    pub no_feature_cache: bool,
}

impl DataArgs {
    fn bank(&self) -> FeatureBank {
        if self.no_feature_cache {
            FeatureBank::none()
        } else {
            FeatureBank::at(
                self.feature_cache
                    .clone()
                    .unwrap_or_else(FeatureBank::default_dir),
            )
        }
    }
    fn spec(&self, epochs: usize) -> DataSpec {
        DataSpec {
            data: self.data.clone(),
            shots: self.shots,
            seed: self.seed,
            views: if self.fresh_augmentation {
                epochs.max(1)
            } else {
                self.views
            },
            test_per_class: self.test_per_class,
        }
    }
}

/// Progress display for feature extraction: a bar on a terminal, one line per stage otherwise.
struct ExtractDisplay {
    quiet: bool,
    bar: Option<(indicatif::ProgressBar, &'static str)>,
    started: Instant,
}

impl ExtractDisplay {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            bar: None,
            started: Instant::now(),
        }
    }
    fn update(&mut self, what: &'static str, p: &Progress) {
        if self.quiet {
            return;
        }
        if self.bar.as_ref().map(|b| b.1 != what).unwrap_or(true) {
            let bar = indicatif::ProgressBar::new(p.total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>18} [{bar:30}] {pos}/{len} views {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(format!("features: {what}"));
            self.bar = Some((bar, what));
            self.started = Instant::now();
        }
        if let Some((bar, _)) = &self.bar {
            bar.set_position(p.done as u64);
            if p.done == p.total {
                bar.finish_and_clear();
                eprintln!(
                    "features: {what}: {} views ({} from the feature bank) in {:.1} s",
                    p.total,
                    p.cached,
                    self.started.elapsed().as_secs_f64()
                );
            }
        }
    }
}

fn prepare(clip: &Clip, a: &DataArgs, epochs: usize, quiet: bool) -> Result<Prepared> {
    let mut display = ExtractDisplay::new(quiet);
    let cancel = AtomicBool::new(false);
    let p = experiment::prepare(
        clip,
        &a.bank(),
        &a.spec(epochs),
        |e| {
            if let Event::Extract { what, progress } = e {
                display.update(what, progress)
            }
        },
        &cancel,
    )
    .with_context(|| format!("preparing data {}", a.data))?;
    if !p.dataset.skipped.is_empty() && !quiet {
        eprintln!(
            "warning: skipped {} non-image files in {} (e.g. {})",
            p.dataset.skipped.len(),
            a.data,
            p.dataset.skipped[0].display()
        );
    }
    Ok(p)
}

fn parse_method(m: &str) -> Result<Method> {
    Ok(match m {
        "coop" => Method::Coop,
        "coop-refiner" | "textrefiner" | "coop+textrefiner" => Method::CoopRefiner,
        m => bail!("unknown method {m:?}: use coop or coop-refiner"),
    })
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// coop or coop-refiner.
    #[arg(long, default_value = "coop-refiner")]
    pub method: String,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 0.002)]
    pub lr: f64,
    /// Context length (with --random-init; otherwise the init phrase decides it).
    #[arg(long, default_value_t = 4)]
    pub n_ctx: usize,
    /// Initialise the context from N(0, 0.02) instead of "a photo of a".
    #[arg(long)]
    pub random_init: bool,
    /// Local cache entries.
    #[arg(long, default_value_t = crate::refiner::CACHE_SIZE)]
    pub cache_size: usize,
    /// Weight of the refinement in the aggregation.
    #[arg(long, default_value_t = crate::refiner::ALPHA)]
    pub alpha: f64,
    /// Save the trained prompt as STEM.safetensors + STEM.json.
    #[arg(long)]
    pub save: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

impl TrainArgs {
    pub fn config(&self) -> Result<TrainConfig> {
        let mut cfg = TrainConfig {
            method: parse_method(&self.method)?,
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            seed: self.data.seed,
            cache_size: self.cache_size,
            alpha: self.alpha,
            fresh_views: self.data.fresh_augmentation,
            ..Default::default()
        };
        cfg.coop.seed = self.data.seed;
        if self.random_init {
            cfg.coop.init = None;
            cfg.coop.n_ctx = self.n_ctx;
        }
        Ok(cfg)
    }
}

/// Train and evaluate; the JSON summary.
pub fn run_training(a: &TrainArgs) -> Result<serde_json::Value> {
    let cfg = a.config()?;
    let t0 = Instant::now();
    let clip = Clip::load(&a.data.model, &Device::Cpu)
        .with_context(|| format!("loading model {}", a.data.model))?;
    let p = prepare(&clip, &a.data, a.epochs, a.json)?;
    let t_features = t0.elapsed().as_secs_f64();
    let cancel = AtomicBool::new(false);
    let quiet = a.json;
    let (_trained, metrics) = experiment::run(&clip, &p, &cfg, &cancel, a.save.as_deref(), |e| {
        if let Event::Train(TrainEvent::Epoch {
            epoch,
            train_accuracy,
            mean_loss,
        }) = e
        {
            if !quiet {
                eprintln!(
                    "epoch {epoch:>3}  loss {mean_loss:.4}  train accuracy {:.1}%",
                    100.0 * train_accuracy
                );
            }
        }
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if let Some(stem) = &a.save {
        if !a.json {
            eprintln!(
                "saved {} (+ .json)",
                stem.with_extension("safetensors").display()
            );
        }
    }
    Ok(serde_json::json!({
        "method": a.method, "data": a.data.data, "shots": a.data.shots, "seed": a.data.seed, "epochs": a.epochs,
        "views": if a.data.fresh_augmentation { "fresh".to_string() } else { a.data.views.to_string() },
        "base_classes": p.base.num_classes(), "new_classes": p.new.num_classes(),
        "train_images": p.train_items.len(), "base_test_images": p.base_test_items.len(), "new_test_images": p.new_test_items.len(),
        "zero_shot": metrics.zero_shot,
        "trained": metrics.trained,
        "seconds": {"features": t_features, "total": secs},
    }))
}

fn pct(x: f32) -> String {
    format!("{:.1}", 100.0 * x)
}

pub fn train_cmd(a: TrainArgs) -> Result<()> {
    let out = run_training(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let row = |name: &str, v: &serde_json::Value| {
        let g = |k: &str| v[k].as_f64().unwrap_or(0.0) as f32;
        println!(
            "{name:<20} {:>6} {:>6} {:>6}",
            pct(g("base")),
            pct(g("new")),
            pct(g("hm"))
        );
    };
    println!("{:<20} {:>6} {:>6} {:>6}", "method", "base", "new", "HM");
    row("zero-shot CLIP", &out["zero_shot"]);
    row(&a.method, &out["trained"]);
    println!(
        "{:.1} s end to end ({:.1} s data and features)",
        out["seconds"]["total"].as_f64().unwrap_or(0.0),
        out["seconds"]["features"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// A checkpoint of ours (STEM) or a reference run folder; without it, zero-shot CLIP.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Zero-shot prompt templates, one per line with {} for the class name (ensembled).
    #[arg(long)]
    pub templates: Option<PathBuf>,
    /// Print per-class accuracy.
    #[arg(long)]
    pub per_class: bool,
    /// Print the confusion matrices.
    #[arg(long)]
    pub confusion: bool,
    /// Write per-image predictions here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Class features of a checkpoint (refined when it has a refiner) for `names`.
fn trained_features(clip: &Clip, t: &Trained, names: &[String]) -> Result<Tensor> {
    let (coop, refined) = train::class_features(clip, t, names)?;
    Ok(refined.unwrap_or(coop))
}

/// Load `path` (ours or reference) for the base classes of `p`, checking the class list.
pub fn load_for(clip: &Clip, path: &Path, p: &Prepared) -> Result<Trained> {
    let t = checkpoint::load_any(path, clip, Some(p.base.class_names.clone()), &Device::Cpu)
        .with_context(|| format!("loading checkpoint {}", path.display()))?;
    checkpoint::check_classes(&t, &p.base.class_names, path)?;
    Ok(t)
}

fn write_csv(path: &Path, text: &str) -> Result<()> {
    crate::util::write_atomic(path, text.as_bytes())?;
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let clip = Clip::load(&a.data.model, &Device::Cpu)
        .with_context(|| format!("loading model {}", a.data.model))?;
    let p = prepare(&clip, &a.data, 1, a.json)?;
    let (method, base_w, new_w) = match &a.checkpoint {
        Some(path) => {
            let t = load_for(&clip, path, &p)?;
            let name = match t.config.method {
                Method::Coop => "CoOp",
                Method::CoopRefiner => "CoOp + TextRefiner",
            };
            (
                name.to_string(),
                trained_features(&clip, &t, &p.base.class_names)?,
                trained_features(&clip, &t, &p.new.class_names)?,
            )
        }
        None => {
            let templates = match &a.templates {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading templates {}", f.display()))?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect(),
                None => vec![train::DEFAULT_TEMPLATE.to_string()],
            };
            let zs = |names: &[String]| train::zero_shot_ensemble(&clip, names, &templates);
            (
                format!("zero-shot CLIP ({} templates)", templates.len()),
                zs(&p.base.class_names)?,
                zs(&p.new.class_names)?,
            )
        }
    };
    let eb = eval::evaluate(
        &p.base_test.image,
        &p.base_test.labels,
        &base_w,
        &p.base.class_names,
    )?;
    let en = eval::evaluate(
        &p.new_test.image,
        &p.new_test.labels,
        &new_w,
        &p.new.class_names,
    )?;
    let summary = BaseNew::new(eb.accuracy, en.accuracy);
    if let Some(csv) = &a.csv {
        let mut s = String::from("subset,image,label,prediction,correct\n");
        for (subset, e, items, ds) in [
            ("base", &eb, &p.base_test_items, &p.base),
            ("new", &en, &p.new_test_items, &p.new),
        ] {
            for (i, it) in items.iter().enumerate() {
                let pred = e.predictions[i] as usize;
                s += &format!(
                    "{subset},{},{},{},{}\n",
                    csv_field(&ds.describe(&it.image)),
                    csv_field(&ds.class_names[it.label as usize]),
                    csv_field(&ds.class_names[pred]),
                    (pred as u32 == it.label) as u8
                );
            }
        }
        write_csv(csv, &s)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"method": method, "data": a.data.data, "summary": summary, "base": eb, "new": en})
            )?
        );
        return Ok(());
    }
    println!(
        "{method} on {}: base {}  new {}  HM {}",
        p.dataset.name,
        pct(summary.base),
        pct(summary.new),
        pct(summary.hm)
    );
    for (name, e) in [("base", &eb), ("new", &en)] {
        if a.per_class {
            println!("\n{name} classes ({} test images)", e.images);
            for c in &e.per_class {
                println!(
                    "  {:<40} {:>6}%  ({}/{})",
                    c.name,
                    pct(c.accuracy),
                    c.correct,
                    c.total
                );
            }
        }
        if a.confusion {
            print_confusion(name, e);
        }
    }
    Ok(())
}

fn print_confusion(name: &str, e: &Evaluation) {
    println!("\n{name} confusion (rows: true class, columns: predicted)");
    print!("{:>4}", "");
    for j in 0..e.confusion.len() {
        print!("{j:>4}");
    }
    println!();
    for (i, row) in e.confusion.iter().enumerate() {
        print!("{i:>4}");
        for v in row {
            print!("{v:>4}");
        }
        println!("  {}", e.per_class[i].name);
    }
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// The CoOp checkpoint (ours or a reference run).
    #[arg(long)]
    pub coop: PathBuf,
    /// The CoOp + TextRefiner checkpoint.
    #[arg(long)]
    pub refined: PathBuf,
    /// Rows of fixed and broken images to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Write per-image results (both top-5, flip, margins) here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn compare_cmd(a: CompareArgs) -> Result<()> {
    let clip = Clip::load(&a.data.model, &Device::Cpu)
        .with_context(|| format!("loading model {}", a.data.model))?;
    let p = prepare(&clip, &a.data, 1, a.json)?;
    let coop = load_for(&clip, &a.coop, &p)?;
    let refined = load_for(&clip, &a.refined, &p)?;
    let mut out = Vec::new();
    let mut csv =
        String::from("subset,image,label,flip,coop_margin,refined_margin,coop_top5,refined_top5\n");
    for (subset, ds, f, items) in [
        ("base", &p.base, &p.base_test, &p.base_test_items),
        ("new", &p.new, &p.new_test, &p.new_test_items),
    ] {
        let wa = trained_features(&clip, &coop, &ds.class_names)?;
        let wb = trained_features(&clip, &refined, &ds.class_names)?;
        let c = eval::compare(&f.image, &f.labels, &wa, &wb, clip.logit_scale)?;
        let top5 = |r: &[eval::Ranked]| {
            r.iter()
                .map(|x| format!("{}:{:.3}", ds.class_names[x.class as usize], x.prob))
                .collect::<Vec<_>>()
                .join("; ")
        };
        for im in &c.images {
            csv += &format!(
                "{subset},{},{},{},{:.4},{:.4},{},{}\n",
                csv_field(&ds.describe(&items[im.index].image)),
                csv_field(&ds.class_names[im.label as usize]),
                im.flip.label(),
                im.a_margin,
                im.b_margin,
                csv_field(&top5(&im.a_top5)),
                csv_field(&top5(&im.b_top5))
            );
        }
        if !a.json {
            println!(
                "{subset}: CoOp {}%  CoOp + TextRefiner {}%  | fixed {}  broken {}  both right {}  both wrong {}",
                pct(c.a_accuracy),
                pct(c.b_accuracy),
                c.counts.fixed,
                c.counts.broken,
                c.counts.both_right,
                c.counts.both_wrong
            );
            for flip in [Flip::Fixed, Flip::Broken] {
                let mut v: Vec<&eval::ImageComparison> =
                    c.images.iter().filter(|i| i.flip == flip).collect();
                v.sort_by(|x, y| y.margin_change().abs().total_cmp(&x.margin_change().abs()));
                for im in v.iter().take(a.top) {
                    println!(
                        "  {:<7} {:<24} true {:<36} CoOp -> {:<36} refined -> {} (margin {:+.2})",
                        flip.label(),
                        ds.describe(&items[im.index].image),
                        ds.class_names[im.label as usize],
                        ds.class_names[im.a_top5[0].class as usize],
                        ds.class_names[im.b_top5[0].class as usize],
                        im.margin_change()
                    );
                }
            }
        }
        out.push(
            serde_json::json!({"subset": subset, "class_names": ds.class_names, "comparison": c}),
        );
    }
    if let Some(path) = &a.csv {
        write_csv(path, &csv)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// Reference run folder (with prompt_learner/ and Memory/), or a prompt-learner file.
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long, default_value = "embedded")]
    pub model: String,
    /// The dataset the run was trained on (its class names are read from it).
    #[arg(long, default_value = "world")]
    pub data: String,
    /// Which classes the run was trained on: base, new or all.
    #[arg(long, default_value = "base")]
    pub subset: String,
    /// Output STEM (STEM.safetensors + STEM.json).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn import_cmd(a: ImportArgs) -> Result<()> {
    let clip =
        Clip::load(&a.model, &Device::Cpu).with_context(|| format!("loading model {}", a.model))?;
    let ds = crate::data::dataset::Dataset::open(&a.data, clip.image_size() as u32)?;
    let subset = match a.subset.as_str() {
        "base" => Subset::Base,
        "new" => Subset::New,
        "all" => Subset::All,
        s => bail!("unknown subset {s:?}: use base, new or all"),
    };
    let names = ds.subset(subset).class_names;
    let t = checkpoint::import_reference(&a.run, &clip, names, &Device::Cpu)?;
    checkpoint::save(
        &a.out,
        &clip,
        &t,
        serde_json::json!({"imported_from": a.run.display().to_string()}),
    )?;
    println!(
        "imported {} ({} context vectors, {}) -> {}",
        a.run.display(),
        t.learner.n_ctx,
        if t.refiner.is_some() {
            "with TextRefiner cache and local transform"
        } else {
            "CoOp only"
        },
        a.out.with_extension("safetensors").display()
    );
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct ResultsArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
}

/// The project's analogue of the paper's base-to-new table.
pub fn results_cmd(a: ResultsArgs) -> Result<()> {
    let mut rows: Vec<(String, Vec<BaseNew>)> = vec![
        ("Zero-shot CLIP".into(), vec![]),
        ("CoOp".into(), vec![]),
        ("CoOp + TextRefiner".into(), vec![]),
    ];
    let t0 = Instant::now();
    for &seed in &a.seeds {
        for (i, method) in ["coop", "coop-refiner"].iter().enumerate() {
            let mut data = a.data.clone();
            data.seed = seed;
            let args = TrainArgs {
                data,
                method: method.to_string(),
                epochs: a.epochs,
                batch: 32,
                lr: 0.002,
                n_ctx: 4,
                random_init: false,
                cache_size: crate::refiner::CACHE_SIZE,
                alpha: crate::refiner::ALPHA,
                save: None,
                json: true,
            };
            let out = run_training(&args)?;
            let get = |v: &serde_json::Value| -> Result<BaseNew> {
                Ok(serde_json::from_value(v.clone())?)
            };
            eprintln!(
                "seed {seed} {method}: {} ({:.1} s)",
                out["trained"],
                out["seconds"]["total"].as_f64().unwrap_or(0.0)
            );
            if i == 0 {
                rows[0].1.push(get(&out["zero_shot"])?);
            }
            rows[i + 1].1.push(get(&out["trained"])?);
        }
    }
    println!("| method | base | new | HM | per seed (base / new / HM) |");
    println!("|---|---|---|---|---|");
    for (name, runs) in &rows {
        let n = runs.len().max(1) as f32;
        let mean = |f: fn(&BaseNew) -> f32| 100.0 * runs.iter().map(f).sum::<f32>() / n;
        let per: Vec<String> = runs
            .iter()
            .map(|r| format!("{} / {} / {}", pct(r.base), pct(r.new), pct(r.hm)))
            .collect();
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {} |",
            mean(|r| r.base),
            mean(|r| r.new),
            mean(|r| r.hm),
            per.join("; ")
        );
    }
    eprintln!("{:.0} s in all", t0.elapsed().as_secs_f64());
    Ok(())
}
