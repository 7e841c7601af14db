//! Dataset readers on small trees made here: folder per class (with non-image files, an empty
//! class folder, classnames.txt), CoOp's split_zhou_*.json layout, FGVCAircraft's variant
//! files, ImageNet's classnames.txt; missing split files; and the feature bank (reuse and
//! invalidation by content).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::Device;
use textrefiner_explorer::clip::Clip;
use textrefiner_explorer::data::dataset::{Dataset, ImageRef, Layout, Subset};
use textrefiner_explorer::data::world::{Split, World};
use textrefiner_explorer::features::{extract, FeatureBank, Views};

fn write_png(path: &Path, class: usize, index: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    World::new(1, 64)
        .image(Split::Test, class, index)
        .save(path)
        .unwrap();
}

fn folder_tree(root: &Path) {
    for (c, name) in ["blue_fish", "red_kite", "green_beetle"].iter().enumerate() {
        for i in 0..6 {
            write_png(&root.join(name).join(format!("img{i}.png")), c * 3, i);
        }
    }
    std::fs::write(root.join("red_kite").join("notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("blue_fish").join(".DS_Store"), [0u8; 8]).unwrap();
}

#[test]
fn image_folder_names_labels_and_skips() {
    let dir = tempfile::tempdir().unwrap();
    folder_tree(dir.path());
    let d = Dataset::open(dir.path().to_str().unwrap(), 64).unwrap();
    assert_eq!(d.layout, Layout::ImageFolder);
    assert_eq!(
        d.class_names,
        vec!["blue fish", "green beetle", "red kite"],
        "sorted folders, _ read as space"
    );
    assert_eq!(d.skipped.len(), 2, "{:?}", d.skipped);
    assert_eq!(d.train.len() + d.test.len(), 18);
    assert!(!d.train.is_empty() && !d.test.is_empty());
    // the 50/50 split is stable: the same listing gives the same split
    let again = Dataset::open(dir.path().to_str().unwrap(), 64).unwrap();
    assert_eq!(d.train, again.train);
    // classnames.txt overrides names
    std::fs::write(
        dir.path().join("classnames.txt"),
        "red_kite Milvus milvus\n",
    )
    .unwrap();
    let d = Dataset::open(dir.path().to_str().unwrap(), 64).unwrap();
    assert_eq!(d.class_names[2], "Milvus milvus");
    // base / new: ceil(3 / 2) = 2 base classes
    assert_eq!(d.subset(Subset::Base).num_classes(), 2);
    assert_eq!(d.subset(Subset::New).class_names, vec!["Milvus milvus"]);
}

#[test]
fn empty_class_folder_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    folder_tree(dir.path());
    std::fs::create_dir_all(dir.path().join("yellow_moth")).unwrap();
    std::fs::write(dir.path().join("yellow_moth").join("readme.md"), "x").unwrap();
    let err = Dataset::open(dir.path().to_str().unwrap(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("yellow_moth") && err.contains("no images"),
        "{err}"
    );
}

#[test]
fn explicit_splits_and_missing_folders() {
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        for (c, name) in ["a", "b"].iter().enumerate() {
            for i in 0..3 {
                write_png(
                    &dir.path().join(split).join(name).join(format!("{i}.png")),
                    c,
                    i,
                );
            }
        }
    }
    let d = Dataset::open(dir.path().to_str().unwrap(), 64).unwrap();
    assert_eq!((d.train.len(), d.val.len(), d.test.len()), (6, 0, 6));
    let err = Dataset::open(dir.path().join("nope").to_str().unwrap(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope") && err.contains("no such dataset folder"),
        "{err}"
    );
}

#[test]
fn coop_split_file_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("oxford_pets");
    let mut train = vec![];
    let mut test = vec![];
    for (c, name) in ["abyssinian", "beagle", "boxer"].iter().enumerate() {
        for i in 0..4 {
            let rel = format!("{name}_{i}.jpg");
            write_png(&root.join("images").join(&rel).with_extension("png"), c, i);
            std::fs::rename(
                root.join("images").join(&rel).with_extension("png"),
                root.join("images").join(&rel),
            )
            .unwrap();
            let e = serde_json::json!([rel, c, name]);
            if i < 3 {
                train.push(e)
            } else {
                test.push(e)
            }
        }
    }
    // missing split file: a clear error, not an ImageFolder with one class called "images"
    let err = Dataset::open(root.to_str().unwrap(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("split_zhou_OxfordPets.json") && err.contains("missing"),
        "{err}"
    );
    let split = root.join("split_zhou_OxfordPets.json");
    std::fs::write(
        &split,
        serde_json::to_string(&serde_json::json!({"train": train, "val": [], "test": test}))
            .unwrap(),
    )
    .unwrap();
    let d = Dataset::open(root.to_str().unwrap(), 64).unwrap();
    assert_eq!(d.layout, Layout::CoopSplit);
    assert_eq!(d.name, "OxfordPets");
    assert_eq!(d.class_names, vec!["abyssinian", "beagle", "boxer"]);
    assert_eq!((d.train.len(), d.test.len()), (9, 3));
    assert_eq!(
        d.train[0].image,
        ImageRef::File(root.join("images").join("abyssinian_0.jpg"))
    );
    // the images are PNG bytes named .jpg: decoding goes by content
    assert_eq!(d.load(&d.train[0].image).unwrap().width(), 64);
    // a listed image that does not exist
    std::fs::remove_file(root.join("images").join("beagle_1.jpg")).unwrap();
    let err = Dataset::open(root.to_str().unwrap(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("split_zhou_OxfordPets.json")
            && err.contains("beagle_1.jpg")
            && err.contains("do not exist"),
        "{err}"
    );
    // a broken split file
    std::fs::write(&split, "{\"train\": [[1, 2]]}").unwrap();
    let err = Dataset::open(root.to_str().unwrap(), 64)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("split_zhou_OxfordPets.json") && err.contains("not a CoOp split file"),
        "{err}"
    );
}

#[test]
fn fgvc_aircraft_and_imagenet_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fgvc_aircraft");
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::write(root.join("variants.txt"), "707-320\nA300B4\nDC-10\n").unwrap();
    let mut lines = [String::new(), String::new(), String::new()];
    for (c, v) in ["707-320", "A300B4", "DC-10"].iter().enumerate() {
        for i in 0..3u64 {
            let id = format!("{:07}", c * 10 + i as usize);
            let p = root.join("images").join(format!("{id}.jpg"));
            write_png(&p.with_extension("png"), c, i);
            std::fs::rename(p.with_extension("png"), &p).unwrap();
            lines[i as usize] += &format!("{id} {v}\n");
        }
    }
    std::fs::write(root.join("images_variant_train.txt"), &lines[0]).unwrap();
    std::fs::write(root.join("images_variant_val.txt"), &lines[1]).unwrap();
    // the test split file is missing
    let err = Dataset::open(root.to_str().unwrap(), 64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("images_variant_test.txt"), "{err}");
    std::fs::write(root.join("images_variant_test.txt"), &lines[2]).unwrap();
    let d = Dataset::open(root.to_str().unwrap(), 64).unwrap();
    assert_eq!(d.layout, Layout::FgvcAircraft);
    assert_eq!(d.class_names, vec!["707-320", "A300B4", "DC-10"]);
    assert_eq!((d.train.len(), d.val.len(), d.test.len()), (3, 3, 3));
    assert_eq!(d.test[2].label, 2);

    let root = dir.path().join("imagenet");
    for (c, wnid) in ["n01440764", "n01443537"].iter().enumerate() {
        for i in 0..2 {
            write_png(
                &root
                    .join("images/train")
                    .join(wnid)
                    .join(format!("{i}.png")),
                c,
                i,
            );
            write_png(
                &root.join("images/val").join(wnid).join(format!("v{i}.png")),
                c,
                i + 5,
            );
        }
    }
    std::fs::write(
        root.join("classnames.txt"),
        "n01440764 tench\nn01443537 goldfish\n",
    )
    .unwrap();
    let d = Dataset::open(root.to_str().unwrap(), 64).unwrap();
    assert_eq!(d.layout, Layout::ImageNet);
    assert_eq!(d.class_names, vec!["tench", "goldfish"]);
    assert_eq!((d.train.len(), d.test.len()), (4, 4));
}

#[test]
fn feature_bank_is_reused_and_keyed_by_content() {
    let dir = tempfile::tempdir().unwrap();
    folder_tree(&dir.path().join("data"));
    let bank = FeatureBank::at(dir.path().join("bank"));
    let clip = Clip::load("embedded", &Device::Cpu).unwrap();
    let d = Dataset::open(dir.path().join("data").to_str().unwrap(), 64).unwrap();
    let cancel = AtomicBool::new(false);
    let mut last = Default::default();
    let a = extract(
        &clip,
        &bank,
        &d,
        &d.train,
        Views::Augmented { count: 2, seed: 3 },
        |p| last = *p,
        &cancel,
    )
    .unwrap();
    assert_eq!(
        (last.done, last.total, last.cached),
        (d.train.len() * 2, d.train.len() * 2, 0)
    );
    let b = extract(
        &clip,
        &bank,
        &d,
        &d.train,
        Views::Augmented { count: 2, seed: 3 },
        |p| last = *p,
        &cancel,
    )
    .unwrap();
    assert_eq!(
        last.cached,
        d.train.len() * 2,
        "second run comes from the bank"
    );
    let diff = (a.tokens - b.tokens)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    assert_eq!(a.labels, b.labels);
    // the same bank without the cache gives the same numbers (a view depends on the image, seed
    // and index only, not on the run)
    let c = extract(
        &clip,
        &FeatureBank::none(),
        &d,
        &d.train,
        Views::Augmented { count: 2, seed: 3 },
        |_| {},
        &cancel,
    )
    .unwrap();
    let diff = (a.image - c.image)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
    // change one file's content: only its views are recomputed
    let ImageRef::File(p) = &d.train[0].image else {
        panic!()
    };
    write_png(p, 5, 99);
    extract(
        &clip,
        &bank,
        &d,
        &d.train,
        Views::Augmented { count: 2, seed: 3 },
        |p| last = *p,
        &cancel,
    )
    .unwrap();
    assert_eq!(last.cached, d.train.len() * 2 - 2);
    // a corrupt image names the file
    std::fs::write(p, b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    let err = extract(&clip, &bank, &d, &d.train, Views::Eval, |_| {}, &cancel)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&p.display().to_string()), "{err}");
}
