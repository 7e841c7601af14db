//! The engine's commands end to end through the binary: train (saving a checkpoint), eval with
//! JSON and CSV, compare, import-checkpoint, and their errors.

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_textrefiner-explorer"));
    c.env_remove("TEXTREFINER_FEATURES");
    c
}

fn run(args: &[&str], cache: &std::path::Path) -> (bool, String, String) {
    let out = bin()
        .args(args)
        .arg("--feature-cache")
        .arg(cache)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn train_eval_compare_import() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("bank");
    let small = [
        "--shots",
        "2",
        "--epochs",
        "2",
        "--test-per-class",
        "4",
        "--views",
        "2",
    ];
    let coop = dir.path().join("coop");
    let refined = dir.path().join("refined");
    for (method, stem) in [("coop", &coop), ("coop-refiner", &refined)] {
        let mut args = vec![
            "train",
            "--method",
            method,
            "--json",
            "--save",
            stem.to_str().unwrap(),
        ];
        args.extend(small);
        let (ok, out, err) = run(&args, &cache);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["base_classes"], 12);
        assert_eq!(v["train_images"], 24);
        assert_eq!(v["base_test_images"], 48);
        let hm = v["trained"]["hm"].as_f64().unwrap();
        let (b, n) = (
            v["trained"]["base"].as_f64().unwrap(),
            v["trained"]["new"].as_f64().unwrap(),
        );
        assert!((hm - 2.0 * b * n / (b + n)).abs() < 1e-6);
        assert!(
            stem.with_extension("safetensors").is_file() && stem.with_extension("json").is_file()
        );
    }
    // eval: JSON with per-class accuracy and the confusion matrix, CSV per image
    let csv = dir.path().join("pred.csv");
    let (ok, out, err) = run(
        &[
            "eval",
            "--checkpoint",
            refined.to_str().unwrap(),
            "--test-per-class",
            "4",
            "--json",
            "--csv",
            csv.to_str().unwrap(),
        ],
        &cache,
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["method"], "CoOp + TextRefiner");
    let conf = v["base"]["confusion"].as_array().unwrap();
    assert_eq!(conf.len(), 12);
    let total: u64 = conf
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(total, 48);
    let correct: u64 = v["base"]["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["correct"].as_u64().unwrap())
        .sum();
    assert!((correct as f64 / 48.0 - v["summary"]["base"].as_f64().unwrap()).abs() < 1e-6);
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 1 + 48 + 48);
    assert!(text.starts_with("subset,image,label,prediction,correct"));
    // zero-shot with a template file
    let templates = dir.path().join("t.txt");
    std::fs::write(&templates, "a photo of a {}.\na drawing of a {}.\n").unwrap();
    let (ok, out, err) = run(
        &[
            "eval",
            "--templates",
            templates.to_str().unwrap(),
            "--test-per-class",
            "4",
            "--per-class",
        ],
        &cache,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("zero-shot CLIP (2 templates)")
            && out.contains("red kite with a striped tail"),
        "{out}"
    );
    // compare: flip counts add up to the images
    let (ok, out, err) = run(
        &[
            "compare",
            "--coop",
            coop.to_str().unwrap(),
            "--refined",
            refined.to_str().unwrap(),
            "--test-per-class",
            "4",
            "--json",
        ],
        &cache,
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for subset in v.as_array().unwrap() {
        let c = &subset["comparison"]["counts"];
        let sum: u64 = ["fixed", "broken", "both_right", "both_wrong"]
            .iter()
            .map(|k| c[k].as_u64().unwrap())
            .sum();
        assert_eq!(sum, 48);
        let first = &subset["comparison"]["images"][0];
        assert_eq!(first["a_top5"].as_array().unwrap().len(), 5);
    }
    // import a reference run, then evaluate it
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/reference/run/seed1"
    );
    let imported = dir.path().join("imported");
    let out = bin()
        .args([
            "import-checkpoint",
            "--run",
            fixture,
            "--out",
            imported.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("with TextRefiner cache"));
    let (ok, _, err) = run(
        &[
            "eval",
            "--checkpoint",
            imported.to_str().unwrap(),
            "--test-per-class",
            "2",
        ],
        &cache,
    );
    assert!(ok, "{err}");
    // the reference run folder directly
    let (ok, out, err) = run(
        &["eval", "--checkpoint", fixture, "--test-per-class", "2"],
        &cache,
    );
    assert!(ok && out.contains("CoOp + TextRefiner"), "{err}");
    // errors: unknown method, missing dataset, checkpoint of other classes (world with another
    // seed has the same names, so use a folder dataset)
    let (ok, _, err) = run(&["train", "--method", "cocoop"], &cache);
    assert!(!ok && err.contains("unknown method"), "{err}");
    let (ok, _, err) = run(&["eval", "--data", "/nonexistent/pets"], &cache);
    assert!(!ok && err.contains("/nonexistent/pets"), "{err}");
}
