//! Fine-tune: choose method, shots, seed, epochs, learning rate, batch, cache size and alpha;
//! start a run on a background thread, watch progress, the three loss curves and the training
//! accuracy live, cancel at any time; a finished run joins the comparison and its checkpoint is
//! saved.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints};

use super::ExplorerApp;
use crate::train::{Method, TrainConfig, TrainEvent};
use crate::worker::Request;

/// The form (persisted).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FinetuneForm {
    pub refiner: bool,
    #[serde(default = "default_shots")]
    pub shots: usize,
    pub seed: u64,
    pub epochs: usize,
    pub lr: f64,
    pub batch: usize,
    pub cache_size: usize,
    pub alpha: f64,
}

fn default_shots() -> usize {
    16
}

impl Default for FinetuneForm {
    fn default() -> Self {
        let d = TrainConfig::default();
        Self {
            refiner: true,
            shots: 16,
            seed: 1,
            epochs: d.epochs,
            lr: d.lr,
            batch: d.batch,
            cache_size: d.cache_size,
            alpha: d.alpha,
        }
    }
}

/// A run in progress (or just finished).
#[derive(Debug, Default)]
pub struct Job {
    pub id: u64,
    pub name: String,
    pub cancel: Arc<AtomicBool>,
    pub running: bool,
    pub steps: Vec<[f64; 4]>,
    pub epochs: Vec<[f64; 2]>,
    pub progress: f32,
    pub status: String,
}

