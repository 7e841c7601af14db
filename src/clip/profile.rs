//! A switchable per-stage timer for the transformer forward (`bench --profile`): where the
//! time of an encoder pass goes (GEMMs, attention products, softmax, layer norm, fused
//! element-wise work, copies). Off by default; when off it costs one atomic load per stage.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn reset() {
    if let Ok(mut t) = TOTALS.lock() {
        t.clear();
    }
}

/// Time `f` under `stage` when profiling is on.
#[inline]
pub fn time<T>(stage: &'static str, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let t0 = Instant::now();
    let out = f();
    let dt = t0.elapsed();
    if let Ok(mut t) = TOTALS.lock() {
        let e = t.entry(stage).or_default();
        e.0 += dt;
        e.1 += 1;
    }
    out
}

/// Stages with total seconds and call counts, largest first.
pub fn report() -> Vec<(&'static str, f64, u64)> {
    let mut v: Vec<_> = TOTALS
        .lock()
        .map(|t| {
            t.iter()
                .map(|(k, (d, n))| (*k, d.as_secs_f64(), *n))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
