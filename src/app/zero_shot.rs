//! Zero-shot view: the image list and, per image, the probability of each prompt and the last
//! block's CLS attention over the patch grid.

use eframe::egui;

use super::ExplorerApp;
use crate::worker::ImageScore;

#[derive(Debug, Default, Clone)]
pub struct Scores {
    pub texts: Vec<String>,
    pub results: Vec<ImageScore>,
}

/// A perceptually ordered colormap (viridis anchors) for attention grids.
pub fn viridis(t: f32) -> egui::Color32 {
    const STOPS: [[f32; 3]; 5] = [
        [0.267, 0.005, 0.329],
        [0.229, 0.322, 0.546],
        [0.128, 0.567, 0.551],
        [0.369, 0.789, 0.383],
        [0.993, 0.906, 0.144],
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f32;
    let c: Vec<u8> = (0..3)
        .map(|k| ((STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f) * 255.0) as u8)
        .collect();
    egui::Color32::from_rgb(c[0], c[1], c[2])
}

fn attention_grid_ui(ui: &mut egui::Ui, values: &[f32], grid: usize, side: f32) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::hover());
    if grid == 0 || values.len() != grid * grid {
        return;
    }
    let max = values.iter().cloned().fold(f32::MIN, f32::max).max(1e-12);
    let min = values.iter().cloned().fold(f32::MAX, f32::min);
    let cell = side / grid as f32;
    let painter = ui.painter_at(rect);
    for (k, v) in values.iter().enumerate() {
        let (r, c) = (k / grid, k % grid);
        let min_pt = rect.min + egui::vec2(c as f32 * cell, r as f32 * cell);
        let t = if max > min {
            (v - min) / (max - min)
        } else {
            0.0
        };
        painter.rect_filled(
            egui::Rect::from_min_size(min_pt, egui::vec2(cell, cell)),
            0.0,
            viridis(t),
        );
    }
}

impl ExplorerApp {
    pub(super) fn images_ui(&mut self, ui: &mut egui::Ui) {
        ui.heading("Images");
        ui.horizontal(|ui| {
            if ui.button("Add images…").clicked() {
                if let Some(files) = rfd::FileDialog::new()
                    .add_filter(
                        "images",
                        &["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"],
                    )
                    .pick_files()
                {
                    self.state.images.extend(files);
                    self.score();
                }
            }
            if ui.button("Clear").clicked() {
                self.state.images.clear();
                self.scores = Scores::default();
            }
        });
        ui.weak("or drop image files on the window");
        let mut remove = None;
        egui::ScrollArea::vertical().show(ui, |ui| {
            for (i, p) in self.state.images.iter().enumerate() {
                ui.horizontal(|ui| {
                    if ui.small_button("Remove").clicked() {
                        remove = Some(i);
                    }
                    ui.label(
                        p.file_name()
                            .map(|f| f.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    );
                });
            }
        });
        if let Some(i) = remove {
            self.state.images.remove(i);
        }
        ui.separator();
        ui.heading("Prompts");
        ui.weak("one per line");
        ui.add(
            egui::TextEdit::multiline(&mut self.state.prompts)
                .desired_rows(6)
                .desired_width(f32::INFINITY),
        );
        let can_score = self.model.is_some() && !self.state.images.is_empty();
        if ui
            .add_enabled(can_score, egui::Button::new("Score"))
            .clicked()
        {
            self.score();
        }
    }

    pub(super) fn results_ui(&mut self, ui: &mut egui::Ui) {
        if self.scores.results.is_empty() {
            ui.centered_and_justified(|ui| {
                ui.weak(if self.model.is_none() {
                    "Load a model (a folder with config.json + model.safetensors, a weights file, or a hub id)"
                } else {
                    "Add images and prompts, then Score"
                });
            });
            return;
        }
        egui::ScrollArea::vertical().show(ui, |ui| {
            for r in &self.scores.results {
                ui.group(|ui| {
                    ui.horizontal(|ui| {
                        ui.vertical(|ui| {
                            ui.strong(
                                r.path
                                    .file_name()
                                    .map(|f| f.to_string_lossy().into_owned())
                                    .unwrap_or_default(),
                            );
                            ui.weak("CLS attention, last block");
                            attention_grid_ui(ui, &r.cls_attn, r.grid, 112.0);
                        });
                        ui.vertical(|ui| {
                            let best = r
                                .probs
                                .iter()
                                .cloned()
                                .enumerate()
                                .max_by(|a, b| a.1.total_cmp(&b.1))
                                .map(|x| x.0);
                            for (j, t) in self.scores.texts.iter().enumerate() {
                                let p = r.probs.get(j).copied().unwrap_or(0.0);
                                ui.horizontal(|ui| {
                                    ui.add(
                                        egui::ProgressBar::new(p)
                                            .desired_width(220.0)
                                            .text(format!("{:.1}%", 100.0 * p)),
                                    );
                                    let label = format!(
                                        "{t}  (cos {:.3})",
                                        r.cosine.get(j).copied().unwrap_or(0.0)
                                    );
                                    if Some(j) == best {
                                        ui.strong(label);
                                    } else {
                                        ui.label(label);
                                    }
                                });
                            }
                        });
                    });
                });
            }
        });
    }
}
