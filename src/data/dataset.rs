//! Datasets in the layouts researchers already have (shared/spec/DATA.md), plus the demo world:
//! a [`Dataset`] is class names and train / val / test lists of [`Item`]s (an image reference
//! and a label). Readers:
//!
//! - folder per class (`ROOT/<class>/<images>`, `_` read as a space, labels in sorted folder
//!   order, optional `ROOT/classnames.txt` overriding names); with `train/`, `val/`, `test/`
//!   sub-folders those are the splits, otherwise each class is split 50/50 into train and test
//!   by a hash of the file name (stable when files are added);
//! - the CoOp benchmark layout: `split_zhou_<Name>.json` with image paths relative to the
//!   dataset's image folder;
//! - FGVCAircraft: `images_variant_{train,val,test}.txt` and `variants.txt`;
//! - ImageNet: `classnames.txt` with `images/train` and `images/val` (val is the test split);
//! - `world` or `world:SEED`: the procedural demo world.
//!
//! Few-shot sampling ([`Dataset::few_shot`]) and the base-to-new split ([`Dataset::subset`])
//! follow DATA.md exactly. Non-image files are skipped and counted, never a crash; a class
//! folder with no images, a missing split file or a split entry pointing at a missing file is an
//! error naming the path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::world::{Split, World};
use crate::error::{Error, Result};

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    World {
        split: Split,
        class: usize,
        index: u64,
    },
    File(PathBuf),
}

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Item {
    pub image: ImageRef,
    pub label: u32,
}

/// Which layout a dataset was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    World,
    ImageFolder,
    CoopSplit,
    FgvcAircraft,
    ImageNet,
}

/// A dataset: class names and three splits.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub layout: Layout,
    pub root: Option<PathBuf>,
    pub class_names: Vec<String>,
    pub train: Vec<Item>,
    pub val: Vec<Item>,
    pub test: Vec<Item>,
    /// Non-image files that were skipped while listing folders.
    pub skipped: Vec<PathBuf>,
    world: Option<World>,
}

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm",
];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Demo-world sizes: a 64-image training pool per class (few-shot draws from it), 8 val and,
/// by default, 50 test images per class.
pub const WORLD_TRAIN_POOL: u64 = 64;
pub const WORLD_VAL: u64 = 8;
pub const WORLD_TEST: u64 = 50;
/// The seed of `world` (the world the GUI opens on and RESULTS.md uses).
pub const DEFAULT_WORLD_SEED: u64 = 1;

/// The image folder of each CoOp dataset, by the name in its split file (DATA.md's table).
fn coop_image_folder(name: &str) -> Option<&'static str> {
    Some(match name {
        "Caltech101" => "101_ObjectCategories",
        "OxfordPets" => "images",
        "StanfordCars" => "",
        "OxfordFlowers" => "jpg",
        "Food101" => "images",
        "SUN397" => "SUN397",
        "DescribableTextures" => "images",
        "EuroSAT" => "2750",
        "UCF101" => "UCF-101-midframes",
        _ => return None,
    })
}

/// The split file CoOp expects in each of its benchmark folders (DATA.md).
fn coop_split_name(folder: &str) -> Option<&'static str> {
    Some(match folder {
        "caltech-101" => "split_zhou_Caltech101.json",
        "oxford_pets" => "split_zhou_OxfordPets.json",
        "stanford_cars" => "split_zhou_StanfordCars.json",
        "oxford_flowers" => "split_zhou_OxfordFlowers.json",
        "food-101" => "split_zhou_Food101.json",
        "sun397" => "split_zhou_SUN397.json",
        "dtd" => "split_zhou_DescribableTextures.json",
        "eurosat" => "split_zhou_EuroSAT.json",
        "ucf101" => "split_zhou_UCF101.json",
        _ => return None,
    })
}

