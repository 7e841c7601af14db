//! Cache view: the class x entry read-weight matrix of the CoOp + TextRefiner run, the cache
//! atlas (per entry, the test patches closest to it), the nearest vocabulary words of each
//! learned context vector, and the what-if controls (alpha, per-entry switches) that re-score
//! everything instantly.

use eframe::egui;

use super::ExplorerApp;
use crate::colormap::Colormap;
use crate::data::dataset::Subset;

/// What-if settings of the refined run.
#[derive(Debug, Clone, Default)]
pub struct WhatIf {
    pub alpha: f32,
    pub enabled: Vec<bool>,
    /// Whether the refined method currently shows re-scored features.
    pub active: bool,
}

impl ExplorerApp {
    pub(super) fn cache_ui(&mut self, ui: &mut egui::Ui) {
        let Some(e) = &self.explore else {
            ui.weak("Preparing …");
            return;
        };
        let m = e.num_entries();
        if m == 0 {
            ui.weak("No CoOp + TextRefiner run: the cache view needs one.");
            return;
        }
        if self.whatif.enabled.len() != m {
            self.whatif.enabled = vec![true; m];
        }
        // what-if controls
        let mut changed = false;
        ui.horizontal(|ui| {
            ui.strong("What-if:");
            changed |= ui
                .add(egui::Slider::new(&mut self.whatif.alpha, 0.0..=1.0).text("alpha"))
                .changed();
            if ui.button("All entries on").clicked() {
                self.whatif.enabled.iter_mut().for_each(|x| *x = true);
                changed = true;
            }
            if ui.button("Reset").clicked() {
                self.reset_whatif();
            }
        });
        ui.horizontal_wrapped(|ui| {
            ui.label("entries:");
            for k in 0..m {
                changed |= ui
                    .checkbox(&mut self.whatif.enabled[k], format!("{k}"))
                    .changed();
            }
        });
        if changed {
            self.apply_whatif();
        }
        let Some(e) = &self.explore else { return };
        ui.horizontal(|ui| {
            ui.label(format!(
                "CoOp + TextRefiner now: base {:.1}%, new {:.1}%",
                100.0 * e.accuracy(crate::explore::REFINED, Subset::Base),
                100.0 * e.accuracy(crate::explore::REFINED, Subset::New)
            ));
        });
        ui.separator();
        ui.columns(2, |cols| {
            let ui = &mut cols[0];
            ui.strong("Read weights A_cache(t): classes (rows) x cache entries (columns)");
            for s in [Subset::Base, Subset::New] {
                let names = e.names(s);
                let w = e.read_weights(s, &self.whatif.enabled);
                let c = names.len();
                let cell = ((ui.available_width() - 10.0) / m as f32).clamp(4.0, 18.0);
                ui.weak(if s == Subset::Base {
                    "base classes"
                } else {
                    "new classes"
                });
                let (rect, resp) = ui.allocate_exact_size(
                    egui::vec2(cell * m as f32, cell * c as f32),
                    egui::Sense::hover(),
                );
                let max = w.iter().cloned().fold(f32::MIN, f32::max);
                let min = w.iter().cloned().fold(f32::MAX, f32::min);
                let p = ui.painter_at(rect);
                for i in 0..c {
                    for k in 0..m {
                        let [r, g, b] = Colormap::Viridis
                            .sample_u8((w[i * m + k] - min) / (max - min).max(1e-9));
                        let cr = egui::Rect::from_min_size(
                            rect.min + egui::vec2(k as f32 * cell, i as f32 * cell),
                            egui::vec2(cell, cell),
                        );
                        p.rect_filled(cr, 0.0, egui::Color32::from_rgb(r, g, b));
                    }
                }
                super::heatmap::legend_ui(ui, Colormap::Viridis, min, max, "read weight");
                if let Some(pos) = resp.hover_pos() {
                    let k = ((pos.x - rect.left()) / cell) as usize;
                    let i = ((pos.y - rect.top()) / cell) as usize;
                    if i < c && k < m {
                        resp.on_hover_text(format!("{}\nentry {k}: {:.3}", names[i], w[i * m + k]));
                    }
                }
            }
            ui.separator();
            ui.strong("Learned context: nearest vocabulary words");
            for (j, words) in e.ctx_words.iter().enumerate() {
                let w: Vec<String> = words.iter().map(|(t, v)| format!("{t} ({v:.2})")).collect();
                ui.label(format!("ctx {j}: {}", w.join(", ")));
            }
            let ui = &mut cols[1];
            ui.strong("Cache atlas: the test patches closest to each entry");
            ui.add(egui::Slider::new(&mut self.heat.entry, 0..=m - 1).text("entry"));
            let k = self.heat.entry.min(m - 1);
            let top = e.atlas(k, 12);
            let g = e.grid;
            ui.horizontal_wrapped(|ui| {
                for (i, p, v) in top {
                    let Some(t) = self.gallery.textures.get(i) else {
                        continue;
                    };
                    let (r, c) = (p / g, p % g);
                    // a 3 x 3 patch neighbourhood around the patch, from the image texture
                    let (r0, c0) = (r.saturating_sub(1), c.saturating_sub(1));
                    let (r1, c1) = ((r + 2).min(g), (c + 2).min(g));
                    let uv = egui::Rect::from_min_max(
                        egui::pos2(c0 as f32 / g as f32, r0 as f32 / g as f32),
                        egui::pos2(c1 as f32 / g as f32, r1 as f32 / g as f32),
                    );
                    let resp = ui.add(
                        egui::Image::new((t.id(), egui::vec2(64.0, 64.0)))
                            .uv(uv)
                            .sense(egui::Sense::click()),
                    );
                    let resp = resp.on_hover_text(format!(
                        "{}\npatch ({r}, {c}) cosine {v:.3}",
                        e.images[i].name
                    ));
                    if resp.clicked() {
                        self.atlas_clicked = Some(i);
                    }
                }
            });
        });
        if let Some(i) = self.atlas_clicked.take() {
            self.gallery.selected = Some(i);
            self.heat.mode = super::gallery::HeatMode::CacheEntry;
            self.tab = super::Tab::Compare;
        }
    }

    /// Re-score the refined method with the what-if settings.
    pub fn apply_whatif(&mut self) {
        self.scores_version += 1;
        let Some(e) = self.explore.as_mut() else {
            return;
        };
        let (Some(orig), Some(r)) = (&self.refined_original, &e.refiner) else {
            return;
        };
        let default =
            (self.whatif.alpha - r.alpha).abs() < 1e-6 && self.whatif.enabled.iter().all(|x| *x);
        if default {
            e.methods[crate::explore::REFINED] = orig.clone();
            self.whatif.active = false;
            return;
        }
        let base = e.refined_with(Subset::Base, self.whatif.alpha, &self.whatif.enabled);
        let new = e.refined_with(Subset::New, self.whatif.alpha, &self.whatif.enabled);
        let m = &mut e.methods[crate::explore::REFINED];
        m.base = base;
        m.new = new;
        self.whatif.active = true;
    }

    pub fn reset_whatif(&mut self) {
        if let Some(r) = self.explore.as_ref().and_then(|e| e.refiner.as_ref()) {
            self.whatif.alpha = r.alpha;
        }
        self.whatif.enabled.iter_mut().for_each(|x| *x = true);
        self.apply_whatif();
    }
}
