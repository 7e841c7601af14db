//! A worker thread that owns a CLIP model and answers requests (load a model, score images
//! against texts) over channels, so that a UI never blocks on model code. The core never sees
//! the UI: the waker is a plain `Fn()` called after each event (the GUI passes
//! `ctx.request_repaint`). Dropping the handle stops the thread.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;

use crate::eval::BaseNew;
use crate::experiment::Prepared;
use crate::explore::{Exploration, MethodFeatures};
use crate::features::FeatureBank;
use crate::train::{TrainConfig, TrainEvent};

use crate::clip::preprocess::{batch_tensor, load_rgb, preprocess_eval};
use crate::clip::tokenizer::ClipTokenizer;
use crate::clip::{l2_normalize, Clip, VisionOptions};

/// Work for the model thread.
#[derive(Debug, Clone)]
pub enum Request {
    LoadModel {
        spec: String,
    },
    /// Score each image against each text (zero-shot).
    Score {
        images: Vec<PathBuf>,
        texts: Vec<String>,
    },
    /// Build the comparison views' data for a dataset (`world` or a folder): features from
    /// the feature bank, zero-shot CLIP, and CoOp and CoOp + TextRefiner trained on the spot.
    Explore {
        data: String,
        shots: usize,
        seed: u64,
        test_per_class: Option<usize>,
    },
    /// Train a run on the explored data in a background thread ("fine-tune"); `cancel` stops
    /// it at the next step. The checkpoint is saved under `save` when given.
    /// With `shots` other than the explored data's (or another seed), a new few-shot set is
    /// drawn and its features fetched from the feature bank first.
    Train {
        cfg: TrainConfig,
        shots: Option<usize>,
        name: String,
        cancel: Arc<AtomicBool>,
        save: Option<PathBuf>,
    },
    /// Add a checkpoint (ours or a reference run) to the comparison.
    AddCheckpoint {
        path: PathBuf,
    },
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub method: MethodFeatures,
    pub metrics: BaseNew,
    pub checkpoint: Option<PathBuf>,
}

/// Summary of a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub source: String,
    pub image_size: usize,
    pub patch_size: usize,
    pub embedding_dim: usize,
    pub vision_layers: usize,
    pub text_layers: usize,
}

/// One image's zero-shot result.
#[derive(Debug, Clone)]
pub struct ImageScore {
    pub path: PathBuf,
    /// Cosine similarity per text.
    pub cosine: Vec<f32>,
    /// Softmax over texts of logit_scale * cosine.
    pub probs: Vec<f32>,
    /// Last block's CLS attention over the patch grid, row-major, `grid * grid`.
    pub cls_attn: Vec<f32>,
    pub grid: usize,
}

/// What the worker reports. `id` is the request's id, so stale results can be dropped.
#[derive(Debug)]
pub enum Event {
    Progress {
        id: u64,
        message: String,
    },
    ModelLoaded {
        id: u64,
        result: Result<ModelSummary, String>,
    },
    /// Per image: its score or the error that names the file.
    Scored {
        id: u64,
        texts: Vec<String>,
        results: Vec<Result<ImageScore, String>>,
    },
    /// Progress of a slow step as a fraction in 0..=1.
    Fraction {
        id: u64,
        message: String,
        fraction: f32,
    },
    Explored {
        id: u64,
        result: Result<Box<Exploration>, String>,
    },
    TrainStep {
        id: u64,
        event: TrainEvent,
    },
    TrainDone {
        id: u64,
        result: Result<TrainOutcome, String>,
    },
    MethodAdded {
        id: u64,
        result: Result<MethodFeatures, String>,
    },
}