impl Dataset {
    /// The demo world with `test_per_class` test images per class, drawn at `size` pixels.
    pub fn world(seed: u64, size: u32, test_per_class: u64) -> Self {
        let world = World::new(seed, size);
        let n = world.num_classes();
        let items = |split: Split, per: u64| -> Vec<Item> {
            (0..n)
                .flat_map(|c| {
                    (0..per).map(move |i| Item {
                        image: ImageRef::World {
                            split,
                            class: c,
                            index: i,
                        },
                        label: c as u32,
                    })
                })
                .collect()
        };
        Self {
            name: format!("world:{seed}"),
            layout: Layout::World,
            root: None,
            class_names: world.class_names(),
            train: items(Split::Train, WORLD_TRAIN_POOL),
            val: items(Split::Val, WORLD_VAL),
            test: items(Split::Test, test_per_class),
            skipped: Vec::new(),
            world: Some(world),
        }
    }

    /// Open `spec`: `world`, `world:SEED`, or a folder in one of the supported layouts.
    /// `world_size` is the image size the demo world is drawn at (the model's input size).
    pub fn open(spec: &str, world_size: u32) -> Result<Self> {
        if spec == "world" {
            return Ok(Self::world(DEFAULT_WORLD_SEED, world_size, WORLD_TEST));
        }
        if let Some(seed) = spec.strip_prefix("world:") {
            let seed = seed
                .parse()
                .map_err(|_| Error::Invalid(format!("world seed {seed:?} is not a number")))?;
            return Ok(Self::world(seed, world_size, WORLD_TEST));
        }
        let root = Path::new(spec);
        if !root.is_dir() {
            return Err(Error::Io {
                path: root.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such dataset folder"),
            });
        }
        let entries = list_dir(root)?;
        if let Some(split) = entries.iter().find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.starts_with("split_zhou_") && n.ends_with(".json"))
                .unwrap_or(false)
        }) {
            return Self::coop_split(root, split);
        }
        if root.join("images_variant_train.txt").exists() || root.join("variants.txt").exists() {
            return Self::fgvc_aircraft(root);
        }
        if root.join("classnames.txt").exists() && root.join("images").join("train").is_dir() {
            return Self::imagenet(root);
        }
        // a CoOp benchmark folder without its split file would otherwise be read as one class
        let folder = root
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if let Some(split) = coop_split_name(&folder) {
            return Err(Error::Invalid(format!(
                "{}: this looks like CoOp's {folder} folder but its split file {split} is missing (download it from the CoOp repository's DATASETS.md)",
                root.display()
            )));
        }
        if folder == "fgvc_aircraft" {
            return Err(Error::Invalid(format!(
                "{}: FGVCAircraft needs variants.txt and images_variant_{{train,val,test}}.txt",
                root.display()
            )));
        }
        Self::image_folder(root)
    }

    /// Load an image of this dataset (decoded, not preprocessed).
    pub fn load(&self, r: &ImageRef) -> Result<RgbImage> {
        match r {
            ImageRef::World {
                split,
                class,
                index,
            } => match &self.world {
                Some(w) if *class < w.num_classes() => Ok(w.image(*split, *class, *index)),
                _ => Err(Error::Invalid(format!(
                    "world image of class {class} requested from dataset {}",
                    self.name
                ))),
            },
            ImageRef::File(p) => crate::clip::preprocess::load_rgb(p),
        }
    }

    /// Load an image and a content hash of it (SHA-256 of the file's bytes; for world images,
    /// of the parameters that draw it).
    pub fn load_hashed(&self, r: &ImageRef) -> Result<(RgbImage, String)> {
        match r {
            ImageRef::World {
                split,
                class,
                index,
            } => {
                let img = self.load(r)?;
                let w = self
                    .world
                    .as_ref()
                    .map(|w| (w.seed, w.size))
                    .unwrap_or_default();
                let key = format!(
                    "textrefiner-world/1/{}/{}/{split:?}/{class}/{index}",
                    w.0, w.1
                );
                Ok((img, hex(&Sha256::digest(key.as_bytes()))))
            }
            ImageRef::File(p) => {
                let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                let img = crate::clip::preprocess::decode_rgb(&bytes, p)?;
                Ok((img, hex(&Sha256::digest(&bytes))))
            }
        }
    }

    /// A short label for an image (file name or world coordinates).
    pub fn describe(&self, r: &ImageRef) -> String {
        match r {
            ImageRef::World {
                split,
                class,
                index,
            } => format!("{split:?}/{class}/{index}").to_lowercase(),
            ImageRef::File(p) => match &self.root {
                Some(root) => p.strip_prefix(root).unwrap_or(p).display().to_string(),
                None => p.display().to_string(),
            },
        }
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Few-shot training and validation sets (DATA.md): for each class in label order, `shots`
    /// images drawn from the train split with a ChaCha8 generator seeded with `seed` (without
    /// replacement, or with replacement when the class has fewer than `shots` images), then the
    /// val split subsampled the same way to `min(shots, 4)` per class. Deterministic for a
    /// given dataset listing, shots and seed.
    pub fn few_shot(&self, shots: usize, seed: u64) -> Result<(Vec<Item>, Vec<Item>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let train = sample_per_class(
            &self.train,
            self.num_classes(),
            shots,
            &mut rng,
            &self.name,
            "train",
        )?;
        let val = if self.val.is_empty() {
            Vec::new()
        } else {
            sample_per_class(
                &self.val,
                self.num_classes(),
                shots.min(4),
                &mut rng,
                &self.name,
                "val",
            )
            .unwrap_or_default()
        };
        Ok((train, val))
    }

    /// The base or new half (DATA.md): labels present in train, sorted, `m = ceil(n / 2)`;
    /// base = the first m, new = the rest; labels renumbered from 0 in each.
    pub fn subset(&self, which: Subset) -> Dataset {
        let mut present: Vec<u32> = self.train.iter().map(|i| i.label).collect();
        present.sort_unstable();
        present.dedup();
        let m = present.len().div_ceil(2);
        let keep: Vec<u32> = match which {
            Subset::All => present.clone(),
            Subset::Base => present[..m].to_vec(),
            Subset::New => present[m..].to_vec(),
        };
        let map: BTreeMap<u32, u32> = keep
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i as u32))
            .collect();
        let relabel = |v: &[Item]| -> Vec<Item> {
            v.iter()
                .filter_map(|it| {
                    map.get(&it.label).map(|&l| Item {
                        image: it.image.clone(),
                        label: l,
                    })
                })
                .collect()
        };
        Dataset {
            name: match which {
                Subset::All => self.name.clone(),
                Subset::Base => format!("{} (base)", self.name),
                Subset::New => format!("{} (new)", self.name),
            },
            layout: self.layout,
            root: self.root.clone(),
            class_names: keep
                .iter()
                .map(|&l| self.class_names[l as usize].clone())
                .collect(),
            train: relabel(&self.train),
            val: relabel(&self.val),
            test: relabel(&self.test),
            skipped: self.skipped.clone(),
            world: self.world.clone(),
        }
    }

    fn from_files(
        name: String,
        layout: Layout,
        root: &Path,
        class_names: Vec<String>,
        splits: [Vec<Item>; 3],
        skipped: Vec<PathBuf>,
    ) -> Result<Self> {
        let [train, val, test] = splits;
        if class_names.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no classes found",
                root.display()
            )));
        }
        Ok(Self {
            name,
            layout,
            root: Some(root.to_path_buf()),
            class_names,
            train,
            val,
            test,
            skipped,
            world: None,
        })
    }

    fn image_folder(root: &Path) -> Result<Self> {
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".into());
        let split_dirs: Vec<PathBuf> = ["train", "val", "test"]
            .iter()
            .map(|s| root.join(s))
            .collect();
        let has_splits = split_dirs[0].is_dir() && split_dirs[2].is_dir();
        let class_root = if has_splits {
            split_dirs[0].clone()
        } else {
            root.to_path_buf()
        };
        let folders: Vec<PathBuf> = list_dir(&class_root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        if folders.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no class folders (expected ROOT/<class name>/<images>, a CoOp split_zhou_*.json, FGVCAircraft's images_variant_*.txt or ImageNet's classnames.txt)",
                class_root.display()
            )));
        }
        let folder_names: Vec<String> = folders
            .iter()
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let overrides = read_classnames(&root.join("classnames.txt"))?;
        let class_names: Vec<String> = folder_names
            .iter()
            .map(|f| {
                overrides
                    .get(f)
                    .cloned()
                    .unwrap_or_else(|| f.replace('_', " "))
            })
            .collect();
        let mut skipped = Vec::new();
        let mut list_split = |dir: &Path, required: bool| -> Result<Vec<Item>> {
            let mut items = Vec::new();
            for (label, f) in folder_names.iter().enumerate() {
                let cdir = dir.join(f);
                if !cdir.is_dir() {
                    if required {
                        return Err(Error::Invalid(format!(
                            "{}: class folder is missing (it exists under {})",
                            cdir.display(),
                            class_root.display()
                        )));
                    }
                    continue;
                }
                let n = list_class_images(&cdir, label as u32, &mut items, &mut skipped)?;
                if n == 0 && required {
                    return Err(Error::Invalid(format!(
                        "{}: class folder has no images",
                        cdir.display()
                    )));
                }
            }
            Ok(items)
        };
        if has_splits {
            let train = list_split(&split_dirs[0], true)?;
            let val = if split_dirs[1].is_dir() {
                list_split(&split_dirs[1], false)?
            } else {
                Vec::new()
            };
            let test = list_split(&split_dirs[2], false)?;
            Self::from_files(
                name,
                Layout::ImageFolder,
                root,
                class_names,
                [train, val, test],
                skipped,
            )
        } else {
            let all = list_split(root, true)?;
            let (train, test): (Vec<Item>, Vec<Item>) =
                all.into_iter().partition(|it| match &it.image {
                    ImageRef::File(p) => {
                        let n = p
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        Sha256::digest(n.as_bytes())[0] & 1 == 0
                    }
                    _ => true,
                });
            Self::from_files(
                name,
                Layout::ImageFolder,
                root,
                class_names,
                [train, Vec::new(), test],
                skipped,
            )
        }
    }

    fn coop_split(root: &Path, split_file: &Path) -> Result<Self> {
        let fname = split_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ds_name = fname
            .trim_start_matches("split_zhou_")
            .trim_end_matches(".json")
            .to_string();
        let text = std::fs::read_to_string(split_file).map_err(|e| Error::io(split_file, e))?;
        #[derive(serde::Deserialize)]
        struct SplitFile {
            train: Vec<(String, i64, String)>,
            #[serde(default)]
            val: Vec<(String, i64, String)>,
            test: Vec<(String, i64, String)>,
        }
        let sf: SplitFile = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not a CoOp split file ({e}); expected {{\"train\": [[impath, label, classname], ...], \"val\": [...], \"test\": [...]}}", split_file.display())))?;
        let image_dir = match coop_image_folder(&ds_name) {
            Some(f) => root.join(f),
            None => {
                // unknown dataset name: the folder where the first listed image exists
                let first = sf.train.first().map(|t| t.0.clone()).unwrap_or_default();
                list_dir(root)?
                    .into_iter()
                    .filter(|p| p.is_dir())
                    .find(|d| d.join(&first).is_file())
                    .unwrap_or_else(|| root.to_path_buf())
            }
        };
        if !image_dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: the image folder of {ds_name} is missing (split file {})",
                image_dir.display(),
                split_file.display()
            )));
        }
        let mut names: BTreeMap<i64, String> = BTreeMap::new();
        for (_, l, c) in sf.train.iter().chain(&sf.val).chain(&sf.test) {
            if *l < 0 {
                return Err(Error::Invalid(format!(
                    "{}: negative label {l}",
                    split_file.display()
                )));
            }
            names.entry(*l).or_insert_with(|| c.clone());
        }
        let n = names
            .keys()
            .next_back()
            .map(|&m| m as usize + 1)
            .unwrap_or(0);
        if names.len() != n {
            let missing: Vec<usize> = (0..n)
                .filter(|i| !names.contains_key(&(*i as i64)))
                .take(5)
                .collect();
            return Err(Error::Invalid(format!(
                "{}: labels are not 0..{n} (missing {missing:?})",
                split_file.display()
            )));
        }
        let class_names: Vec<String> = names.into_values().collect();
        let mut missing = Vec::new();
        let mut conv = |v: &[(String, i64, String)]| -> Vec<Item> {
            v.iter()
                .map(|(p, l, _)| {
                    let path = image_dir.join(p);
                    if !path.is_file() {
                        missing.push(path.clone());
                    }
                    Item {
                        image: ImageRef::File(path),
                        label: *l as u32,
                    }
                })
                .collect()
        };
        let splits = [conv(&sf.train), conv(&sf.val), conv(&sf.test)];
        check_missing(&missing, split_file)?;
        Self::from_files(
            ds_name,
            Layout::CoopSplit,
            root,
            class_names,
            splits,
            Vec::new(),
        )
    }

    fn fgvc_aircraft(root: &Path) -> Result<Self> {
        let variants = root.join("variants.txt");
        let text = std::fs::read_to_string(&variants).map_err(|e| Error::io(&variants, e))?;
        let class_names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let index: BTreeMap<&str, u32> = class_names
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as u32))
            .collect();
        let images = root.join("images");
        let mut missing = Vec::new();
        let mut read = |split: &str| -> Result<Vec<Item>> {
            let f = root.join(format!("images_variant_{split}.txt"));
            let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
            let mut items = Vec::new();
            for (ln, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let (id, variant) = line.split_once(' ').ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}:{}: expected \"<image id> <variant>\"",
                        f.display(),
                        ln + 1
                    ))
                })?;
                let label = *index.get(variant.trim()).ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}:{}: variant {variant:?} is not in {}",
                        f.display(),
                        ln + 1,
                        variants.display()
                    ))
                })?;
                let path = images.join(format!("{id}.jpg"));
                if !path.is_file() {
                    missing.push(path.clone());
                }
                items.push(Item {
                    image: ImageRef::File(path),
                    label,
                });
            }
            Ok(items)
        };
        let splits = [read("train")?, read("val")?, read("test")?];
        check_missing(&missing, &root.join("images_variant_*.txt"))?;
        Self::from_files(
            "FGVCAircraft".into(),
            Layout::FgvcAircraft,
            root,
            class_names,
            splits,
            Vec::new(),
        )
    }

    fn imagenet(root: &Path) -> Result<Self> {
        let names = read_classnames(&root.join("classnames.txt"))?;
        let train_dir = root.join("images").join("train");
        let test_dir = root.join("images").join("val");
        if !test_dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: ImageNet's validation folder (used as test) is missing",
                test_dir.display()
            )));
        }
        let folders: Vec<String> = list_dir(&train_dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        let mut class_names = Vec::new();
        for f in &folders {
            class_names.push(names.get(f).cloned().ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: folder {f} has no line in {}",
                    train_dir.display(),
                    root.join("classnames.txt").display()
                ))
            })?);
        }
        let mut skipped = Vec::new();
        let mut list = |dir: &Path, required: bool| -> Result<Vec<Item>> {
            let mut items = Vec::new();
            for (label, f) in folders.iter().enumerate() {
                let cdir = dir.join(f);
                let n = if cdir.is_dir() { list_class_images(&cdir, label as u32, &mut items, &mut skipped)? } else { 0 };
                if n == 0 && required {
                    return Err(Error::Invalid(format!(
                        "{}: class folder has no images",
                        cdir.display()
                    )));
                }
            }
            Ok(items)
        };
        let train = list(&train_dir, true)?;
        let test = list(&test_dir, false)?;
        Self::from_files(
            "ImageNet".into(),
            Layout::ImageNet,
            root,
            class_names,
            [train, Vec::new(), test],
            skipped,
        )
    }
}

