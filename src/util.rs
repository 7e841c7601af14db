//! Small file helpers shared by the core.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// A temporary path beside `path`, unique per process, thread and call (two writers of the
/// same target, in one process or two, never share a temporary file).
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".{name}.tmp{}-{n}", std::process::id()))
}

/// Targets whose next write fails half way (fault injection for tests of atomic writes).
static FAIL_NEXT: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Make the next atomic write to `path` fail after writing half of its temporary file, as a
/// full disk or a crash would (for tests).
#[doc(hidden)]
pub fn inject_write_failure(path: &Path) {
    if let Ok(mut v) = FAIL_NEXT.lock() {
        v.push(path.to_path_buf());
    }
}

fn take_injected(path: &Path) -> bool {
    match FAIL_NEXT.lock() {
        Ok(mut v) => match v.iter().position(|p| p == path) {
            Some(i) => {
                v.remove(i);
                true
            }
            None => false,
        },
        Err(_) => false,
    }
}

fn write_temp(path: &Path, bytes: &[u8]) -> std::io::Result<std::path::PathBuf> {
    let tmp = temp_path(path);
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        if take_injected(path) {
            f.write_all(&bytes[..bytes.len() / 2])?;
            return Err(std::io::Error::other(
                "injected failure half way through the write",
            ));
        }
        f.write_all(bytes)?;
        f.sync_all()
    })();
    match res {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Write several files so that either all are replaced or none: every temporary file is
/// written and synced first, then each is renamed over its target. A failure while writing
/// leaves every previous file untouched.
pub fn write_atomic_all(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut temps = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        match write_temp(path, bytes) {
            Ok(t) => temps.push(t),
            Err(e) => {
                for t in &temps {
                    let _ = std::fs::remove_file(t);
                }
                return Err(Error::io(path, e));
            }
        }
    }
    for ((path, _), tmp) in files.iter().zip(&temps) {
        if let Err(e) = std::fs::rename(tmp, path) {
            for t in &temps {
                let _ = std::fs::remove_file(t);
            }
            return Err(Error::io(path, e));
        }
    }
    Ok(())
}

/// Write `bytes` to `path` atomically: a temporary file in the same folder, flushed and
/// synced, then renamed over the target. A failure leaves any previous file untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_all(&[(path, bytes)])
}

/// Tensors as safetensors bytes.
pub fn safetensors_bytes(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, candle_core::Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    safetensors::tensor::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), None)
        .map_err(|e| Error::weights(path, format!("cannot serialise: {e}")))
}

/// Save tensors as safetensors atomically (temporary file in the same folder, then rename).
pub fn save_safetensors_atomic(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    write_atomic(path, &safetensors_bytes(path, tensors)?)
}
