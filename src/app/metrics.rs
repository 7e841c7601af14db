//! Metrics: base / new / HM of every method side by side, per-class accuracy bars of the two
//! compared methods, and the confusion matrix of method B as a heatmap where clicking a cell
//! filters the gallery to those images.

use eframe::egui;

use super::{ExplorerApp, Tab};
use crate::colormap::Colormap;
use crate::data::dataset::Subset;
use crate::train::harmonic_mean;

impl ExplorerApp {
    pub(super) fn metrics_ui(&mut self, ui: &mut egui::Ui) {
        let Some(e) = &self.explore else {
            ui.weak("Preparing …");
            return;
        };
        ui.heading(format!(
            "{}: base {} classes, new {} classes, {} test images",
            e.data_name,
            e.base_names.len(),
            e.new_names.len(),
            e.images.len()
        ));
        let mut set_a = None;
        let mut set_b = None;
        egui::Grid::new("methods")
            .striped(true)
            .num_columns(6)
            .show(ui, |ui| {
                ui.strong("method");
                ui.strong("base");
                ui.strong("new");
                ui.strong("HM");
                ui.strong("compare as A");
                ui.strong("compare as B");
                ui.end_row();
                for (m, meth) in e.methods.iter().enumerate() {
                    let (b, n) = (e.accuracy(m, Subset::Base), e.accuracy(m, Subset::New));
                    ui.label(&meth.name);
                    ui.label(format!("{:.1}", 100.0 * b));
                    ui.label(format!("{:.1}", 100.0 * n));
                    ui.label(format!("{:.1}", 100.0 * harmonic_mean(b, n)));
                    if ui.radio(self.compare.0 == m, "A").clicked() {
                        set_a = Some(m);
                    }
                    if ui.radio(self.compare.1 == m, "B").clicked() {
                        set_b = Some(m);
                    }
                    ui.end_row();
                }
            });
        if self.whatif.active {
            ui.weak(format!("what-if active: CoOp + TextRefiner re-scored with alpha {:.2} and {} of {} cache entries", self.whatif.alpha, self.whatif.enabled.iter().filter(|x| **x).count(), self.whatif.enabled.len()));
        }
        if let Some(m) = set_a {
            self.compare.0 = m;
        }
        if let Some(m) = set_b {
            self.compare.1 = m;
        }
        let Some(e) = &self.explore else { return };
        let (a, b) = self.compare;
        ui.horizontal(|ui| {
            ui.label("Subset:");
            ui.selectable_value(&mut self.metrics_subset, Subset::Base, "base");
            ui.selectable_value(&mut self.metrics_subset, Subset::New, "new");
        });
        let s = self.metrics_subset;
        let names = e.names(s).to_vec();
        let conf_a = e.confusion(a, s);
        let conf_b = e.confusion(b, s);
        let mut clicked: Option<(u32, u32)> = None;
        ui.columns(2, |cols| {
            let ui = &mut cols[0];
            ui.strong(format!(
                "Per-class accuracy: {} (blue) vs {} (orange)",
                e.methods[a].name, e.methods[b].name
            ));
            egui::ScrollArea::vertical()
                .id_salt("per-class")
                .max_height(ui.available_height())
                .show(ui, |ui| {
                    for (c, n) in names.iter().enumerate() {
                        let acc = |conf: &Vec<Vec<u32>>| {
                            conf[c][c] as f32 / conf[c].iter().sum::<u32>().max(1) as f32
                        };
                        let (xa, xb) = (acc(&conf_a), acc(&conf_b));
                        ui.horizontal(|ui| {
                            let (r, _) = ui
                                .allocate_exact_size(egui::vec2(180.0, 14.0), egui::Sense::hover());
                            let p = ui.painter();
                            p.rect_filled(
                                egui::Rect::from_min_size(r.min, egui::vec2(180.0 * xa, 6.0)),
                                1.0,
                                egui::Color32::from_rgb(100, 150, 230),
                            );
                            p.rect_filled(
                                egui::Rect::from_min_size(
                                    r.min + egui::vec2(0.0, 7.0),
                                    egui::vec2(180.0 * xb, 6.0),
                                ),
                                1.0,
                                egui::Color32::from_rgb(240, 160, 60),
                            );
                            ui.label(format!("{:>3.0} / {:>3.0}  {}", 100.0 * xa, 100.0 * xb, n));
                        });
                    }
                });
            let ui = &mut cols[1];
            ui.strong(format!(
                "Confusion of {} (rows: true, columns: predicted) — click a cell",
                e.methods[b].name
            ));
            let c = names.len();
            let side = (ui.available_width() - 10.0).clamp(120.0, 480.0);
            let (rect, resp) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::click());
            let cell = side / c.max(1) as f32;
            let max = conf_b.iter().flatten().copied().max().unwrap_or(1).max(1) as f32;
            let p = ui.painter_at(rect);
            for (i, row) in conf_b.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    let [r, g, bb] = Colormap::Magma.sample_u8(v as f32 / max);
                    let cr = egui::Rect::from_min_size(
                        rect.min + egui::vec2(j as f32 * cell, i as f32 * cell),
                        egui::vec2(cell, cell),
                    );
                    p.rect_filled(cr.shrink(0.5), 0.0, egui::Color32::from_rgb(r, g, bb));
                    if cell > 22.0 && v > 0 {
                        p.text(
                            cr.center(),
                            egui::Align2::CENTER_CENTER,
                            v.to_string(),
                            egui::FontId::monospace(10.0),
                            egui::Color32::WHITE,
                        );
                    }
                }
            }
            if let Some(pos) = resp.interact_pointer_pos() {
                if resp.clicked() {
                    let j = ((pos.x - rect.left()) / cell) as u32;
                    let i = ((pos.y - rect.top()) / cell) as u32;
                    if (i as usize) < c && (j as usize) < c {
                        clicked = Some((i, j));
                    }
                }
            }
            if let Some(pos) = resp.hover_pos() {
                let j = ((pos.x - rect.left()) / cell) as usize;
                let i = ((pos.y - rect.top()) / cell) as usize;
                if i < c && j < c {
                    resp.clone().on_hover_text(format!(
                        "true {}\npredicted {}\n{} images",
                        names[i], names[j], conf_b[i][j]
                    ));
                }
            }
        });
        if let Some((t, p)) = clicked {
            self.filter_confusion_cell(s, t, p);
        }
    }

    /// Show the images of true class `t` predicted as `p` (by method B) in the gallery.
    pub fn filter_confusion_cell(&mut self, s: Subset, t: u32, p: u32) {
        self.gallery.subset = Some(s);
        self.gallery.class = Some((s, t));
        self.gallery.predicted = Some(p);
        self.gallery.flip = None;
        self.tab = Tab::Compare;
    }
}