/// Which classes of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subset {
    All,
    Base,
    New,
}

fn sample_per_class(
    items: &[Item],
    classes: usize,
    k: usize,
    rng: &mut ChaCha8Rng,
    name: &str,
    split: &str,
) -> Result<Vec<Item>> {
    let mut by_class: Vec<Vec<&Item>> = vec![Vec::new(); classes];
    for it in items {
        if let Some(v) = by_class.get_mut(it.label as usize) {
            v.push(it);
        }
    }
    let mut out = Vec::with_capacity(classes * k);
    for (c, pool) in by_class.iter().enumerate() {
        if pool.is_empty() {
            // a class with no training images cannot be learned; classes absent from the
            // whole split (e.g. after a base/new subset) are skipped by construction
            if items.iter().any(|i| i.label as usize == c) {
                continue;
            }
            if split == "train" {
                return Err(Error::Invalid(format!(
                    "{name}: class {c} has no images in the {split} split"
                )));
            }
            continue;
        }
        if pool.len() >= k {
            out.extend(pool.choose_multiple(rng, k).map(|&i| i.clone()));
        } else {
            for _ in 0..k {
                if let Some(&i) = pool.choose(rng) {
                    out.push(i.clone());
                }
            }
        }
    }
    Ok(out)
}

fn check_missing(missing: &[PathBuf], listed_in: &Path) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    let first: Vec<String> = missing
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    Err(Error::Invalid(format!(
        "{}: {} listed images do not exist, e.g. {}",
        listed_in.display(),
        missing.len(),
        first.join(", ")
    )))
}

