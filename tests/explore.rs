//! The model thread's exploration of the demo world: data, the three methods, the what-if
//! re-scoring (which must reproduce the refined run's own features at its alpha, and CoOp's
//! at alpha 0), heatmaps and the training job with cancel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use textrefiner_explorer::data::dataset::Subset;
use textrefiner_explorer::explore::{Exploration, REFINED};
use textrefiner_explorer::train::{Method, TrainConfig};
use textrefiner_explorer::worker::{Event, Request, Worker};

fn wait<T>(w: &Worker, mut f: impl FnMut(Event) -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while std::time::Instant::now() < deadline {
        if let Some(e) = w.recv_timeout(Duration::from_millis(200)) {
            if let Some(t) = f(e) {
                return t;
            }
        }
    }
    panic!("timed out");
}

#[test]
fn explore_world_what_if_and_training_job() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: set before any thread of this test binary reads it.
    unsafe { std::env::set_var("TEXTREFINER_CACHE", dir.path()) };
    let mut w = Worker::spawn(|| {}).unwrap();
    w.send(Request::LoadModel {
        spec: "embedded".into(),
    });
    w.send(Request::Explore {
        data: "world".into(),
        shots: 4,
        seed: 1,
        test_per_class: Some(3),
    });
    let mut fractions = 0;
    let e: Box<Exploration> = wait(&w, |ev| match ev {
        Event::Fraction { .. } => {
            fractions += 1;
            None
        }
        Event::Explored { result, .. } => Some(result.unwrap()),
        _ => None,
    });
    assert!(fractions > 0, "progress was reported");
    assert_eq!(e.methods.len(), 3);
    assert_eq!(e.images.len(), 24 * 3);
    assert_eq!(e.base_names.len(), 12);
    let m = e.num_entries();
    assert_eq!(m, 25);
    assert_eq!(e.images[0].patch_cache.len(), 64 * m);
    assert_eq!(e.images[0].rgb.len(), 64 * 64 * 3);
    // what-if at the run's own alpha with every entry on reproduces the refined features
    let all = vec![true; m];
    let r = e.refiner.as_ref().unwrap();
    for s in [Subset::Base, Subset::New] {
        let again = e.refined_with(s, r.alpha, &all);
        let own = if s == Subset::Base {
            &e.methods[REFINED].base
        } else {
            &e.methods[REFINED].new
        };
        let diff = again
            .iter()
            .zip(own)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "{s:?}: {diff}");
        // alpha 0 leaves the CoOp features of the refined run's context
        let t = if s == Subset::Base {
            &r.t_base
        } else {
            &r.t_new
        };
        assert_eq!(&e.refined_with(s, 0.0, &all), t);
    }
    // read weights are a distribution over the enabled entries
    let mut some = all.clone();
    some[3] = false;
    let rw = e.read_weights(Subset::Base, &some);
    for row in rw.chunks(m) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(row[3], 0.0);
    }
    // class map = read weights . entry maps
    let cm = e.class_map(0, 2, &all);
    let rw = e.read_weights(Subset::Base, &all);
    let manual: f32 = (0..m).map(|k| rw[2 * m + k] * e.entry_map(0, k)[5]).sum();
    assert!((cm[5] - manual).abs() < 1e-5);
    assert_eq!(e.atlas(0, 4).len(), 4);
    assert_eq!(e.ctx_words.len(), 4);

    // a training job: steps arrive, cancel stops it with a message
    let cancel = Arc::new(AtomicBool::new(false));
    let cfg = TrainConfig {
        method: Method::CoopRefiner,
        epochs: 50,
        ..Default::default()
    };
    w.send(Request::Train {
        cfg,
        shots: None,
        name: "run".into(),
        cancel: cancel.clone(),
        save: None,
    });
    let mut steps = 0;
    let err = wait(&w, |ev| match ev {
        Event::TrainStep { .. } => {
            steps += 1;
            if steps == 3 {
                cancel.store(true, Ordering::Relaxed);
            }
            None
        }
        Event::TrainDone { result, .. } => Some(result.unwrap_err()),
        _ => None,
    });
    assert!(err.contains("cancelled"), "{err}");
    // a short job finishes, saves its checkpoint and comes back as a method
    let stem = dir.path().join("runs/short");
    let cfg = TrainConfig {
        method: Method::Coop,
        epochs: 2,
        ..Default::default()
    };
    w.send(Request::Train {
        cfg,
        shots: Some(2),
        name: "short".into(),
        cancel: Arc::new(AtomicBool::new(false)),
        save: Some(stem.clone()),
    });
    let mut spe = 0;
    let out = wait(&w, |ev| match ev {
        Event::TrainStep { event: textrefiner_explorer::train::TrainEvent::Step { steps_per_epoch, .. }, .. } => {
            spe = steps_per_epoch;
            None
        }
        Event::TrainDone { result, .. } => Some(result.unwrap()),
        _ => None,
    });
    assert_eq!(spe, 1, "2 shots x 12 classes = 24 images: one batch per epoch");
    assert_eq!(out.method.base.len(), 12 * e.d);
    assert!(stem.with_extension("json").is_file());
    // and the checkpoint can be added to the comparison; a bad one is an error message
    w.send(Request::AddCheckpoint { path: stem });
    let added = wait(&w, |ev| match ev {
        Event::MethodAdded { result, .. } => Some(result),
        _ => None,
    });
    assert_eq!(added.unwrap().name, "short");
    w.send(Request::AddCheckpoint {
        path: dir.path().join("nope"),
    });
    let bad = wait(&w, |ev| match ev {
        Event::MethodAdded { result, .. } => Some(result),
        _ => None,
    });
    assert!(bad.unwrap_err().contains("nope"));
}

/// The runs shipped in assets/runs are what the documented command produces: retraining with
/// the same recipe gives the same context and refiner.
#[test]
fn shipped_runs_are_reproducible() {
    use textrefiner_explorer::clip::Clip;
    use textrefiner_explorer::experiment::{prepare, run, DataSpec};
    use textrefiner_explorer::features::FeatureBank;
    let clip = Clip::load("embedded", &candle_core::Device::Cpu).unwrap();
    let (coop, refined) = textrefiner_explorer::checkpoint::shipped_runs(&clip, &candle_core::Device::Cpu).unwrap();
    let cancel = AtomicBool::new(false);
    let p = prepare(&clip, &FeatureBank::none(), &DataSpec { test_per_class: Some(2), ..Default::default() }, |_| {}, &cancel).unwrap();
    assert_eq!(coop.learner.class_names, p.base.class_names);
    for (shipped, method) in [(&coop, Method::Coop), (&refined, Method::CoopRefiner)] {
        let (again, _) = run(&clip, &p, &TrainConfig { method, ..Default::default() }, &cancel, None, |_| {}).unwrap();
        let d = (shipped.learner.ctx.as_tensor() - again.learner.ctx.as_tensor()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{method:?}: ctx differs by {d}");
        if let (Some(a), Some(b)) = (&shipped.refiner, &again.refiner) {
            let d = (&a.cache.memory - &b.cache.memory).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-3, "cache differs by {d}");
        }
    }
}
