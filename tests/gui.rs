//! The explorer under egui_kittest with the wgpu renderer (software adapter): open the app,
//! wait for the demo world, click through the gallery filters, the inspector's heatmap modes,
//! the metrics and cache views, start a fine-tune and cancel it, asserting on the app state
//! after each step; a few snapshots, one with the heatmap shader visible.
#![cfg(feature = "gui")]

use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use textrefiner_explorer::app::{ExplorerApp, HeatMode, Persisted, Tab};
use textrefiner_explorer::data::dataset::Subset;
use textrefiner_explorer::eval::Flip;

fn harness() -> Harness<'static, ExplorerApp> {
    // SAFETY: set before the app's threads start.
    unsafe {
        std::env::set_var(
            "TEXTREFINER_CACHE",
            std::env::temp_dir().join(format!("textrefiner-gui-test-{}", std::process::id())),
        )
    };
    Harness::builder()
        .with_size(egui::vec2(1280.0, 800.0))
        .wgpu()
        .build_eframe(|cc| {
            let mut app = ExplorerApp::new(cc, Some(Persisted::default())).expect("app");
            app.show_frame_time = false;
            app
        })
}

/// Step the UI until `done` holds (background work repaints), or fail after a while.
fn step_until(
    h: &mut Harness<'static, ExplorerApp>,
    what: &str,
    done: impl Fn(&ExplorerApp) -> bool,
) {
    let t0 = Instant::now();
    while !done(h.state()) {
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "timed out waiting for {what}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.run_steps(3);
}

#[test]
fn click_through_the_explorer() {
    let mut h = harness();
    assert!(
        h.state().gpu_heatmaps,
        "the wgpu harness gives the app its renderer"
    );
    step_until(&mut h, "the demo world", |a| a.explore.is_some());
    {
        let e = h.state().explore.as_ref().unwrap();
        assert_eq!(e.methods.len(), 3);
        assert_eq!(e.images.len(), 24 * 50);
        assert_eq!(h.state().tab, Tab::Compare);
    }
    let all = h.state().visible_images().len();
    assert_eq!(all, 1200);

    // gallery filters: flip category and subset
    h.get_by_label("fixed").click();
    h.run_steps(2);
    assert_eq!(h.state().gallery.flip, Some(Flip::Fixed));
    let fixed = h.state().visible_images();
    {
        let a = h.state();
        let e = a.explore.as_ref().unwrap();
        assert!(fixed
            .iter()
            .all(|&i| e.flip(a.compare.0, a.compare.1, i).0 == Flip::Fixed));
    }
    h.get_by_label("any change").click();
    h.get_by_label("new").click();
    h.run_steps(2);
    assert_eq!(h.state().gallery.subset, Some(Subset::New));
    assert_eq!(h.state().visible_images().len(), 600);

    // keyboard: the right arrow selects the first visible image, then the next
    h.key_press(egui::Key::ArrowRight);
    h.run_steps(2);
    let first = h.state().visible_images()[0];
    assert_eq!(h.state().gallery.selected, Some(first));
    h.key_press(egui::Key::ArrowRight);
    h.run_steps(2);
    assert_eq!(
        h.state().gallery.selected,
        Some(h.state().visible_images()[1])
    );

    // the new images that CoOp + TextRefiner fixed (few, so that the snapshots stay small)
    h.get_by_label("fixed").click();
    h.run_steps(2);
    let fixed_new = h.state().visible_images();
    assert!(
        !fixed_new.is_empty() && fixed_new.len() < 50,
        "{}",
        fixed_new.len()
    );
    h.state_mut().gallery.selected = Some(fixed_new[0]);
    h.run_steps(2);

    // inspector heatmap modes
    assert_eq!(h.state().heat.mode, HeatMode::ClsAttention);
    let sel = h.state().gallery.selected.unwrap();
    let (_, _, _, _, outlined) = h.state().heat_values(sel).unwrap();
    assert_eq!(
        outlined.len(),
        5,
        "the semantic loss's five patches are outlined"
    );
    h.get_by_label("Patch-to-cache").click();
    h.run_steps(2);
    assert_eq!(h.state().heat.mode, HeatMode::CacheEntry);
    let (vals, lo, hi, _, _) = h.state().heat_values(sel).unwrap();
    assert_eq!(vals.len(), 64);
    assert!(
        lo < hi && hi <= 1.0 + 1e-5 && lo >= -1.0 - 1e-5,
        "cosines: {lo} {hi}"
    );
    h.snapshot("inspector_patch_to_cache");
    h.get_by_label("Class map").click();
    h.run_steps(2);
    assert_eq!(h.state().heat.mode, HeatMode::ClassMap);
    h.get_by_label("CLS attention").click();
    h.run_steps(2);
    h.snapshot("compare_cls_attention");

    // metrics, and a confusion cell filtering the gallery
    h.get_by_label("Metrics").click();
    h.run_steps(2);
    assert_eq!(h.state().tab, Tab::Metrics);
    h.snapshot("metrics");
    h.state_mut().filter_confusion_cell(Subset::Base, 0, 1);
    h.run_steps(2);
    assert_eq!(h.state().tab, Tab::Compare);
    {
        let a = h.state();
        let e = a.explore.as_ref().unwrap();
        let v = a.visible_images();
        assert!(!v.is_empty());
        assert!(v.iter().all(|&i| e.images[i].label == 0
            && e.images[i].subset == Subset::Base
            && e.predict(a.compare.1, i) == 1));
        assert_eq!(v.len() as u32, e.confusion(a.compare.1, Subset::Base)[0][1]);
    }

    // cache view: switching an entry off re-scores the refined method
    h.get_by_label("Cache").click();
    h.run_steps(2);
    assert_eq!(h.state().tab, Tab::Cache);
    let before = h.state().explore.as_ref().unwrap().methods[2].base.clone();
    h.get_by_label("3").click();
    h.run_steps(2);
    assert!(!h.state().whatif.enabled[3]);
    assert!(h.state().whatif.active);
    assert_ne!(h.state().explore.as_ref().unwrap().methods[2].base, before);
    h.get_by_label("Reset").click();
    h.run_steps(2);
    assert!(!h.state().whatif.active);
    assert_eq!(h.state().explore.as_ref().unwrap().methods[2].base, before);
    h.snapshot("cache");

    // fine-tune: start, see steps, cancel
    h.get_by_label("Fine-tune").click();
    h.run_steps(2);
    h.state_mut().state.finetune.epochs = 200;
    h.get_by_label("Start").click();
    h.run_steps(1);
    assert!(h.state().job.as_ref().map(|j| j.running).unwrap_or(false));
    step_until(&mut h, "training steps", |a| {
        a.job.as_ref().map(|j| j.steps.len() >= 3).unwrap_or(false)
    });
    h.get_by_label("Cancel").click();
    step_until(&mut h, "the cancelled run", |a| {
        a.job.as_ref().map(|j| !j.running).unwrap_or(false)
    });
    let status = h.state().job.as_ref().unwrap().status.clone();
    assert!(status.contains("cancelled"), "{status}");
    assert!(
        h.state().notifications.is_empty(),
        "{:?}",
        h.state().notifications
    );
    assert_eq!(
        h.state().explore.as_ref().unwrap().methods.len(),
        3,
        "a cancelled run is not added"
    );
}

#[test]
fn a_bad_model_is_one_notification_and_the_app_keeps_working() {
    let mut h = harness();
    step_until(&mut h, "the demo world", |a| a.explore.is_some());
    h.state_mut().load_model("/nonexistent/model-folder".into());
    step_until(&mut h, "the load error", |a| !a.notifications.is_empty());
    assert_eq!(h.state().notifications.len(), 1);
    assert!(
        h.state().notifications[0].contains("/nonexistent/model-folder"),
        "{:?}",
        h.state().notifications
    );
    // the comparison is still there and the UI still responds
    h.get_by_label("Metrics").click();
    h.run_steps(2);
    assert_eq!(h.state().tab, Tab::Metrics);
    assert!(h.state().explore.is_some());
    // a dataset folder that does not exist: the reason replaces the views and is notified once
    h.state_mut().state.data = "/nonexistent/dataset".into();
    h.state_mut().load_model("embedded".into());
    step_until(&mut h, "the data error", |a| a.explore_failed.is_some());
    assert!(h.state().explore_failed.as_ref().unwrap().contains("/nonexistent/dataset"));
    assert_eq!(h.state().notifications.len(), 2, "{:?}", h.state().notifications);
    h.get_by_label("Compare").click();
    h.run_steps(2);
    assert!(h.query_by_label_contains("could not be prepared").is_some());
}

/// A measurement, not a check (run it with `--ignored --nocapture`): the time of one inspector
/// frame with a heatmap on cached features, UI logic and the wgpu render separately, on the
/// software adapter. BENCHMARKS.md records the figures.
#[test]
#[ignore]
fn frame_time_of_the_inspector_with_a_heatmap() {
    let mut h = harness();
    step_until(&mut h, "the demo world", |a| a.explore.is_some());
    h.state_mut().gallery.selected = Some(0);
    h.run_steps(2);
    h.get_by_label("Patch-to-cache").click();
    h.run_steps(3);
    let n = 60;
    let mut ui_ms = Vec::new();
    let mut render_ms = Vec::new();
    for k in 0..n {
        // change what the heatmap shows every frame, as dragging the entry slider does
        h.state_mut().heat.entry = k % 25;
        let t0 = Instant::now();
        h.step();
        ui_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        let t1 = Instant::now();
        let _ = h.render().expect("render");
        render_ms.push(t1.elapsed().as_secs_f64() * 1000.0);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("inspector frame with a heatmap: UI logic {:.2} ms, render (wgpu, software adapter, readback included) {:.2} ms (medians of {n})", med(ui_ms), med(render_ms));
}