/// Handle to the worker thread.
pub struct Worker {
    tx: Option<Sender<(u64, Request)>>,
    rx: Receiver<Event>,
    next_id: u64,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(waker: impl Fn() + Send + Sync + 'static) -> std::io::Result<Self> {
        let (tx, req_rx) = mpsc::channel::<(u64, Request)>();
        let (ev_tx, rx) = mpsc::channel::<Event>();
        let waker: Arc<dyn Fn() + Send + Sync> = Arc::new(waker);
        let thread = std::thread::Builder::new()
            .name("clip-worker".into())
            .spawn(move || {
                let mut model: Option<Clip> = None;
                let mut prepared: Option<Arc<Prepared>> = None;
                let tok = ClipTokenizer::new();
                let ev_tx2 = ev_tx.clone();
                let waker2 = waker.clone();
                let send = move |e: Event| {
                    let _ = ev_tx2.send(e);
                    waker2();
                };
                while let Ok((id, req)) = req_rx.recv() {
                    match req {
                        Request::LoadModel { spec } => {
                            send(Event::Progress {
                                id,
                                message: format!("loading {spec} ..."),
                            });
                            let result = Clip::load(&spec, &Device::Cpu)
                                .map_err(|e| e.to_string())
                                .map(|m| {
                                    let s = summary(&m);
                                    model = Some(m);
                                    s
                                });
                            send(Event::ModelLoaded { id, result });
                        }
                        Request::Score { images, texts } => {
                            let Some(m) = model.as_ref() else {
                                let results = images
                                    .iter()
                                    .map(|_| Err("no model loaded".to_string()))
                                    .collect();
                                send(Event::Scored { id, texts, results });
                                continue;
                            };
                            send(Event::Progress {
                                id,
                                message: format!("scoring {} images ...", images.len()),
                            });
                            let results = score(m, &tok, &images, &texts);
                            send(Event::Scored { id, texts, results });
                        }
                        Request::Explore {
                            data,
                            shots,
                            seed,
                            test_per_class,
                        } => {
                            let Some(m) = model.as_ref() else {
                                send(Event::Explored {
                                    id,
                                    result: Err("no model loaded".into()),
                                });
                                continue;
                            };
                            let result =
                                explore(m, &data, shots, seed, test_per_class, &mut |msg, f| {
                                    send(Event::Fraction {
                                        id,
                                        message: msg.to_string(),
                                        fraction: f,
                                    })
                                });
                            match result {
                                Ok((p, e)) => {
                                    prepared = Some(Arc::new(p));
                                    send(Event::Explored {
                                        id,
                                        result: Ok(Box::new(e)),
                                    });
                                }
                                Err(e) => send(Event::Explored {
                                    id,
                                    result: Err(e.to_string()),
                                }),
                            }
                        }
                        Request::Train {
                            cfg,
                            shots,
                            name,
                            cancel,
                            save,
                        } => {
                            let (Some(m), Some(p)) = (model.clone(), prepared.clone()) else {
                                send(Event::TrainDone {
                                    id,
                                    result: Err("open a model and a dataset first".into()),
                                });
                                continue;
                            };
                            let tx = ev_tx.clone();
                            let wk = waker.clone();
                            let spawned = std::thread::Builder::new()
                                .name("fine-tune".into())
                                .spawn(move || {
                                    let emit = |e: Event| {
                                        let _ = tx.send(e);
                                        wk();
                                    };
                                    // another few-shot set: draw it, features from the bank
                                    let p = match shots.filter(|&k| k != p.spec.shots || cfg.seed != p.spec.seed) {
                                        None => Ok(p),
                                        Some(k) => {
                                            let spec = crate::experiment::DataSpec { shots: k, seed: cfg.seed, ..p.spec.clone() };
                                            let bank = FeatureBank::at(FeatureBank::default_dir());
                                            crate::experiment::prepare_dataset(&m, &bank, p.dataset.clone(), &spec, &mut |_| {}, &cancel).map(Arc::new)
                                        }
                                    };
                                    let p = match p {
                                        Ok(p) => p,
                                        Err(e) => {
                                            emit(Event::TrainDone { id, result: Err(e.to_string()) });
                                            return;
                                        }
                                    };
                                    let result = crate::experiment::run(
                                        &m,
                                        &p,
                                        &cfg,
                                        &cancel,
                                        save.as_deref(),
                                        |e| {
                                            if let crate::experiment::Event::Train(ev) = e {
                                                emit(Event::TrainStep {
                                                    id,
                                                    event: ev.clone(),
                                                });
                                            }
                                        },
                                    )
                                    .and_then(|(t, metrics)| {
                                        Ok(TrainOutcome {
                                            method: crate::explore::method_of(&m, &p, &t, &name)?,
                                            metrics: metrics.trained,
                                            checkpoint: save.clone(),
                                        })
                                    })
                                    .map_err(|e| e.to_string());
                                    emit(Event::TrainDone { id, result });
                                });
                            if let Err(e) = spawned {
                                send(Event::TrainDone {
                                    id,
                                    result: Err(format!("cannot start the training thread: {e}")),
                                });
                            }
                        }
                        Request::AddCheckpoint { path } => {
                            let result = match (model.as_ref(), prepared.as_ref()) {
                                (Some(m), Some(p)) => crate::commands::load_for(m, &path, p)
                                    .map_err(|e| format!("{e:#}"))
                                    .and_then(|t| {
                                        let name = path
                                            .file_stem()
                                            .map(|n| n.to_string_lossy().into_owned())
                                            .unwrap_or_else(|| "checkpoint".into());
                                        crate::explore::method_of(m, p, &t, &name)
                                            .map_err(|e| e.to_string())
                                    }),
                                _ => Err("open a model and a dataset first".into()),
                            };
                            send(Event::MethodAdded { id, result });
                        }
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            rx,
            next_id: 1,
            thread: Some(thread),
        })
    }

    /// Queue a request; returns its id.
    pub fn send(&mut self, req: Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if let Some(tx) = &self.tx {
            let _ = tx.send((id, req));
        }
        id
    }

    /// Events that arrived since the last call (never blocks).
    pub fn poll(&self) -> Vec<Event> {
        self.rx.try_iter().collect()
    }

    /// Wait for the next event (for tests and scripts).
    pub fn recv_timeout(&self, t: std::time::Duration) -> Option<Event> {
        self.rx.recv_timeout(t).ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn summary(m: &Clip) -> ModelSummary {
    ModelSummary {
        source: m.source.clone(),
        image_size: m.config.vision_config.image_size,
        patch_size: m.config.vision_config.patch_size,
        embedding_dim: m.config.projection_dim,
        vision_layers: m.config.vision_config.num_hidden_layers,
        text_layers: m.config.text_config.num_hidden_layers,
    }
}

fn score(
    m: &Clip,
    tok: &ClipTokenizer,
    images: &[PathBuf],
    texts: &[String],
) -> Vec<Result<ImageScore, String>> {
    let inner = || -> crate::Result<Vec<Result<ImageScore, String>>> {
        let ctx = m.config.text_config.max_position_embeddings;
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.tokenize(t, ctx)).collect();
        let txt = if ids.is_empty() {
            None
        } else {
            Some(l2_normalize(&m.text.forward_ids(&ids)?)?)
        };
        let size = m.image_size();
        let grid = m.config.vision_config.grid();
        let mut out = Vec::with_capacity(images.len());
        for p in images {
            let pix = match load_rgb(p) {
                Ok(img) => preprocess_eval(&img, size as u32),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    continue;
                }
            };
            let x = batch_tensor(&[pix], size, m.device())?;
            let v = m.vision.forward(&x, &VisionOptions::default())?;
            let img = l2_normalize(&v.image_embeds)?;
            let cosine: Vec<f32> = match &txt {
                Some(t) => img.matmul(&t.t()?)?.squeeze(0)?.to_vec1()?,
                None => vec![],
            };
            let probs = crate::clip::softmax_scaled(&cosine, m.logit_scale);
            let cls_attn = v.cls_attn.squeeze(0)?.to_vec1()?;
            out.push(Ok(ImageScore {
                path: p.clone(),
                cosine,
                probs,
                cls_attn,
                grid,
            }));
        }
        Ok(out)
    };
    inner().unwrap_or_else(|e| images.iter().map(|_| Err(e.to_string())).collect())
}

/// The world drawn at the model's input size.

/// Prepare data and build the exploration (with the default CoOp and CoOp + TextRefiner runs).
fn explore(
    m: &Clip,
    data: &str,
    shots: usize,
    seed: u64,
    test_per_class: Option<usize>,
    report: &mut dyn FnMut(&str, f32),
) -> crate::Result<(Prepared, Exploration)> {
    let t0 = std::time::Instant::now();
    let spec = crate::experiment::DataSpec {
        data: data.to_string(),
        shots,
        seed,
        views: 4,
        test_per_class,
    };
    let bank = FeatureBank::at(FeatureBank::default_dir());
    let cancel = AtomicBool::new(false);
    let p = crate::experiment::prepare(
        m,
        &bank,
        &spec,
        |e| {
            if let crate::experiment::Event::Extract { what, progress } = e {
                report(
                    &format!(
                        "image features ({what}): {}/{}",
                        progress.done, progress.total
                    ),
                    progress.done as f32 / progress.total.max(1) as f32,
                );
            }
        },
        &cancel,
    )?;
    // the embedded model on the default world comes with its two runs (assets/runs); other
    // models and data are trained on the spot
    let shipped = m.source == crate::clip::EMBEDDED && data == "world" && shots == 16 && seed == 1;
    let (coop, refined) = match shipped {
        true => crate::checkpoint::shipped_runs(m, m.device())?,
        false => crate::explore::train_default_runs(m, &p, &cancel, report)?,
    };
    report("building the views ...", 1.0);
    let mut e = crate::explore::Builder {
        clip: m,
        prepared: &p,
    }
    .build(&coop, &refined)?;
    e.prepare_secs = t0.elapsed().as_secs_f32();
    Ok((p, e))
}