impl Drop for Job {
    fn drop(&mut self) {
        // dropping the handle cancels the run
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl ExplorerApp {
    pub fn start_finetune(&mut self) {
        if self.explore.is_none() || self.job.as_ref().map(|j| j.running).unwrap_or(false) {
            return;
        }
        let f = &self.state.finetune;
        let cfg = TrainConfig {
            method: if f.refiner {
                Method::CoopRefiner
            } else {
                Method::Coop
            },
            epochs: f.epochs.max(1),
            lr: f.lr,
            batch: f.batch.max(1),
            cache_size: f.cache_size.max(1),
            alpha: f.alpha,
            seed: f.seed,
            ..Default::default()
        };
        self.runs_started += 1;
        let name = format!(
            "run {} ({}, seed {}, {} ep)",
            self.runs_started,
            if f.refiner {
                "CoOp + TextRefiner"
            } else {
                "CoOp"
            },
            f.seed,
            f.epochs
        );
        let save = crate::features::FeatureBank::default_dir()
            .parent()
            .map(|d| {
                d.join("runs")
                    .join(format!("run{}-{}", self.runs_started, std::process::id()))
            });
        let cancel = Arc::new(AtomicBool::new(false));
        let id = self.worker.send(Request::Train {
            cfg,
            shots: Some(self.state.finetune.shots.max(1)),
            name: name.clone(),
            cancel: cancel.clone(),
            save,
        });
        self.job = Some(Job {
            id,
            name,
            cancel,
            running: true,
            status: "starting …".into(),
            steps: Vec::new(),
            epochs: Vec::new(),
            progress: 0.0,
        });
    }

    pub fn cancel_finetune(&mut self) {
        if let Some(j) = &self.job {
            j.cancel.store(true, Ordering::Relaxed);
        }
    }

    pub(super) fn on_train_step(&mut self, id: u64, ev: TrainEvent) {
        let Some(j) = self.job.as_mut().filter(|j| j.id == id) else {
            return;
        };
        match ev {
            TrainEvent::Step {
                epoch,
                step,
                steps_per_epoch,
                global,
                local,
                reg,
                total,
                ..
            } => {
                let x = (epoch - 1) as f64 + step as f64 / steps_per_epoch as f64;
                j.steps.push([x, global as f64, local as f64, reg as f64]);
                let _ = total;
                let epochs = self.state.finetune.epochs.max(1) as f32;
                j.progress = x as f32 / epochs;
                j.status = format!("epoch {epoch}, step {step}/{steps_per_epoch}");
            }
            TrainEvent::Epoch {
                epoch,
                train_accuracy,
                ..
            } => j.epochs.push([epoch as f64, train_accuracy as f64]),
        }
    }

    pub(super) fn finetune_ui(&mut self, ui: &mut egui::Ui) {
        let running = self.job.as_ref().map(|j| j.running).unwrap_or(false);
        ui.add_enabled_ui(!running, |ui| {
            let f = &mut self.state.finetune;
            egui::Grid::new("ft-form").num_columns(2).show(ui, |ui| {
                ui.label("method");
                ui.horizontal(|ui| {
                    ui.selectable_value(&mut f.refiner, false, "CoOp");
                    ui.selectable_value(&mut f.refiner, true, "CoOp + TextRefiner");
                });
                ui.end_row();
                ui.label("shots per class");
                ui.add(egui::DragValue::new(&mut f.shots).range(1..=256));
                ui.end_row();
                ui.label("seed");
                ui.add(egui::DragValue::new(&mut f.seed).range(0..=9999));
                ui.end_row();
                ui.label("epochs");
                ui.add(egui::DragValue::new(&mut f.epochs).range(1..=200));
                ui.end_row();
                ui.label("learning rate");
                ui.add(
                    egui::DragValue::new(&mut f.lr)
                        .speed(0.0005)
                        .range(1e-5..=1.0),
                );
                ui.end_row();
                ui.label("batch");
                ui.add(egui::DragValue::new(&mut f.batch).range(1..=256));
                ui.end_row();
                ui.label("cache size");
                ui.add(egui::DragValue::new(&mut f.cache_size).range(1..=256));
                ui.end_row();
                ui.label("alpha");
                ui.add(egui::Slider::new(&mut f.alpha, 0.0..=1.0));
                ui.end_row();
            });
            ui.weak("data: that of the comparison; other shots or seeds draw a new few-shot set (features from the bank)");
        });
        ui.horizontal(|ui| {
            if ui
                .add_enabled(
                    !running && self.explore.is_some(),
                    egui::Button::new("Start"),
                )
                .clicked()
            {
                self.start_finetune();
            }
            if ui
                .add_enabled(running, egui::Button::new("Cancel"))
                .clicked()
            {
                self.cancel_finetune();
            }
        });
        let Some(j) = &self.job else {
            ui.weak("No run yet.");
            return;
        };
        ui.horizontal(|ui| {
            ui.strong(&j.name);
            ui.label(&j.status);
        });
        if j.running {
            ui.add(egui::ProgressBar::new(j.progress.clamp(0.0, 1.0)).show_percentage());
        }
        let h = (ui.available_height() / 2.0 - 10.0).max(120.0);
        let series = |k: usize| -> PlotPoints<'static> {
            j.steps
                .iter()
                .map(|s| [s[0], s[k]])
                .collect::<Vec<_>>()
                .into()
        };
        Plot::new("losses")
            .height(h)
            .legend(Legend::default())
            .x_axis_label("epoch")
            .show(ui, |p| {
                p.line(Line::new("global (cross-entropy)", series(1)));
                p.line(Line::new(
                    "local / 50",
                    PlotPoints::from(
                        j.steps
                            .iter()
                            .map(|s| [s[0], s[2] / 50.0])
                            .collect::<Vec<_>>(),
                    ),
                ));
                p.line(Line::new(
                    "regulariser x 20",
                    PlotPoints::from(
                        j.steps
                            .iter()
                            .map(|s| [s[0], s[3] * 20.0])
                            .collect::<Vec<_>>(),
                    ),
                ));
            });
        Plot::new("accuracy")
            .height(h)
            .legend(Legend::default())
            .x_axis_label("epoch")
            .include_y(0.0)
            .include_y(1.0)
            .show(ui, |p| {
                p.line(Line::new(
                    "training accuracy",
                    PlotPoints::from(j.epochs.clone()),
                ));
            });
    }
}