/// Append the images of one class folder (sorted) as items with `label`; other files go to
/// `skipped`. Returns how many images were found.
fn list_class_images(cdir: &Path, label: u32, items: &mut Vec<Item>, skipped: &mut Vec<PathBuf>) -> Result<usize> {
    let mut n = 0;
    for p in list_dir(cdir)? {
        if p.is_file() && is_image(&p) {
            items.push(Item { image: ImageRef::File(p), label });
            n += 1;
        } else if p.is_file() {
            skipped.push(p);
        }
    }
    Ok(n)
}

/// Sorted entries of a folder.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

/// `classnames.txt` (ImageNet style: "folder class name" per line); empty map when absent.
fn read_classnames(path: &Path) -> Result<BTreeMap<String, String>> {
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut m = BTreeMap::new();
    for (ln, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (folder, name) = line.split_once(char::is_whitespace).ok_or_else(|| {
            Error::Invalid(format!(
                "{}:{}: expected \"<folder> <class name>\"",
                path.display(),
                ln + 1
            ))
        })?;
        m.insert(folder.to_string(), name.trim().to_string());
    }
    Ok(m)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_subsets_follow_data_md() {
        let d = Dataset::world(0, 64, 5);
        let base = d.subset(Subset::Base);
        let new = d.subset(Subset::New);
        assert_eq!(base.num_classes(), 12);
        assert_eq!(new.num_classes(), 12);
        assert_eq!(new.class_names[0], d.class_names[12]);
        assert!(new.test.iter().all(|i| i.label < 12));
        assert_eq!(new.test.len(), 12 * 5);
    }

    #[test]
    fn few_shot_is_seeded_and_uses_replacement_when_short() {
        let d = Dataset::world(0, 64, 5);
        let (a, va) = d.few_shot(16, 1).unwrap();
        let (b, _) = d.few_shot(16, 1).unwrap();
        let (c, _) = d.few_shot(16, 2).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 24 * 16);
        assert_eq!(va.len(), 24 * 4);
        // distinct within a class when the pool is large enough
        let first: std::collections::HashSet<_> = a.iter().filter(|i| i.label == 0).collect();
        assert_eq!(first.len(), 16);
        let (big, _) = d.few_shot(100, 1).unwrap();
        assert_eq!(big.iter().filter(|i| i.label == 3).count(), 100);
    }
}
